"""``lensrun serve``: the loaded model behind an OpenAI-compatible Images API, a job queue and a web page.

One worker thread per engine (one engine, or a replica per GPU: those beyond the first in processes of their
own) takes jobs in order from a bounded queue, running queued jobs of the same size and settings together as one
engine run; the engine's writer thread writes each PNG and completes its job while the GPU goes on. Request
handlers only validate, enqueue and wait (asynchronously). Compilation happens on a side thread while requests
run eagerly (``Engine.background_compile``). Images are saved with the same PNG metadata as the CLI's and served
under random ids, so no client ever names a path.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import os
import re
import secrets
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, create_model

from lensrun import __version__
from lensrun.engine import Cancelled, Engine, Task
from lensrun.errors import LensrunError
from lensrun.prompting import MAX_SEQUENCE_LENGTH, tokenize_prompts
from lensrun.request import GenerationRequest, option_specs

MAX_IMAGES = 8
FILE_ID = re.compile(r"^[0-9a-f]{32}$")
# Which request field a validation message is about (the messages come from GenerationRequest.build).
PARAM_OF_MESSAGE = [
    ("aspect ratio", "aspect_ratio"), ("base resolution", "base_resolution"), ("height", "size"), ("width", "size"),
    ("steps", "steps"), ("cfg", "cfg"), ("n (images", "n"), ("seed", "seed"), ("negative prompt", "negative_prompt"),
    ("prompt", "prompt"),
]  # fmt: skip


class _OpenAIFields(BaseModel):
    """OpenAI ``images.generate``'s own fields; unknown OpenAI fields are ignored."""

    model_config = ConfigDict(extra="allow")
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    model: str | None = None


def _request_fields() -> dict:
    """Every ``GenerationRequest`` option as an optional body field (``prompt``: one string, required);
    values are checked by ``GenerationRequest.build``, whose messages name the field and what is allowed."""
    fields = {}
    for spec in option_specs(GenerationRequest):
        if spec.name == "prompt":
            fields["prompt"] = (str, ...)
        else:
            fields[spec.name] = (spec.type | None, None)
    return fields


ImageRequest = create_model("ImageRequest", __base__=_OpenAIFields, **_request_fields())


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


