"""The high-level Python API; each keyword here is one CLI option (``lensrun generate --help``)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lensrun import __version__, loading, memory
from lensrun.acceleration import check_precision, normalize_precision
from lensrun.errors import LensrunError
from lensrun.metadata import read_config, save_png
from lensrun.pipeline import DEFAULT_MODEL, TINY_MODEL, LensPipeline
from lensrun.prompting import DEFAULT_TEMPLATE_DATE
from lensrun.request import GenerationRequest, check_dtype, infer_variant

_PIPELINES: dict[tuple, LensPipeline] = {}


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LensrunError(f"unknown device '{device}': use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LensrunError(f"device '{device}' asked for, but no CUDA GPU is available")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """The asked dtype, or bf16 on CUDA and fp32 on the CPU."""
    return check_dtype(dtype or ("bfloat16" if device.type == "cuda" else "float32"))


def resolve_compile(compile: bool | None, device: torch.device) -> bool:
    """The asked choice, or compiled on CUDA (where CUDA graphs then pay off) and eager on the CPU."""
    return compile if compile is not None else device.type == "cuda"


def load_pipeline(
    model: str, variant: str | None, dtype: torch.dtype, device: torch.device, precision: str = "bf16"
) -> LensPipeline:
    """Load once per (model, variant, dtype, device, DiT precision) in this process, into CPU memory: the plan
    then decides what goes onto the GPU and when."""
    key = (str(model), variant, dtype, str(device), precision)
    if key not in _PIPELINES:
        _PIPELINES.clear()  # one model in memory at a time
        pipe = LensPipeline.from_pretrained(model, variant=variant, dtype=dtype, device="cpu")
        pipe._device = device
        _PIPELINES[key] = pipe
    return _PIPELINES[key]


def plans_for(
    device: torch.device,
    height: int,
    width: int,
    steps: int,
    cfg: float,
    vram: str | float | None = None,
    placement: str | None = None,
    quantize: str | None = None,
    compiled: bool = False,
) -> tuple[list[memory.Plan], str]:
    """The chosen plan and its OOM fallbacks for this device and budget (CPU: resident, no budget), and a
    sentence saying what was chosen and why. ``compiled``: the pipeline will be compiled (CUDA graph pools)."""
    memory.check_placement(placement)
    if quantize is not None:
        check_precision(quantize, device)
    if device.type != "cuda":
        if vram is not None or placement not in (None, "resident"):
            raise LensrunError("--vram and --placement apply to CUDA GPUs; this run is on the CPU")
        plan = memory.Plan(precision=quantize or "bf16")
        return [plan], f"plan {plan.name}: CPU run, no GPU memory to plan"
    budget = memory.parse_budget(vram) or memory.available_budget(device)
    precisions = (quantize,) if quantize else memory.PRECISIONS
    plan, preds = memory.choose(
        budget, height, width, steps=steps, cfg=cfg != 1.0, precisions=precisions, allowed={"placement": placement},
        graphs=compiled,
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


def _memory_overrides(
    placement: str | None, quantize: str | None, offload: bool, quant_transformer: str | None
) -> tuple[str | None, str | None]:
    """Fold the field report's spellings (``offload``, ``quant_transformer``) into placement / precision."""
    if offload:
        if placement not in (None, "offload"):
            raise LensrunError(f"--offload conflicts with --placement {placement}")
        placement = "offload"
    if quant_transformer is not None and quantize is not None and normalize_precision(quant_transformer) != normalize_precision(quantize):
        raise LensrunError("--quant_transformer and --quantize disagree; give one")
    chosen = quantize or quant_transformer
    return placement, normalize_precision(chosen) if chosen else None


