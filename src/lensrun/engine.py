"""The one run path: a loaded model and everything that turns a list of image requests into PNGs.

Every surface drives an ``Engine``: ``lensrun generate``/``replay`` and ``lensrun.generate`` (a few images),
``lensrun gallery`` (many, resumable; also as Ray actors), ``lensrun serve`` (batches from its queue, one
engine per GPU), and the workers of ``generate --gpus 2``. For any list of single-image tasks the engine

1. plans memory from the tasks' real sizes, steps and CFG (``lensrun.memory``) and decides whether compiling
   pays (``lensrun.compile_policy``);
2. encodes every prompt once (prompt cache first), then denoises the images grouped by size and decodes them —
   each image right away under a resident plan, a group of up to 8 at a time under a phased one
   (``LensPipeline.phase``, so each component moves once a group);
3. after an out-of-memory error, frees the failed attempt's memory and retries that image under the next plan;
4. hands each image to a writer thread, which copies it off the GPU, writes its PNG with recipe and run report
   atomically and reports it to the caller while the GPU goes on with the next image. The GPU thread never
   waits for the GPU except to stay at most ``QUEUED_AHEAD`` phases ahead of it (``lensrun.transfers``).
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections import deque
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from lensrun import __version__, compile_policy, memory
from lensrun.errors import LensrunError
from lensrun.request import TINY_MODEL, EngineOptions, GenerationRequest, check_dtype, infer_variant
from lensrun.transfers import Download, Mark

SINGLE_FILE_PARTS = ("transformer", "text_encoder", "vae")  # components a single file may replace
GROUP_IMAGES = 8  # images denoised before their group is decoded and written: bounds what an interrupt loses
WRITES_IN_FLIGHT = 4  # decoded images waiting for the PNG writer at most
# Phases (an image's denoising or decoding) the GPU thread queues beyond what the GPU is running: enough for the
# GPU never to wait for the thread between images or runs, few enough that progress and cancelling stay close.
QUEUED_AHEAD = 2
# Free GPU memory for the child that fills empty compile caches (lensrun.background_compile): its one block,
# warm-up and CUDA context take about a GiB; the rest stays for the runs served meanwhile.
FILL_CACHES_MIN_FREE_GIB = 8


class Cancelled(Exception):
    """Raised from ``should_stop``: the run stops at the next step; never counted as an image's failure."""


@dataclass
class Task:
    """One image to make: a single-image request, where its PNG goes (None: kept in memory), the caller's tag,
    ``keep``: where its denoised latents wait for decoding (an interrupted run resumes from them), and
    ``on_step(step, steps)``: this image's own progress (a server reports each job's, even in a shared run)."""

    request: GenerationRequest
    path: Path | None = None
    tag: object = None
    keep: Path | None = None
    on_step: Callable[[int, int], None] | None = None