def _error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 429: "rate_limit_error"}.get(status, "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size in (None, "auto"):
        return None, None
    m = re.fullmatch(r"(\d+)x(\d+)", size)
    if not m:
        raise ApiError(422, f"size '{size}' must look like WIDTHxHEIGHT, e.g. 1024x1024 (multiples of 16)", "size")
    return int(m.group(2)), int(m.group(1))


@dataclass
class Job:
    """One request's work and everything a client may ask about it."""

    request: GenerationRequest
    response_format: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: str = "queued"
    created: int = field(default_factory=lambda: int(time.time()))
    step: int = 0
    total: int = 0
    files: list[str] = field(default_factory=list)
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    written: int = 0  # images on disk so far
    _ending: threading.Lock = field(default_factory=threading.Lock)

    def emit(self, kind: str, **data) -> None:
        self.events.append({"event": kind, **data})

    def finish(self, status: str, error: str | None = None) -> None:
        """The job's end, said once (the GPU thread and the writer thread may both try)."""
        with self._ending:
            if self.done.is_set():
                return
            self.status, self.error = status, error
            if status == "succeeded":
                self.emit("done", images=[f"/v1/files/{f}.png" for f in self.files], warnings=self.warnings)
            else:
                self.emit("error", message=error)
            self.done.set()

    def batch_key(self) -> tuple:
        """Jobs with equal keys share one engine run: same size, steps and guidance give the same plan, so each
        image is the one its request would get alone."""
        r = self.request
        return (r.height, r.width, r.steps, r.cfg, r.variant)

    def public(self) -> dict:
        return {
            "id": self.id, "status": self.status, "created": self.created, "step": self.step, "total": self.total,
            "images": [f"/v1/files/{f}.png" for f in self.files], "error": self.error, "warnings": self.warnings,
            "report": self.report,
        }  # fmt: skip


class Worker:
    """The GPU worker: a bounded FIFO of jobs. It takes the oldest job together with every queued job of the
    same batch key (up to MAX_BATCH_IMAGES images) and runs them as one engine run — prompts encoded together,
    each image denoised with its own seed, PNGs written on the engine's writer thread while the next image
    runs. Jobs of equal keys keep their order; a job of another key waits at most one run."""

    KEEP_JOBS = 512
    MAX_BATCH_IMAGES = 8

    def __init__(self, engine: Engine | list[Engine], files: Path, max_queue: int = 16) -> None:
        self.engines = engine if isinstance(engine, list) else [engine]  # replicas: one per GPU, one thread each
        self.engine = self.engines[0]
        self.files = files
        self.max_queue = max_queue
        self.pending: collections.deque[Job] = collections.deque()
        self.ready = threading.Condition()
        self.jobs: dict[str, Job] = {}
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._loop, args=(e,), name=f"lensrun-worker-{i}", daemon=True)
            for i, e in enumerate(self.engines)
        ]  # fmt: skip
        for thread in self.threads:
            thread.start()

    def queued(self) -> int:
        return len(self.pending)

    def submit(self, job: Job) -> None:
        with self.ready:
            if self.stopping.is_set():
                raise ApiError(503, "the server is shutting down")
            if len(self.pending) >= self.max_queue:
                raise ApiError(429, f"the queue is full ({self.max_queue} jobs); retry later", headers={"Retry-After": "5"})
            self.pending.append(job)
            self.jobs[job.id] = job
            job.emit("queued", position=len(self.pending))
            self.ready.notify()
        finished = [j for j in self.jobs.values() if j.done.is_set()]
        for old in finished[: max(0, len(self.jobs) - self.KEEP_JOBS)]:  # bounded memory: oldest finished go
            self.jobs.pop(old.id, None)

    def next_batch(self) -> list[Job]:
        """The oldest job and the queued jobs that can share its run (empty after 0.1 s without work)."""
        with self.ready:
            if not self.pending and not self.ready.wait_for(lambda: self.pending, timeout=0.1):
                return []
            head = self.pending.popleft()
            batch, images = [head], head.request.n
            for job in list(self.pending):
                if job.batch_key() == head.batch_key() and images + job.request.n <= self.MAX_BATCH_IMAGES:
                    self.pending.remove(job)
                    batch.append(job)
                    images += job.request.n
            return batch

    def _loop(self, engine: Engine) -> None:
        while not self.stopping.is_set() and engine.alive:  # a replica whose process ended takes no more work
            batch = self.next_batch()
            if batch and not engine.alive:  # it ended while this thread waited: the batch goes back, in order
                with self.ready:
                    self.pending.extendleft(reversed(batch))
                    self.ready.notify_all()
            elif batch:
                self._run(batch, engine)

    def _run(self, batch: list[Job], engine: Engine) -> None:
        owner: dict[int, Job] = {}
        tags: dict[str, list[str]] = {job.id: [] for job in batch}
        tasks: list[Task] = []
        for job in batch:
            job.status, job.total = "running", job.request.steps * job.request.n
            job.emit("running")
            self._prompt_warnings(job)
            for single in job.request.images():
                task = Task(single, tag=uuid.uuid4().hex, on_step=self._progress(job))
                task.path = self.files / f"{task.tag}.png"
                tags[job.id].append(task.tag)
                owner[id(task)] = job
                tasks.append(task)

        def on_result(result) -> None:  # on the engine's writer thread
            job = owner[id(result.task)]
            if result.error is not None:
                job.finish("failed", result.error)
                return
            job.report = job.report or result.report
            job.written += 1
            if job.written == job.request.n:
                job.files = tags[job.id]
                job.finish("succeeded")

        try:
            engine.run(tasks, isolate=True, on_result=on_result, wait=False,
                            should_stop=lambda: any(j.cancel.is_set() for j in batch))  # fmt: skip
        except Cancelled:
            for job in batch:
                job.finish("cancelled", "cancelled: the server is shutting down")
        except Exception as err:  # noqa: BLE001 - failed jobs are reported to their clients, the server goes on
            for job in batch:
                job.finish("failed", f"{type(err).__name__}: {err}")

    def _prompt_warnings(self, job: Job) -> None:
        """A prompt cut to the encoder's limit is said in the job's own warnings (the encoder says it once)."""
        tokenizer = self.engine.pipe.tokenizer
        if tokenizer is None:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cut = tokenize_prompts(tokenizer, list(job.request.prompts)).dropped[0]
        if cut:
            job.warnings.append(f"prompt too long: the last {cut} tokens were cut (limit {MAX_SEQUENCE_LENGTH})")

    @staticmethod
    def _progress(job: Job):
        def on_step(step: int, steps: int) -> None:
            job.step += 1
            job.emit("progress", step=job.step, total=job.total)

        return on_step

    def stop(self) -> tuple[int, int]:
        """Fail queued jobs with a clear message and ask the running ones to stop at their next step, without
        waiting; returns (queued jobs failed, running jobs cancelled). Every waiting client is answered."""
        with self.ready:
            self.stopping.set()
            queued, self.pending = list(self.pending), collections.deque()
        for job in queued:
            job.finish("failed", SHUT_DOWN)
        running = [job for job in self.jobs.values() if job.status == "running" and not job.done.is_set()]
        for job in running:
            job.cancel.set()
        return len(queued), len(running)

    def shutdown(self, timeout: float = 30.0) -> None:
        """``stop``, then wait for the worker threads and the engines' last PNGs (replica processes exit)."""
        self.stop()
        for thread in self.threads:
            thread.join(timeout)
        for engine in self.engines:
            engine.close()