def _ready_pipeline(
    model: str, variant: str, dtype: torch.dtype, device: torch.device, plans: list[memory.Plan], compile: bool
) -> LensPipeline:
    """Check the model folder, load (once per process), compile if asked."""
    if str(model) != TINY_MODEL:
        loading.check_layout(loading.resolve_model(model))
    pipe = load_pipeline(str(model), variant, dtype, device, plans[0].precision)
    if compile:
        pipe.optimize(compile=True)
    return pipe


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def _unique(path: Path) -> Path:
    k = 1
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
        k += 1
    return candidate


def generate(
    prompt: str | list[str],
    *,
    model: str = DEFAULT_MODEL,
    variant: str | None = None,
    negative_prompt: str | None = None,
    base_resolution: int | None = None,
    aspect_ratio: str | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    cfg: float | None = None,
    seed: int | None = None,
    n: int = 1,
    out: str | Path = "outputs",
    dtype: str | None = None,
    device: str | None = None,
    noise: str = "cpu",
    template_date: str = DEFAULT_TEMPLATE_DATE,
    vram: str | float | None = None,
    placement: str | None = None,
    quantize: str | None = None,
    offload: bool = False,
    quant_transformer: str | None = None,
    compile: bool | None = None,
    cache: float | None = None,
    show_progress: bool = False,
    notify=None,
) -> list[Path]:
    """Generate and save PNGs (each with its full config and a run report) under ``out``; returns their paths.

    All input is validated, the model folder checked and the memory plan chosen before any weights are read.
    ``offload`` and ``quant_transformer`` are the field report's spellings of ``placement="offload"`` and
    ``quantize``; ``compile`` defaults to on for CUDA.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    variant = variant or infer_variant(str(model))
    placement, quantize = _memory_overrides(placement, quantize, offload, quant_transformer)
    req = GenerationRequest.build(
        prompt, negative_prompt, height, width, base_resolution, aspect_ratio, steps, cfg, n, seed, noise, variant,
        template_date, cache=cache,
    )  # fmt: skip
    compile = resolve_compile(compile, torch_device)
    plans, why = plans_for(torch_device, req.height, req.width, req.steps, req.cfg, vram, placement, quantize, compile)
    if notify is not None:
        notify(why)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LensrunError(f"output path {out} exists and is not a folder")
    pipe = _ready_pipeline(model, variant, torch_dtype, torch_device, plans, compile)
    result = pipe.run_planned(
        plans, notify=notify, prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
        base_resolution=base_resolution, aspect_ratio=aspect_ratio, num_inference_steps=steps, guidance_scale=cfg,
        num_images_per_prompt=n, seed=req.seed, noise=noise, template_date=template_date, cache=cache,
        show_progress=show_progress,
    )  # fmt: skip
    paths = []
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    for i, (image, config) in enumerate(zip(result.images, result.configs, strict=True)):
        config = {**config, "lensrun_version": __version__}
        p, k = divmod(i, n)
        path = _unique(out / f"p{p:03d}_s{k:02d}_{_slug(prompts[p])}_{config['seed']}.png")
        save_png(image, path, config, result.report)
        paths.append(path)
    return paths


def replay(
    image: str | Path,
    *,
    out: str | Path | None = None,
    model: str | None = None,
    device: str | None = None,
    entry: str | None = None,
    show_progress: bool = False,
) -> Path:
    """Regenerate an image from the config stored in it, or in a gallery manifest row (``entry`` picks the row);
    ``model`` overrides where the weights live."""
    if str(image).endswith(".jsonl"):
        from lensrun.gallery import manifest_config

        config = manifest_config(image, entry)
    else:
        config = read_config(image)
    if config.get("seed") is None:
        raise LensrunError(f"{image} was made from an explicit generator or latents; its noise cannot be replayed")
    explicit_size = config.get("base_resolution") is None
    paths = generate(
        config["prompt"],
        model=model or config["model"],
        variant=config["variant"],
        negative_prompt=config.get("negative_prompt", ""),
        base_resolution=config.get("base_resolution"),
        aspect_ratio=config.get("aspect_ratio"),
        height=config["height"] if explicit_size else None,
        width=config["width"] if explicit_size else None,
        steps=config["steps"],
        cfg=config["cfg"],
        seed=config["seed"],
        n=1,
        out=out or Path(image).parent / "replay",
        dtype=config["dtype"],
        device=device,
        noise=config.get("noise", "cpu"),
        template_date=config.get("template_date", DEFAULT_TEMPLATE_DATE),
        quantize=config.get("quantize", "bf16"),
        cache=config.get("cache"),
        show_progress=show_progress,
    )
    return paths[0]


def plan_report(
    vram: str | float,
    base_resolution: int | None = None,
    aspect_ratio: str | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    cfg: float | None = None,
    variant: str = "lens",
    placement: str | None = None,
    quantize: str | None = None,
    compile: bool = True,
) -> str:
    """The table of ``lensrun plan``: every plan's predicted peak and speed for this budget; no GPU needed.
    ``compile`` as ``generate`` will run (its default on a GPU: compiled, with CUDA graph pools)."""
    req = GenerationRequest.build(
        "", None, height, width, base_resolution, aspect_ratio, steps, cfg, variant=variant, need_prompt=False
    )
    memory.check_placement(placement)
    budget = memory.parse_budget(vram)
    precisions = (normalize_precision(quantize),) if quantize else memory.PRECISIONS
    preds = memory.plan_table(
        budget, req.height, req.width, steps=req.steps, cfg=req.cfg != 1.0, precisions=precisions,
        allowed={"placement": placement}, graphs=compile,
    )  # fmt: skip
    head = f"Lens {variant}, {req.width}x{req.height}, {req.steps} steps, CFG {req.cfg:g}"
    if not any(p.chosen for p in preds):
        head += "\nno plan fits this budget (see the leanest below)"
    return head + "\n" + memory.format_table(preds, budget)


def gallery(
    file: str | Path,
    *,
    out: str | Path,
    model: str = DEFAULT_MODEL,
    variant: str | None = None,
    negative_prompt: str | None = None,
    base_resolution: int | None = None,
    aspect_ratio: str | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    cfg: float | None = None,
    seed: int | None = None,
    n: int = 1,
    dtype: str | None = None,
    device: str | None = None,
    noise: str = "cpu",
    template_date: str = DEFAULT_TEMPLATE_DATE,
    vram: str | float | None = None,
    placement: str | None = None,
    quantize: str | None = None,
    offload: bool = False,
    quant_transformer: str | None = None,
    compile: bool | None = None,
    cache: float | None = None,
    show_progress: bool = False,
) -> dict:
    """Render a gallery file into ``out`` (see ``lensrun.gallery``); the keywords are defaults for its entries,
    below the file's own ``[defaults]``. Returns the summary: done / skipped / failed and the index path."""
    import lensrun.gallery as g

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    given = dict(variant=variant, negative_prompt=negative_prompt, base_resolution=base_resolution,
                 aspect_ratio=aspect_ratio, height=height, width=width, steps=steps, cfg=cfg, seed=seed, n=n)  # fmt: skip
    entries = g.load_gallery(file, {k: v for k, v in given.items() if v is not None})
    common = dict(noise=noise, template_date=template_date, cache=cache)
    GenerationRequest.build("x", noise=noise, template_date=template_date, cache=cache)
    placement, quantize = _memory_overrides(placement, quantize, offload, quant_transformer)
    largest = max((g.entry_request(e.settings, "lens") for e in entries), key=lambda r: r.height * r.width)
    compile = resolve_compile(compile, torch_device)
    plans, _ = plans_for(torch_device, largest.height, largest.width, 50, 5.0, vram, placement, quantize, compile)
    pipe = _ready_pipeline(model, variant or infer_variant(str(model)), torch_dtype, torch_device, plans, compile)
    pipe.apply_plan(plans[0], torch_device)
    summary = g.run_gallery(pipe, entries, out, show_progress=show_progress, common=common)
    return {**summary, "index": str(Path(out) / "index.html")}