@dataclass
class Result:
    """What became of a task: the image (also in memory unless written), its recipe and report, or an error."""

    task: Task
    config: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    image: object = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.image is not None


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LensrunError(f"unknown device '{device}': use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LensrunError(f"device '{device}' asked for, but no CUDA GPU is available")
    if dev.type not in ("cpu", "cuda"):
        raise LensrunError(f"device '{device}' is not supported: use cpu, cuda or cuda:N")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """The asked dtype, or bf16 on CUDA and fp32 on the CPU."""
    return check_dtype(dtype or ("bfloat16" if device.type == "cuda" else "float32"))


def single_files(options: EngineOptions) -> dict[str, str | None]:
    """The single file of each part: as given, else found in a ComfyUI models folder given as ``--model``."""
    from lensrun import single_file

    given = {part: getattr(options, part) for part in SINGLE_FILE_PARTS}
    comfy = single_file.comfy_models_dir(Path(options.model)) if options.model != TINY_MODEL else None
    if comfy is None:
        return given
    return {k: str(v) for k, v in single_file.comfy_parts(comfy, None, given).items()}


def model_variant(options: EngineOptions, files: dict[str, str | None] | None = None) -> str:
    """The variant a model's name implies (lens, turbo, base): a DiT file's name wins over the folder's."""
    transformer = (files or single_files(options))["transformer"]
    return infer_variant(Path(transformer).stem if transformer else options.model)


def model_sizes(model: str, root: Path | None, experts: str = "mxfp4") -> memory.ComponentSizes:
    """Component sizes from the checkpoint's own configs (the planner then fits any Lens-shaped model)."""
    from lensrun import configs

    if model == TINY_MODEL:
        return memory.ComponentSizes.from_configs(
            configs.TINY_TRANSFORMER_CONFIG, configs.TINY_TEXT_ENCODER_CONFIG, configs.TINY_VAE_CONFIG
        )
    from lensrun.loading import component_config

    full = {
        "transformer": configs.FULL_TRANSFORMER_CONFIG, "vae": configs.FULL_VAE_CONFIG,
        "text_encoder": configs.FULL_TEXT_ENCODER_CONFIG,
    }  # fmt: skip

    def read(part: str) -> dict:  # a part given as a single file may have no folder: the published shapes
        return {k: v for k, v in component_config(root, part, full[part]).items() if not k.startswith("_")}

    vae = {k: v for k, v in read("vae").items() if k != "force_upcast"}
    try:
        return memory.ComponentSizes.from_configs(read("transformer"), read("text_encoder"), vae, experts=experts)
    except (TypeError, KeyError, ValueError) as err:
        raise LensrunError(f"{root}: the config.json files do not describe a Lens model ({err})") from None


class Engine:
    """A loaded Lens model and the run path over it (see the module docstring). ``Engine.shared`` keeps one per
    process, so a replay after a generate, or every job of a server, reuses the loaded weights."""

    _shared: ClassVar[dict[tuple, Engine]] = {}
    alive = True  # an engine in this process lives as long as it (a replica process may end: lensrun.replicas)

    def __init__(
        self, pipe, options: EngineOptions, sizes: memory.ComponentSizes | None = None, files: dict | None = None
    ) -> None:
        self.pipe = pipe
        self.options = options.resolved()
        self.files = {part: f for part, f in (files or {}).items() if f}  # single files the weights came from
        self.device = pipe.device
        self.sizes = sizes or memory.ComponentSizes.lens()
        self.variant = pipe.variant
        self.last_decision: compile_policy.CompileDecision | None = None
        # A server sets this: compilation then runs on a side thread while runs stay eager (no request waits).
        self.background_compile = False
        self.compiling = None  # the background compilation under way (lensrun.background_compile)
        self.compile_error: str | None = None  # why a background compilation failed: runs stay eager
        self._attention_for: tuple | None = None  # (asked backend, precision) the current backend was resolved for
        self._writer: ThreadPoolExecutor | None = None
        self._queued: deque[Mark] = deque()  # ends of the phases queued on the GPU, oldest first

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def load(cls, options: EngineOptions, first: list[GenerationRequest] | None = None, notify=None) -> Engine:
        """Check the model, plan for the first requests (when known) and load the weights straight to where that
        plan keeps them: a resident plan reads them onto the GPU, any other plan into CPU memory."""
        from lensrun import single_file
        from lensrun.pipeline import LensPipeline, resolve_sources

        options = options.resolved()
        device = resolve_device(options.device)
        dtype = resolve_dtype(options.dtype, device)
        files = single_files(options)
        variant = model_variant(options, files)
        root = None
        if options.model == TINY_MODEL:
            if any(files.values()):
                raise LensrunError("--transformer / --text-encoder / --vae replace parts of a checkpoint folder, not of tiny-random")
        else:
            root, _ = resolve_sources(options.model, variant, files)
        for part, f in files.items():
            if f and single_file.kind(Path(f)) != single_file.KIND_OF_PART[part]:
                raise LensrunError(f"--{part.replace('_', '-')} {f}: that file holds another component")
        sizes = model_sizes(options.model, root, experts="nvfp4" if files["text_encoder"] else "mxfp4")
        load_to, precision = torch.device("cpu"), "bf16"
        if device.type == "cuda" and first:
            plans, _ = plans_for(device, first, options, sizes, compiled=False)
            if plans[0].placement == "resident":  # quantized where it lands (a DiT file: block by block)
                load_to, precision = device, plans[0].precision
        if notify is not None:
            notify(f"loading {options.model} onto {load_to} …")
        if options.model == TINY_MODEL:
            pipe = LensPipeline.tiny_random(dtype=dtype, device=load_to, variant=variant)
        else:
            pipe = LensPipeline.from_pretrained(
                root or options.model, variant=variant, dtype=dtype, device=load_to, name=options.model, files=files,
                precision=precision,
            )  # fmt: skip
        pipe._device = device
        return cls(pipe, options, sizes, files)

    @classmethod
    def shared(cls, options: EngineOptions, first: list[GenerationRequest] | None = None, notify=None) -> Engine:
        """The process's engine for these options (one model in memory at a time)."""
        options = options.resolved()
        device = resolve_device(options.device)
        key = (options.model, *(getattr(options, p) for p in SINGLE_FILE_PARTS), str(device), resolve_dtype(options.dtype, device))
        engine = cls._shared.get(key)
        if engine is None:
            cls._shared.clear()
            gc.collect()
            start = time.perf_counter()
            engine = cls._shared[key] = cls.load(options, first, notify)
            if notify is not None:
                notify(f"loaded in {time.perf_counter() - start:.1f} s")
        engine.options = options
        return engine

    # ------------------------------------------------------------------------------------------------ inputs
    def request(self, **options) -> GenerationRequest:
        """A validated request whose preset defaults to this model's variant."""
        return GenerationRequest.build(default_variant=self.variant, **options)

    def recipe(self, request: GenerationRequest) -> dict:
        """What a PNG stores to regenerate its image: the request plus the model settings that change pixels
        (under the plan applied now)."""
        pipe = self.pipe
        plan = pipe.plan
        return {
            **request.record(), "model": pipe.model_name, "dtype": str(pipe.dtype).removeprefix("torch."),
            "quantize": plan.precision, "vae_tiling": plan.vae_tiling, "weights": pipe.weights_id,
            "attention": pipe.transformer.attention_backend,
            "lensrun_version": __version__,
            **self.files,
        }  # fmt: skip

    def plans(self, requests: list[GenerationRequest], compiled: bool | None = None) -> tuple[list[memory.Plan], str]:
        """The plan for these requests (their largest size, most steps, any CFG), its OOM fallbacks, and why."""
        graphs = self.pipe.compiled if compiled is None else compiled
        return plans_for(self.device, requests, self.options, self.sizes, graphs)

    def decide_compile(self, requests: list[GenerationRequest], plan: memory.Plan) -> compile_policy.CompileDecision:
        seconds = [
            memory.predict(plan, self.sizes, r.height, r.width, r.steps, r.cfg != 1.0, graphs=True).seconds for r in requests
        ]
        if self.compile_error is not None:
            return compile_policy.CompileDecision(False, f"eager: compilation failed ({self.compile_error})")
        warm = self.device.type == "cuda" and _caches_warm(self._compile_key(plan))
        # compiled code this process holds (also after ``use_eager``) reopens for free; a side thread's does not yet
        compiled = self.pipe.compiled or (self.pipe.transformer.compiled_gate is not None and self.compiling is None)
        return compile_policy.decide(self.options.compile, self.device.type, seconds, warm, compiled)

    # --------------------------------------------------------------------------------------------------- run
    def run(
        self,
        tasks: list[Task],
        *,
        plans: list[memory.Plan] | None = None,
        isolate: bool = False,
        on_result: Callable[[Result], None] | None = None,
        on_step: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        notify: Callable[[str], None] | None = None,
        progress: bool = False,
        wait: bool = True,
    ) -> list[Result]:
        """Make every task's image. ``isolate``: a failing image is recorded in its result and the others go
        on (galleries); otherwise the first failure is raised. ``on_step(done, total)`` counts steps over the
        whole run; ``should_stop`` is polled every step (True stops the run with ``Cancelled``).

        PNGs are encoded and written on a writer thread while the GPU goes on with the next image;
        ``on_result`` is called there, once the image's file is complete. ``wait=False`` returns before the
        last writes finish (a server starts its next run meanwhile; its ``on_result`` completes each job)."""
        with _current_device(self.device):  # a replica's thread: its events, streams and graphs on its GPU
            return self._run(tasks, plans, isolate, on_result, on_step, should_stop, notify, progress, wait)

    def _run(self, tasks, plans, isolate, on_result, on_step, should_stop, notify, progress, wait) -> list[Result]:
        from tqdm.auto import tqdm

        say = notify or (lambda message: None)
        requests = [t.request for t in tasks]
        if not tasks:
            return []
        run = _Run(self, tasks, isolate, on_result, say)
        run.plans = self._prepare(requests, plans, say)
        total = sum(r.steps for r in requests)
        done = 0
        run.encode()
        bar = tqdm(total=total, desc="denoising", unit="step", disable=not progress)

        def step(result: Result, i: int, n: int) -> None:
            nonlocal done
            done += 1
            bar.update(1)
            if on_step is not None:
                on_step(done, total)
            if result.task.on_step is not None:
                result.task.on_step(i, n)
            if should_stop is not None and should_stop():
                raise Cancelled

        per_group = 1 if self.pipe.plan.placement == "resident" else GROUP_IMAGES
        try:
            for group in size_groups([r for r in run.results if r.error is None], per_group):
                bar.set_description("denoising")
                run.denoise(group, step)
                bar.set_description("decoding")
                run.decode(group)
        except BaseException:
            if wait:  # the images already decoded still reach their files before the error goes up
                futures.wait(run.writes)
            raise
        finally:
            bar.close()
        if wait:
            run.wait_for_writes()
        self._remember_compilation()
        return run.results

    def compile_ahead(
        self, requests: list[GenerationRequest], wait: bool = False, notify=None, background: bool = True
    ) -> None:
        """Plan and decide compilation for work known ahead of its runs — a server's expected requests, a Ray
        actor's share of a gallery that reaches it in small chunks (each chunk alone would not repay compiling).
        ``background`` (a server): compiling starts now on a side thread and runs stay eager until it is done;
        ``wait``: block until it is done and switch to it."""
        say = notify or (lambda message: None)
        self.background_compile = background
        with _current_device(self.device):
            self._prepare(requests, None, say)  # plans, decides and applies as a run would: compiling starts there
        if wait and self.compiling is not None:
            start = time.perf_counter()
            self.compiling.wait()
            say(f"compiled in {time.perf_counter() - start:.1f} s")
            self._switch_when_compiled(say)

    def prepare_to_serve(self, first: list[GenerationRequest], warmup: bool, notify) -> None:
        """A server engine's start (in the server's process or a replica's): compilation begins on a side thread,
        or with ``warmup`` is finished and one image made before serving."""
        self.compile_ahead(first, wait=warmup, notify=notify)
        if warmup:
            start = time.perf_counter()
            self.run([Task(single) for single in first])
            notify(f"warm-up image on {self.device} in {time.perf_counter() - start:.1f} s")

    def queued(self, mark: Mark) -> None:
        """A phase is queued up to ``mark``: wait while more than ``QUEUED_AHEAD`` are (across runs, so a server's
        next run is queued while the last one's images finish)."""
        self._queued.append(mark)
        while len(self._queued) > QUEUED_AHEAD:
            self._queued.popleft().wait()

    def close(self) -> None:
        """The last PNGs written; the writer thread ends (a new run starts another)."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def writer(self) -> ThreadPoolExecutor:
        """The one thread that encodes and writes this engine's PNGs, in order."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lensrun-writer")
        return self._writer

    # ------------------------------------------------------------------------------------------- internals
    def _prepare(self, requests: list[GenerationRequest], plans: list[memory.Plan] | None, say) -> list[memory.Plan]:
        """Plan (unless given), decide compilation (a compiled plan keeps CUDA graph pools), apply the first."""
        self._switch_when_compiled(say)
        if plans is None:
            plans, why = self.plans(requests, compiled=False)
            decision = self.decide_compile(requests, plans[0])
            if decision.compile and self.device.type == "cuda":
                plans, why = self.plans(requests, compiled=True)
            say(why)
        else:
            decision = self.decide_compile(requests, plans[0])
        self.last_decision = decision
        if decision.compile != self.pipe.compiled and self.compiling is None:
            say(decision.reason)
        self._apply(plans[0], decision.compile, say)
        return list(plans)

    def _apply(self, plan: memory.Plan, compile: bool, say=None) -> None:
        pipe = self.pipe
        if plan.precision != pipe.precision and pipe.precision != "bf16":
            raise LensrunError(f"the DiT is quantized to {pipe.precision}; this run needs {plan.precision}: start a new process")
        if plan.precision != pipe.precision and self.compiling is not None:
            raise LensrunError(f"this run needs the DiT in {plan.precision} while it compiles in bf16: start a new process")
        self._attention(plan, say)  # before compiling: the compiled blocks call this backend
        if compile and not pipe.compiled and self.compiling is None:
            key = self._compile_key(plan)
            _load_compile_artifacts(key)
            if self.background_compile and plan.placement == "resident":
                self.compiling = pipe.compile_in_background(fill_caches_first=self._fill_caches_first(plan, key))
                if say is not None:
                    say("compiling in the background; runs stay eager until it is ready")
            else:  # before placement: a stream plan wraps the blocks it streams
                pipe.optimize(compile=True, precision=pipe.precision)
        elif not compile and pipe.compiled:
            pipe.use_eager()
        pipe.apply_plan(plan, self.device)

    def _fill_caches_first(self, plan: memory.Plan, key: str) -> bool:
        """Empty compile caches on a GPU with room to spare: a child process fills them first (bf16 blocks, the
        only ones compiled in the background), so the side thread's compilation holds the lock briefly."""
        if self.device.type != "cuda" or plan.precision != "bf16":
            return False
        if _caches_warm(key):
            return False
        return torch.cuda.mem_get_info(self.device)[0] >= FILL_CACHES_MIN_FREE_GIB * 2**30

    def _attention(self, plan: memory.Plan, say) -> None:
        """The attention backend for this plan's precision (``lensrun.attention.resolve``), said when it changes;
        resolved again only when the asked backend or the precision changes (not on every run of a server)."""
        from lensrun import attention

        key = (self.options.attention, plan.precision)
        if key == self._attention_for:
            return
        self._attention_for = key
        backend, why = attention.resolve(self.options.attention, plan.precision, self.device, self.pipe.dtype)
        if backend != self.pipe.transformer.attention_backend:
            self.pipe.transformer.set_attention_backend(backend)
            self.pipe.step_graphs.reset()  # captured steps hold the old kernels
            if say is not None:
                say(why)

    def _switch_when_compiled(self, say) -> None:
        """Between runs: a finished background compilation takes over (a failed one is said, runs stay eager)."""
        job = self.compiling
        if job is None or not job.ready() or self.pipe.compiled:
            return
        if job.error is not None:
            say(f"background compilation failed ({job.error}); staying eager")
            self.compile_error = job.error
            self.pipe.transformer.compiled_gate = None  # its blocks stay eager; a later compilation starts afresh
        else:
            self.pipe.switch_to_compiled(job)
            say(f"compiled in the background in {job.seconds:.1f} s; runs are compiled from now on")
        self.compiling = None

    def _compile_key(self, plan: memory.Plan) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return compile_policy.cache_key(torch.__version__, __version__, name, str(self.pipe.dtype), plan.precision)

    def _remember_compilation(self) -> None:
        """After a compiled CUDA run: mark this machine's caches warm and keep torch's cache artifacts."""
        if not (self.pipe.compiled and self.device.type == "cuda"):
            return
        key = self._compile_key(self.pipe.plan)
        path = compile_policy.marker(_compile_folder(), key)
        if path.exists():
            return
        from lensrun.metadata import write_atomic

        try:
            artifacts = torch.compiler.save_cache_artifacts()
        except Exception:  # noqa: BLE001 - the artifact API is an optimisation; the on-disk caches remain
            artifacts = None
        if artifacts is not None:
            write_atomic(path.with_suffix(".bin"), lambda f: f.write(artifacts[0]))
        write_atomic(path, lambda f: f.write(f'{{"torch": "{torch.__version__}", "time": {time.time():.0f}}}'.encode()))


def _current_device(device: torch.device):
    """``device`` as the thread's current CUDA device (new events and streams belong to the current one)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _caches_warm(key: str) -> bool:
    """This machine has compiled for ``key`` before (torch's on-disk caches hold its graphs)."""
    return compile_policy.marker(_compile_folder(), key).exists()


def _compile_folder() -> Path:
    """Where the warm-cache markers and torch's cache artifacts live: lensrun's cache folder."""
    from lensrun.prompt_cache import default_cache_dir

    return default_cache_dir()


def _load_compile_artifacts(key: str) -> None:
    path = compile_policy.marker(_compile_folder(), key).with_suffix(".bin")
    if path.is_file():
        try:
            torch.compiler.load_cache_artifacts(path.read_bytes())
        except Exception:  # noqa: BLE001, S110 - stale or foreign artifacts: compile as if cold
            pass


def plans_for(
    device: torch.device,
    requests: list[GenerationRequest],
    options: EngineOptions,
    sizes: memory.ComponentSizes,
    compiled: bool,
) -> tuple[list[memory.Plan], str]:
    """The chosen plan and its OOM fallbacks for the most demanding of ``requests`` on this device and budget
    (CPU: resident, no budget), and a sentence saying what was chosen and why."""
    from lensrun.acceleration import check_precision

    placement, quantize, vram = options.placement, options.quantize, options.vram
    if quantize is not None:
        check_precision(quantize, device)
    if device.type != "cuda":
        if vram is not None or placement not in (None, "resident"):
            raise LensrunError("--vram and --placement apply to CUDA GPUs; this run is on the CPU")
        plan = memory.Plan(precision=quantize or "bf16")
        return [plan], f"plan {plan.name}: CPU run (weights in CPU memory, DiT not quantized), no GPU memory to plan"
    largest = max(requests, key=lambda r: r.tokens)
    steps = max(r.steps for r in requests)
    cfg = any(r.cfg != 1.0 for r in requests)
    budget = memory.parse_budget(vram) or memory.available_budget(device)
    precisions = (quantize,) if quantize else memory.PRECISIONS
    plan, preds = memory.choose(
        budget, largest.height, largest.width, steps=steps, cfg=cfg, precisions=precisions,
        allowed={"placement": placement}, graphs=compiled, sizes=sizes,
    )  # fmt: skip
    fallbacks = memory.fallbacks(plan, preds)[:2]
    chosen = next(p for p in preds if p.chosen)
    source = "--vram" if vram is not None else "free GPU memory"
    why = (
        f"plan {plan.name}: predicted peak {chosen.peak_bytes / memory.GIB:.1f} GiB of a {budget / memory.GIB:.1f} "
        f"GiB budget ({source}); the fastest of {sum(p.fits for p in preds)} plans that fit"
        + (f"; on out-of-memory: {', '.join(p.name for p in fallbacks)}" if fallbacks else "")
    )
    return [plan, *fallbacks], why


def size_groups(items: list, size: int, request_of: Callable = lambda r: r.task.request) -> list[list]:
    """Same-size images together (a compiled shape or captured step graph is reused), in order, at most ``size``
    a group: a run's results (a resident plan decodes each image as soon as it is denoised; a phased plan
    denoises up to GROUP_IMAGES before the VAE comes in), or a Ray gallery's chunks."""
    by_size: dict[tuple[int, int], list] = {}
    for item in items:
        request = request_of(item)
        by_size.setdefault((request.height, request.width), []).append(item)
    return [g[i : i + size] for g in by_size.values() for i in range(0, len(g), size)]


class _Run:
    """The state of one ``Engine.run``: results, conditions, latents, the plans left to fall back to."""

    def __init__(self, engine: Engine, tasks: list[Task], isolate: bool, on_result, say) -> None:
        self.engine = engine
        self.pipe = engine.pipe
        self.isolate = isolate
        self.on_result = on_result
        self.say = say
        self.plans: list[memory.Plan] = []
        self.errors: list[str] = []  # out-of-memory errors of this run, one per plan given up
        self.results = [Result(t) for t in tasks]
        self.conditions: dict[int, tuple] = {}
        self.latents: dict[int, torch.Tensor] = {}
        self.marks: dict[int, dict[str, tuple[Mark, Mark]]] = {}  # per image: phase → (start, end)
        self.encoding: tuple[Mark, Mark] | None = None
        self.encode_peak = (0, 0)  # bytes allocated / reserved at most while encoding (CUDA)
        self.writes: list[Future] = []
        self.writes_checked = 0  # writes before this index are done and checked (one writer: they finish in order)

    def fail(self, result: Result, err: Exception) -> None:
        if not self.isolate:
            raise err
        result.error = f"{type(err).__name__}: {err}"
        if self.on_result is not None:  # on the writer thread, like every other result: one caller at a time
            self.writes.append(self.engine.writer().submit(self.on_result, result))

    def each(self, phase: Callable, items: list[Result], work: Callable[[Result], None]) -> None:
        """``work`` on each item inside ``phase()``. After an out-of-memory error the phase is left (freeing
        what it brought in), the failed attempt's memory is returned, the next plan applied, and the failed item
        and the rest are tried again."""
        todo = [r for r in items if r.error is None]
        while todo:
            oom = None
            with phase():
                while todo:
                    before = self.allocated_gib()
                    try:
                        work(todo[0])
                    except torch.OutOfMemoryError as err:
                        oom = str(err).splitlines()[0][:200]
                        todo[0].report.setdefault("fallbacks", []).append(f"{self.plans[0].name}: {oom}")
                        break
                    except Cancelled:
                        raise
                    except Exception as err:  # noqa: BLE001 - recorded per image when isolating
                        self.fail(todo[0], err)
                    todo.pop(0)
            if oom is not None:
                plan = self.plans[0].name
                self.fall_back(oom)
                todo[0].report.setdefault("recoveries", []).append(
                    {"plan": plan, "allocated_before_gib": before, "allocated_after_cleanup_gib": self.allocated_gib()}
                )

    def allocated_gib(self) -> float:
        device = self.pipe.device
        return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0

    def fall_back(self, error: str) -> None:
        """Outside the ``except`` block (its traceback holds the failed step's tensors): free, then re-plan."""
        failed = self.plans.pop(0)
        self.errors.append(f"{failed.name}: {error}")
        gc.collect()
        if self.pipe.device.type == "cuda":
            torch.cuda.empty_cache()
        if not self.plans:
            raise LensrunError(f"out of memory under every plan tried: {'; '.join(self.errors)}")
        self.say(f"out of memory under plan {failed.name}; retrying with {self.plans[0].name}")
        self.engine._apply(self.plans[0], self.pipe.compiled)

    def encode(self) -> None:
        texts = [p for r in self.results for p in r.task.request.prompts_to_encode()]
        start = Mark(self.pipe.device)
        unique = {text for text, _ in texts}
        if unique:
            self.say(f"encoding {len(unique)} prompt(s)")

        group = self.pipe.parallel  # CFG-parallel: rank 0 encodes, the others receive the features

        def work(r: Result) -> None:
            features = None
            if group is None or group.leader:
                pos, neg = self.pipe.conditions(r.task.request)
                features = pos[0] + (neg[0] if neg is not None else [])
            if group is not None:
                features = group.share(features)
            k = len(features) if r.task.request.cfg == 1.0 else len(features) // 2
            self.conditions[id(r)] = (features[:k], features[k:] if r.task.request.cfg != 1.0 else None)

        encoding = self.pipe.encoding_phase if group is None or group.leader else lambda texts: contextlib.nullcontext()
        cuda = self.pipe.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.pipe.device)
        self.each(lambda: encoding(texts), self.results, work)
        self.encoding = (start, Mark(self.pipe.device))
        if cuda:  # each size group's denoise resets the peak; an image's peak still counts the encoding it needed
            self.encode_peak = (torch.cuda.max_memory_allocated(self.pipe.device), torch.cuda.max_memory_reserved(self.pipe.device))

    def denoise(self, group: list[Result], step: Callable[[int, int], None]) -> None:
        def work(r: Result) -> None:
            req = r.task.request
            start = Mark(self.pipe.device)
            kept = _load_latents(r.task.keep, self.pipe.device, self.pipe.dtype)
            on_step = lambda i, n: step(r, i, n)
            if kept is not None:  # denoised by an interrupted run; its steps are skipped
                self.latents[id(r)] = kept
                for i in range(req.steps):
                    on_step(i + 1, req.steps)
            else:
                noise = self.pipe.initial_noise(req.seed, req.grid, req.noise)
                self.latents[id(r)] = self.pipe.denoise(noise, *self.conditions[id(r)], req, on_step)
                if r.task.keep is not None:  # in self.writes: an interrupted run waits for it like for PNGs
                    self.writes.append(self.engine.writer().submit(_save_latents, r.task.keep, Download(self.latents[id(r)])))
            end = Mark(self.pipe.device)
            self.marks[id(r)] = {"denoise": (start, end)}
            self.engine.queued(end)

        if self.pipe.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.pipe.device)
        self.each(lambda: self.pipe.phase("denoise"), group, work)

    def decode(self, group: list[Result]) -> None:
        from lensrun.decoding import decode_tokens, to_pixels

        def work(r: Result) -> None:
            req = r.task.request
            if self.pipe.parallel is not None and not self.pipe.parallel.leader:
                self.latents.pop(id(r))  # rank 0 decodes and writes
                return
            start = Mark(self.pipe.device)
            pixels = Download(to_pixels(decode_tokens(self.pipe.vae, self.latents.pop(id(r)), req.grid))[0])
            end = Mark(self.pipe.device)
            self.marks[id(r)]["decode"] = (start, end)
            r.config = self.engine.recipe(req)
            r.report.update(plan=self.pipe.plan.name, compiled=self.pipe.compiled)
            r.report.setdefault("fallbacks", [])
            if self.pipe.device.type == "cuda":
                allocated = max(self.encode_peak[0], torch.cuda.max_memory_allocated(self.pipe.device))
                reserved = max(self.encode_peak[1], torch.cuda.max_memory_reserved(self.pipe.device))
                r.report["peak_allocated_gib"] = round(allocated / 2**30, 3)
                r.report["peak_reserved_gib"] = round(reserved / 2**30, 3)
            self.previous_write()
            self.writes.append(self.engine.writer().submit(self.finish, r, pixels))
            self.engine.queued(end)

        self.each(lambda: self.pipe.phase("decode"), [r for r in group if id(r) in self.latents], work)

    def finish(self, r: Result, pixels: Download) -> None:
        """On the writer thread: the image off the GPU, its phase times, the PNG (atomically), the kept latents
        gone, then ``on_result``."""
        from lensrun.decoding import pixels_to_pil
        from lensrun.metadata import save_png

        try:
            image = pixels_to_pil(pixels.result()[None])[0]
            r.report["seconds"] = self.seconds(r)
            if r.task.path is not None:
                save_png(image, r.task.path, r.config, r.report)
            if r.task.keep is not None:
                r.task.keep.unlink(missing_ok=True)
            r.image = image
        except Exception as err:  # isolating: this image failed, the run goes on
            if not self.isolate:
                raise
            r.error = f"{type(err).__name__}: {err}"
        if self.on_result is not None:
            self.on_result(r)

    def seconds(self, r: Result) -> dict[str, float]:
        """GPU time of each phase of this image (encoding: the run's, shared out per image)."""
        (start, end), marks = self.encoding, self.marks.pop(id(r))
        times = {"encode": end.seconds_since(start) / len(self.results)}
        times.update({phase: b.seconds_since(a) for phase, (a, b) in marks.items()})
        return {phase: round(t, 3) for phase, t in times.items()}

    def previous_write(self) -> None:
        """At most WRITES_IN_FLIGHT PNGs wait for the writer (images never pile up in memory, and one slow write
        does not stall the GPU); a Ctrl-C or exit raised in a finished write stops the run here."""
        excess = len(self.writes) - self.writes_checked - WRITES_IN_FLIGHT + 1
        if excess > 0:
            futures.wait(self.writes[self.writes_checked : self.writes_checked + excess])
        while self.writes_checked < len(self.writes) and self.writes[self.writes_checked].done():
            error = self.writes[self.writes_checked].exception()
            self.writes_checked += 1
            if error is not None and not isinstance(error, Exception):
                raise error

    def wait_for_writes(self) -> None:
        """Every PNG of this run on disk; the first write error raised (isolating runs record theirs instead)."""
        for write in self.writes:
            write.result()


def _save_latents(path: Path, latents: Download) -> None:
    """On the writer thread, before the image's PNG (whose writing removes the file again). Keeping latents only
    saves work on a resume: a failed write leaves the image to be denoised again then, never fails it."""
    from safetensors.torch import save

    from lensrun.metadata import write_atomic

    with contextlib.suppress(OSError):
        write_atomic(path, lambda f: f.write(save({"latents": latents.result().contiguous()})))


def _load_latents(path: Path | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """Latents kept by an interrupted run (safetensors only); None when there are none or they are unreadable."""
    if path is None or not path.is_file():
        return None
    from safetensors.torch import load

    try:
        return load(path.read_bytes())["latents"].to(device, dtype)
    except Exception:  # noqa: BLE001 - a damaged leftover is recomputed, never trusted
        path.unlink(missing_ok=True)
        return None