SHUT_DOWN = "the server shut down before this job started"


# OpenAI Images fields lensrun cannot honour: accepted (clients send them by default) and named in a warning.
IGNORED_OPENAI_FIELDS = ("quality", "style", "user", "background", "moderation", "output_compression",
                         "output_format", "partial_images", "stream")  # fmt: skip


def validate(body, engine: Engine, warnings: list[str]) -> GenerationRequest:
    """The request's images, or an ApiError naming the bad field and what is allowed. OpenAI fields lensrun
    cannot honour add a line to ``warnings``; any other unknown field is refused."""
    extra = dict(body.model_extra or {})
    unknown = sorted(set(extra) - set(IGNORED_OPENAI_FIELDS))
    if unknown:
        allowed = ", ".join(["size", "response_format", "model", *_request_fields()])
        raise ApiError(422, f"unknown field(s) {unknown}; allowed: {allowed}", unknown[0])
    for name in sorted(extra):
        warnings.append(f"'{name}' is an OpenAI option lensrun does not apply; it was ignored")
    if not 1 <= (body.n or 1) <= MAX_IMAGES:
        raise ApiError(422, f"n must be between 1 and {MAX_IMAGES}, got {body.n}", "n")
    options = {name: getattr(body, name) for name in _request_fields() if getattr(body, name) is not None}
    if body.size not in (None, "auto"):
        clash = [k for k in ("height", "width", "base_resolution", "aspect_ratio") if k in options]
        if clash:
            raise ApiError(422, f"size and {', '.join(clash)} both given: size sets the exact size, give one", "size")
        options["height"], options["width"] = parse_size(body.size)
    try:
        return engine.request(**options)
    except LensrunError as err:
        message = str(err)
        param = next((p for key, p in PARAM_OF_MESSAGE if message.startswith(key) or f" {key}" in message[:40]), None)
        raise ApiError(422, message, param) from None


def create_app(engine: Engine | list[Engine], files: Path, api_key: str | None = None, max_queue: int = 16,
               max_body: int = 64 * 1024, access_log=None) -> FastAPI:  # fmt: skip
    """The ASGI app around loaded engines (one, or a replica per GPU; ``app.state.worker`` runs the jobs);
    ``access_log`` gets one line per request (method, path, status, time)."""
    files.mkdir(parents=True, exist_ok=True)
    worker = Worker(engine, files, max_queue)
    engine = worker.engine
    pipe = engine.pipe

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.shutdown()

    app = FastAPI(title="lensrun", version=__version__, lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        param = str(first["loc"][-1]) if first.get("loc") else None
        return _error(422, f"{param}: {first['msg']}", param)

    @app.middleware("http")
    async def _access(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        if access_log is not None:
            ms = (time.perf_counter() - start) * 1000
            access_log(f"{request.method} {request.url.path} {response.status_code} {ms:.0f} ms")
        return response

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None:
                return _error(411, "a Content-Length header is required")
            if int(length) > max_body:
                return _error(413, f"request body is {length} bytes; the limit is {max_body}")
        if api_key and request.url.path.startswith("/v1/") and not request.url.path.startswith("/v1/files/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "missing or wrong API key (Authorization: Bearer …)")
        return await call_next(request)

    def _job(job_id: str) -> Job:
        job = worker.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id}", "id")
        return job

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "queued": worker.queued(), "model": pipe.model_name, "version": __version__}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": pipe.model_name, "object": "model", "created": 0, "owned_by": "lensrun"}]}

    def make_job(body) -> Job:
        notes: list[str] = []
        job = Job(validate(body, engine, notes), body.response_format)
        job.warnings.extend(notes)
        return job

    @app.post("/v1/images/generations")
    async def generations(body: ImageRequest, request: Request):
        job = make_job(body)
        worker.submit(job)
        while not job.done.is_set():
            await asyncio.sleep(0.02)
        if job.status != "succeeded":
            status = 503 if job.status == "cancelled" or job.error == SHUT_DOWN else 500
            return _error(status, job.error or "generation failed")
        data = []
        for file_id in job.files:
            if job.response_format == "url":
                data.append({"url": f"{str(request.base_url).rstrip('/')}/v1/files/{file_id}.png"})
            else:
                data.append({"b64_json": base64.b64encode((files / f"{file_id}.png").read_bytes()).decode()})
        return {"created": job.created, "data": data, "warnings": job.warnings, "lensrun": {"job": job.id, **job.report}}

    @app.post("/v1/jobs", status_code=202)
    async def create_job(body: ImageRequest) -> dict:
        job = make_job(body)
        worker.submit(job)
        return job.public()

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str) -> dict:
        return _job(job_id).public()

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str):
        job = _job(job_id)

        async def stream():
            sent = 0
            while True:
                while sent < len(job.events):
                    event = job.events[sent]
                    sent += 1
                    yield f"event: {event['event']}\ndata: {json.dumps(event)}\n\n"
                if job.done.is_set() and sent >= len(job.events):
                    return
                await asyncio.sleep(0.05)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/files/{name}")
    def get_file(name: str):
        file_id = name.removesuffix(".png")
        path = files / f"{file_id}.png"
        if not FILE_ID.match(file_id) or not path.is_file():
            raise ApiError(404, "no such file", "name")
        return FileResponse(path, media_type="image/png")

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        from lensrun.webpage import PAGE

        return PAGE.replace("{{MODEL}}", pipe.model_name).replace("{{AUTH}}", "true" if api_key else "false")

    return app


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def host_warning(host: str, api_key: str | None) -> str | None:
    if host in LOOPBACK or api_key:
        return None
    return f"warning: serving on {host} without --api-key: anyone who can reach this port can use the GPU"


