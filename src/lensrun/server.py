"""``lensrun serve``: the loaded model behind an OpenAI-compatible Images API, a job queue and a web page.

One worker thread owns the GPU and takes jobs in order from a bounded queue; request handlers only validate,
enqueue and wait (asynchronously). Images are saved with the same PNG metadata as the CLI's and served under
random ids, so no client ever names a path.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import queue
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

    def emit(self, kind: str, **data) -> None:
        self.events.append({"event": kind, **data})

    def public(self) -> dict:
        return {
            "id": self.id, "status": self.status, "created": self.created, "step": self.step, "total": self.total,
            "images": [f"/v1/files/{f}.png" for f in self.files], "error": self.error, "warnings": self.warnings,
            "report": self.report,
        }  # fmt: skip


class Worker:
    """The single GPU worker: a bounded FIFO of jobs, run one at a time."""

    KEEP_JOBS = 512

    def __init__(self, engine: Engine, files: Path, max_queue: int = 16) -> None:
        self.engine = engine
        self.files = files
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.jobs: dict[str, Job] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="lensrun-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        if self.stopping.is_set():
            raise ApiError(503, "the server is shutting down")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise ApiError(429, f"the queue is full ({self.queue.maxsize} jobs); retry later", headers={"Retry-After": "5"}) from None
        self.jobs[job.id] = job
        job.emit("queued", position=self.queue.qsize())
        finished = [j for j in self.jobs.values() if j.done.is_set()]
        for old in finished[: max(0, len(self.jobs) - self.KEEP_JOBS)]:  # bounded memory: oldest finished go
            del self.jobs[old.id]

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                job = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        job.status = "running"
        job.emit("running")
        try:
            self._generate(job)
            job.status = "succeeded"
            job.emit("done", images=[f"/v1/files/{f}.png" for f in job.files], warnings=job.warnings)
        except Cancelled:
            job.status, job.error = "cancelled", "cancelled: the server is shutting down"
            job.emit("error", message=job.error)
        except Exception as err:  # noqa: BLE001 - a failed job is reported to its client, the server goes on
            job.status, job.error = "failed", f"{type(err).__name__}: {err}"
            job.emit("error", message=job.error)
        finally:
            job.done.set()

    def _generate(self, job: Job) -> None:
        """The job's images through the engine (planned for this request's size, steps and CFG)."""
        pipe = self.engine.pipe
        if pipe.tokenizer is not None:
            with warnings.catch_warnings():  # said once, by the encoder, and in the job's own warnings
                warnings.simplefilter("ignore")
                cut = tokenize_prompts(pipe.tokenizer, list(job.request.prompts)).dropped[0]
            if cut:
                job.warnings.append(f"prompt too long: the last {cut} tokens were cut (limit {MAX_SEQUENCE_LENGTH})")

        def on_step(step: int, total: int) -> None:
            job.step, job.total = step, total
            job.emit("progress", step=step, total=total)

        tasks = [Task(single, tag=uuid.uuid4().hex) for single in job.request.images()]
        for task in tasks:
            task.path = self.files / f"{task.tag}.png"
        results = self.engine.run(tasks, on_step=on_step, should_stop=job.cancel.is_set)
        job.report = results[0].report
        job.files = [r.task.tag for r in results]

    def stop(self) -> tuple[int, int]:
        """Fail queued jobs with a clear message and ask the running one to stop at its next step, without
        waiting; returns (queued jobs failed, running jobs cancelled). Every waiting client is answered."""
        self.stopping.set()
        failed = 0
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            job.status, job.error = "failed", SHUT_DOWN
            job.emit("error", message=job.error)
            job.done.set()
            failed += 1
        running = [job for job in self.jobs.values() if job.status == "running"]
        for job in running:
            job.cancel.set()
        return failed, len(running)

    def shutdown(self, timeout: float = 30.0) -> None:
        """``stop``, then wait for the worker thread."""
        self.stop()
        self.thread.join(timeout)


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


def create_app(engine: Engine, files: Path, api_key: str | None = None, max_queue: int = 16,
               max_body: int = 64 * 1024, access_log=None) -> FastAPI:  # fmt: skip
    """The ASGI app around a loaded engine (``app.state.worker`` runs the jobs); ``access_log`` gets one line
    per request (method, path, status, time)."""
    files.mkdir(parents=True, exist_ok=True)
    worker = Worker(engine, files, max_queue)
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
        return {"status": "ok", "queued": worker.queue.qsize(), "model": pipe.model_name, "version": __version__}

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
          files: str | None = None, notify=print, **options) -> None:  # fmt: skip
    """Load the model once and serve it until interrupted. Compiled by default on CUDA (a server makes many
    images: repeated sizes replay the encoder and the denoising steps as CUDA graphs)."""
    import tempfile

    from lensrun.engine import model_variant, resolve_device
    from lensrun.request import EngineOptions

    problem = port_problem(host, port)
    if problem:
        raise LensrunError(problem)
    warning = host_warning(host, api_key)
    if warning:
        notify(warning)
    opts = EngineOptions(**options).resolved()
    if opts.compile is None and resolve_device(opts.device).type == "cuda":
        opts = EngineOptions(**{**opts.__dict__, "compile": True})
    first = GenerationRequest.build(prompt="warm-up", default_variant=model_variant(opts)).images()
    engine = Engine.shared(opts, first)
    folder = Path(files) if files else Path(tempfile.mkdtemp(prefix="lensrun-serve-"))
    app = create_app(engine, folder, api_key=api_key, max_queue=max_queue, access_log=notify)
    warnings.showwarning = lambda message, *args, **kwargs: notify(f"lensrun: warning: {message}")
    notify(f"lensrun serving {engine.pipe.model_name} on http://{host}:{port} (images in {folder})")
    try:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
        LensrunServer(config, app.state.worker, notify).run()
    finally:
        if not files:  # a temporary folder of ours: served images go with the server
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
