"""The Python API: ``generate``, ``replay``, ``gallery``, ``plan_report``, each a thin shell over ``Engine``.

Their keywords are the options of ``lensrun.request`` (``GenerationRequest`` and ``EngineOptions``): the same
names as the CLI flags, the server's request fields and the gallery's entry keys.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from lensrun.errors import LensrunError
from lensrun.request import EngineOptions, GenerationRequest, config_options, option_specs, split_options


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def _unique(path: Path, taken: set[Path]) -> Path:
    k = 1
    candidate = path
    while candidate.exists() or candidate in taken:
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
        k += 1
    taken.add(candidate)
    return candidate


def _output_folder(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LensrunError(f"output path {out} exists and is not a folder")
    return out


def generate(prompt: str | list[str], *, out: str | Path = "outputs", show_progress: bool = False, notify=None, **options) -> list[Path]:
    """Generate and save PNGs (each with its full config and a run report) under ``out``; returns their paths.

    Every option is validated, the model folder checked and the memory plan chosen before any weights are read.
    """
    from lensrun.engine import Engine, Task, model_variant, resolve_device

    request_options, engine_options = split_options(options)
    engine_opts = EngineOptions(**engine_options).resolved()
    resolve_device(engine_opts.device)
    request = GenerationRequest.build(prompt=prompt, default_variant=model_variant(engine_opts), **request_options)
    out = _output_folder(out)
    singles = request.images()
    taken: set[Path] = set()
    tasks = []
    for index, single in enumerate(singles):
        p, k = divmod(index, request.n)
        tasks.append(Task(single, _unique(out / f"p{p:03d}_s{k:02d}_{_slug(single.prompts[0])}_{single.seed}.png", taken)))
    if engine_opts.gpus > 1:
        from lensrun import parallel

        parallel.check_gpus(engine_opts.gpus, engine_opts.device, engine_opts.split)
        mode = parallel.mode_for(tasks, engine_opts.gpus, engine_opts.split)
        if mode == "cfg" or engine_opts.split != "auto":
            parallel.launch(engine_opts, tasks, notify, show_progress, mode=mode)
            return [t.path for t in tasks]
        if notify is not None:
            notify(parallel.ONE_GPU_INSTEAD)
    engine = Engine.shared(engine_opts, singles, notify)
    results = engine.run(tasks, notify=notify, progress=show_progress)
    return [r.task.path for r in results]


def replay(
    image: str | Path,
    *,
    out: str | Path | None = None,
    model: str | None = None,
    device: str | None = None,
    entry: str | None = None,
    show_progress: bool = False,
    notify=None,
    check: bool = False,
) -> Path:
    """Regenerate an image from the config stored in it, or in a gallery manifest row (``entry`` picks the row);
    ``model`` overrides where the weights live. ``notify`` hears when the weights differ from the image's;
    ``check``: compare the new pixels with the source image and say how they differ."""
    from lensrun.metadata import read_config

    source = Path(image)
    if str(image).endswith(".jsonl"):
        from lensrun.gallery import manifest_config

        config = manifest_config(image, entry)
        source = Path(image).parent / config.get("_file", "")
    else:
        config = read_config(image)
    if config.get("seed") is None:
        raise LensrunError(f"{image} was made from an explicit generator or latents; its noise cannot be replayed")
    request = config_options(config)
    say = notify or (lambda message: None)
    attention = _replay_attention(config.get("attention", "sdpa"), device, say)
    paths = generate(
        request.pop("prompt"), out=out or Path(image).parent / "replay", model=model or config["model"],
        dtype=config["dtype"], device=device, quantize=config.get("quantize", "bf16"), show_progress=show_progress,
        notify=notify, transformer=config.get("transformer"), text_encoder=config.get("text_encoder"),
        vae=config.get("vae"), attention=attention, **request,
    )  # fmt: skip
    made_with, replayed_with = config.get("weights"), read_config(paths[0]).get("weights")
    if made_with is not None and made_with != replayed_with:
        say(f"warning: the image was made with other weights (fingerprint {made_with}, now {replayed_with}): "
            "its pixels may differ")  # fmt: skip
    if check:
        say(compare_images(source, paths[0]))
    return paths[0]


def _replay_attention(recorded: str, device: str | None, say) -> str:
    """The attention backend the image was made with, or SDPA (said) where that one cannot run."""
    from lensrun import attention
    from lensrun.engine import resolve_device

    if attention.installed(recorded) and attention.supported(recorded, resolve_device(device)):
        return recorded
    say(f"warning: the image was made with the {recorded} attention kernel, which cannot run here; using sdpa "
        "(pixels may differ slightly)")  # fmt: skip
    return "sdpa"


def compare_images(a: Path, b: Path) -> str:
    """'identical', or how many pixels differ and by how much at most (of 255)."""
    import numpy as np
    from PIL import Image

    if not a.is_file():
        return f"check: {a} is not there to compare with"
    with Image.open(a) as ia, Image.open(b) as ib:
        x, y = np.asarray(ia.convert("RGB"), dtype=np.int16), np.asarray(ib.convert("RGB"), dtype=np.int16)
    if x.shape != y.shape:
        return f"check: sizes differ ({x.shape[1]}x{x.shape[0]} vs {y.shape[1]}x{y.shape[0]})"
    diff = np.abs(x - y)
    if not diff.any():
        return f"check: identical to {a.name}"
    return f"check: {int((diff.max(axis=-1) > 0).sum())} pixels differ from {a.name}, by at most {int(diff.max())} of 255"


def plan_report(vram: str | float, compile: bool = True, **options) -> str:
    """The table of ``lensrun plan``: every plan's predicted peak and speed for this budget; no GPU needed.
    ``compile``: plan for a compiled run (CUDA graph pools kept after their phase)."""
    from lensrun import memory
    from lensrun.engine import model_sizes, single_files
    from lensrun.request import check_placement, normalize_precision

    request_options, engine_options = split_options(options)
    engine_opts = EngineOptions(**engine_options).resolved()
    req = GenerationRequest.build(need_prompt=False, **request_options)
    check_placement(engine_opts.placement)
    budget = memory.parse_budget(vram)
    quantize = engine_opts.quantize
    precisions = (normalize_precision(quantize),) if quantize else memory.PRECISIONS
    experts = "nvfp4" if single_files(engine_opts)["text_encoder"] else "mxfp4"  # ComfyUI's encoder file
    preds = memory.plan_table(
        budget, req.height, req.width, steps=req.steps, cfg=req.cfg != 1.0, precisions=precisions,
        allowed={"placement": engine_opts.placement}, graphs=compile, sizes=model_sizes(engine_opts.model, None, experts),
    )  # fmt: skip
    head = f"Lens {req.variant}, {req.width}x{req.height}, {req.steps} steps, CFG {req.cfg:g}"
    if not any(p.chosen for p in preds):
        head += "\nno plan fits this budget (see the leanest below)"
    return head + "\n" + memory.format_table(preds, budget)


def gallery(
    file: str | Path, *, out: str | Path, ray: str | None = None, workers: int | None = None, show_progress: bool = False,
    notify=None, **options,
) -> dict:
    """Render a gallery file into ``out`` (see ``lensrun.gallery``); request options are defaults for its
    entries, below the file's own ``[defaults]``. Returns the summary: done / skipped / failed and the index."""
    import lensrun.gallery as g
    from lensrun.engine import model_variant, resolve_device

    request_options, engine_options = split_options(options)
    engine_opts = EngineOptions(**engine_options).resolved()
    if ray is None:  # a Ray driver may have no GPU of its own: its workers check theirs
        resolve_device(engine_opts.device)
    elif workers is not None and workers < 1:
        raise LensrunError(f"--workers must be 1 or more, got {workers}")
    one_gpu_only(engine_opts, "a gallery")
    entries = g.load_gallery(file, {k: v for k, v in request_options.items() if v is not None}, variant=model_variant(engine_opts))
    if ray is not None:
        from lensrun.ray_gallery import run_gallery_ray

        summary = run_gallery_ray(engine_opts, entries, out, address=ray, workers=workers, notify=notify)
    else:
        summary = g.run_gallery(engine_opts, entries, out, show_progress=show_progress, notify=notify)
    return {**summary, "index": str(Path(out) / "index.html")}


def one_gpu_only(options: EngineOptions, what: str) -> None:
    if options.gpus > 1:
        raise LensrunError(f"--gpus {options.gpus}: {what} runs on one GPU for now; --gpus splits one image's CFG branches (generate)")


def _with_options(fn, *names_first: str) -> None:
    """Show every option as a keyword in ``help(fn)`` / ``inspect.signature`` (they arrive as ``**options``)."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    have = {p.name for p in params}
    for cls in (GenerationRequest, EngineOptions):
        for spec in option_specs(cls):
            if spec.name not in have and spec.name not in names_first:
                params.append(inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=spec.default))
                have.add(spec.name)
    fn.__signature__ = sig.replace(parameters=params)


_with_options(generate, "prompt")
_with_options(gallery, "prompt")