class LensrunServer(uvicorn.Server):
    """uvicorn's server, but Ctrl-C first answers every client (queued jobs fail, the running one is cancelled
    at its next step, SSE streams get a final event, waiting requests a 503) and a second Ctrl-C exits at once."""

    def __init__(self, config: uvicorn.Config, worker: Worker, notify) -> None:
        super().__init__(config)
        self.worker, self.notify = worker, notify

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit:
            os._exit(130)  # second Ctrl-C: now, quietly
        self.should_exit = True
        failed, cancelled = self.worker.stop()
        self.notify(f"lensrun: shutting down: {failed} queued job(s) failed, {cancelled} running job(s) cancelled")


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be served (checked before the model loads), or None."""
    import socket

    if not 1 <= port <= 65535:
        return f"port {port} is not in 1–65535"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        return f"cannot resolve host '{host}': {err}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            return f"cannot listen on {host}:{port}: {err.strerror or err}"
    return None


def serve(host: str = "127.0.0.1", port: int = 7860, api_key: str | None = None, max_queue: int = 16,
          files: str | None = None, warmup: bool = False, replicas: int = 1, notify=print, **options) -> None:  # fmt: skip
    """Load the model once and serve it until interrupted. Compiled by default on CUDA (a server makes many
    images: repeated sizes replay the encoder and the denoising steps as CUDA graphs). Compilation starts at
    once on a side thread and requests run eagerly until it is done; ``warmup``: finish it (and one image at the
    default size) before listening. ``replicas``: one engine per GPU (cuda:0 here, the others each in a process
    of its own: ``lensrun.replicas``), each with a worker thread taking batches from the one queue."""
    import tempfile

    from lensrun.api import one_gpu_only
    from lensrun.engine import model_variant, resolve_device
    from lensrun.parallel import device_per_gpu
    from lensrun.replicas import RemoteEngine
    from lensrun.request import EngineOptions

    problem = port_problem(host, port)
    if problem:
        raise LensrunError(problem)
    warning = host_warning(host, api_key)
    if warning:
        notify(warning)
    opts = EngineOptions(**options).resolved()
    one_gpu_only(opts, "the server")
    devices = device_per_gpu("--replicas", replicas, opts.device)  # before any weight is read
    if opts.compile is None and resolve_device(opts.device).type == "cuda":
        opts = EngineOptions(**{**opts.__dict__, "compile": True})
    first = GenerationRequest.build(prompt="warm-up", default_variant=model_variant(opts)).images()
    # Further replicas load in their own processes meanwhile (lensrun.replicas says why not threads).
    remotes = [RemoteEngine(opts, device, first, warmup, notify) for device in devices[1:]]
    engine = Engine.shared(opts, first)
    engine.prepare_to_serve(first, warmup, notify)
    for remote in remotes:
        remote.wait_ready()
    engines = [engine, *remotes]
    folder = Path(files) if files else Path(tempfile.mkdtemp(prefix="lensrun-serve-"))
    app = create_app(engines, folder, api_key=api_key, max_queue=max_queue, access_log=notify)
    warnings.showwarning = lambda message, *args, **kwargs: notify(f"lensrun: warning: {message}")
    notify(f"lensrun serving {engine.pipe.model_name} on http://{host}:{port} (images in {folder})")
    try:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
        LensrunServer(config, app.state.worker, notify).run()
    finally:
        if not files:  # a temporary folder of ours: served images go with the server
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
