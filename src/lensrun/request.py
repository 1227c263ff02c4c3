"""What a user can ask for, defined once: each option's type, default, allowed values and help.

``GenerationRequest`` holds the options of the images themselves (prompt, size, steps, …); ``EngineOptions``
those of the run (model, device, memory, compilation). The CLI flags, the Python API's keywords, the server's
request schema and the gallery's entry keys are all derived from these two dataclasses, so a new option is one
edit here. Everything is validated before a model is touched, so bad input costs nothing and writes nothing.
"""

from __future__ import annotations

import dataclasses
import math
import re
import secrets
import types
import typing
from dataclasses import dataclass, field

import torch

from lensrun.errors import LensrunError
from lensrun.prompting import DEFAULT_TEMPLATE_DATE

# (height, width) per aspect-ratio key (width:height) for each base resolution (LENS_SPEC §7).
BUCKETS: dict[int, dict[str, tuple[int, int]]] = {
    1024: {
        "1:2": (1472, 736), "9:16": (1376, 768), "2:3": (1248, 832), "3:4": (1152, 864), "1:1": (1024, 1024),
        "4:3": (864, 1152), "3:2": (832, 1248), "16:9": (768, 1376), "2:1": (736, 1472),
    },
    1440: {
        "1:2": (2080, 1040), "9:16": (1936, 1088), "2:3": (1760, 1168), "3:4": (1616, 1216), "1:1": (1440, 1440),
        "4:3": (1216, 1616), "3:2": (1168, 1760), "16:9": (1088, 1936), "2:1": (1040, 2080),
    },
}  # fmt: skip
ASPECT_RATIOS = tuple(BUCKETS[1024])
BASE_RESOLUTIONS = tuple(BUCKETS)
DEFAULT_MODEL = "microsoft/Lens"
TINY_MODEL = "tiny-random"
DEFAULT_BASE_RESOLUTION = 1024
DEFAULT_ASPECT_RATIO = "1:1"
MAX_SIDE = 4096  # RoPE positions stay far inside the model's tables
SEED_LIMIT = 2**63


@dataclass(frozen=True)
class Variant:
    name: str
    steps: int
    cfg: float


VARIANTS = {
    "lens": Variant("lens", 20, 5.0),
    "turbo": Variant("turbo", 4, 1.0),
    "base": Variant("base", 50, 5.0),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
NOISE_SOURCES = ("cpu", "device")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
PLACEMENTS = ("resident", "phased", "offload", "stream")
PRECISIONS = ("bf16", "fp8", "fp8-weight", "int8-weight", "int4-weight")
ATTENTION_BACKENDS = ("sdpa", "fa3", "fa3-fp8", "sage")  # lensrun.attention says what each is
# Spellings users know from the field report / torchao names.
PRECISION_ALIASES = {
    "float8_weight_only": "fp8-weight",
    "int8_weight_only": "int8-weight",
    "int4_weight_only": "int4-weight",
    "float8_dynamic": "fp8",
    "none": "bf16",
}


def option(default=None, help: str = "", *, choices: tuple | None = None, example=None, flag: str | None = None):
    """A dataclass field that is also a user option: ``example`` is a valid non-default value (tests send it
    through every surface); ``flag`` overrides the CLI spelling ``--name-with-dashes``."""
    meta = {"help": help, "choices": choices, "example": example, "flag": flag}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionSpec:
    """One option as the surfaces see it: name, scalar type, whether it repeats, default, choices, help."""

    name: str
    type: type
    repeated: bool
    default: object
    choices: tuple | None
    help: str
    example: object
    flag: str


def option_specs(cls: type) -> list[OptionSpec]:
    """The options of ``GenerationRequest`` or ``EngineOptions``, in definition order."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        scalar = next(a for a in typing.get_args(hint) if a is not type(None)) if union else hint
        repeated = typing.get_origin(scalar) in (list, tuple)
        if repeated:
            scalar = typing.get_args(scalar)[0]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        m = f.metadata
        flag = m.get("flag") or "--" + f.name.replace("_", "-")
        specs.append(OptionSpec(f.name, scalar, repeated, default, m.get("choices"), m.get("help", ""), m.get("example"), flag))
    return specs


def infer_variant(model: str) -> str:
    """Variant from a repo id or folder name: '…Turbo…' → turbo, '…-Base' → base, else lens."""
    name = re.split(r"[\\/]", str(model).rstrip("/\\"))[-1].lower()
    if "turbo" in name:
        return "turbo"
    if re.search(r"(^|[-_])base($|[-_])", name):
        return "base"
    return "lens"


def check_variant(variant: str | None) -> None:
    if variant is not None and variant not in VARIANTS:
        raise LensrunError(f"unknown variant '{variant}': choose one of {', '.join(VARIANTS)}")


def check_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise LensrunError(f"unsupported dtype {dtype}: choose one of {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise LensrunError(f"unsupported dtype '{dtype}': choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def normalize_precision(precision: str) -> str:
    precision = PRECISION_ALIASES.get(precision, precision)
    if precision not in PRECISIONS:
        raise LensrunError(f"unknown DiT precision '{precision}': choose one of {', '.join(PRECISIONS)}")
    return precision


def check_placement(placement: str | None) -> None:
    if placement is not None and placement not in PLACEMENTS:
        raise LensrunError(f"unknown placement '{placement}': choose one of {', '.join(PLACEMENTS)}")


def resolve_size(
    height: int | None, width: int | None, base_resolution: int | None, aspect_ratio: str | None
) -> tuple[int, int]:
    """Explicit height/width (multiples of 16) win; else the bucket of (base_resolution, aspect_ratio)."""
    if (height is None) != (width is None):
        raise LensrunError("give both height and width, or neither (then base resolution and aspect ratio apply)")
    if height is not None:
        for label, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 16 or v % 16:
                raise LensrunError(f"{label} {v} is not a positive multiple of 16 (Lens works on 16-pixel patches)")
            if v > MAX_SIDE:
                raise LensrunError(f"{label} {v} is larger than {MAX_SIDE}")
        return height, width
    base = DEFAULT_BASE_RESOLUTION if base_resolution is None else base_resolution
    if base not in BUCKETS:
        raise LensrunError(f"base resolution {base} is not supported: choose 1024 or 1440")
    ratio = DEFAULT_ASPECT_RATIO if aspect_ratio is None else aspect_ratio
    if ratio not in BUCKETS[base]:
        raise LensrunError(f"unknown aspect ratio '{ratio}': choose one of {', '.join(ASPECT_RATIOS)}")
    return BUCKETS[base][ratio]


def draw_seed() -> int:
    return secrets.randbelow(2**31)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """The images asked for. ``build`` validates and resolves presets; a built request has every value concrete
    (size from the bucket, steps/CFG from the variant, a drawn seed), and ``images()`` splits it into one
    request per image, each of which regenerates its image alone."""

    prompt: tuple[str, ...] = option((), "prompt (repeat for several)", example=("a red fox",))
    negative_prompt: str = option("", "negative prompt (empty = no text for the unconditional pass)", example="blur")
    variant: str | None = option(
        None, "lens (20 steps, CFG 5), turbo (4, 1.0), base (50, 5.0); default: inferred from the model name",
        choices=tuple(VARIANTS), example="base",
    )  # fmt: skip
    base_resolution: int | None = option(
        None, f"bucket base resolution (default {DEFAULT_BASE_RESOLUTION})", choices=BASE_RESOLUTIONS, example=1440
    )
    aspect_ratio: str | None = option(
        None, f"bucket aspect ratio (default {DEFAULT_ASPECT_RATIO})", choices=ASPECT_RATIOS, example="16:9"
    )
    height: int | None = option(None, "pixels, multiple of 16 (with width; wins over the bucket)", example=48)
    width: int | None = option(None, "pixels, multiple of 16 (with height)", example=64)
    steps: int | None = option(None, "denoising steps; default: the variant's preset", example=9)
    cfg: float | None = option(None, "guidance scale; default: the variant's preset", example=2.5)
    seed: int | None = option(None, "-1 or absent: random (the drawn seed is recorded)", example=1234)
    n: int = option(1, "images per prompt (image k uses seed + k)", example=2)
    noise: str = option("cpu", "where the seed's noise is drawn", choices=NOISE_SOURCES, example="device")
    template_date: str = option(DEFAULT_TEMPLATE_DATE, "date written into the chat template", example="2026-01-02")
    cache: float | None = option(None, "step-cache threshold (opt-in, e.g. 0.05; not Turbo)", example=0.05)

    @classmethod
    def build(cls, *, default_variant: str = "lens", need_prompt: bool = True, **options) -> GenerationRequest:
        """Validate and fill defaults (``default_variant``: the model's). Unknown keywords are refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise LensrunError(f"unknown option(s) {unknown}; allowed: {', '.join(sorted(names))}")
        o = {**{s.name: s.default for s in option_specs(cls)}, **{k: v for k, v in options.items() if v is not None}}
        prompt = o["prompt"]
        prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt or ())
        if need_prompt and not prompts:
            raise LensrunError("no prompt given")
        if any(not isinstance(p, str) for p in prompts):
            raise LensrunError("prompts must be strings")
        if need_prompt and any(not p.strip() for p in prompts):
            raise LensrunError("prompt is empty: describe the image")
        bucket = [k for k in ("base_resolution", "aspect_ratio") if o[k] is not None]
        if (o["height"] is not None or o["width"] is not None) and bucket:
            given = " and ".join(k.replace("_", " ") for k in bucket)
            raise LensrunError(f"height/width and {given} both given: an explicit size replaces the bucket, give one")
        if not isinstance(o["negative_prompt"], str):
            raise LensrunError("negative prompt must be a string")
        variant = o["variant"] or default_variant
        check_variant(variant)
        preset = VARIANTS[variant]
        h, w = resolve_size(o["height"], o["width"], o["base_resolution"], o["aspect_ratio"])
        steps = preset.steps if o["steps"] is None else o["steps"]
        if not _is_int(steps) or steps < 1:
            raise LensrunError(f"steps must be an integer ≥ 1, got {steps}")
        cfg = preset.cfg if o["cfg"] is None else o["cfg"]
        if not isinstance(cfg, (int, float)) or isinstance(cfg, bool) or not math.isfinite(cfg) or cfg < 0:
            raise LensrunError(f"cfg must be a finite number ≥ 0, got {cfg}")
        n = o["n"]
        if not _is_int(n) or n < 1:
            raise LensrunError(f"n (images per prompt) must be an integer ≥ 1, got {n}")
        seed = o["seed"]
        if seed is not None and (not _is_int(seed) or seed < -1 or seed >= SEED_LIMIT):
            raise LensrunError(f"seed must be an integer in [0, 2^63) or -1 for random, got {seed}")
        count = max(1, len(prompts)) * n
        if seed is not None and seed >= 0 and seed + count - 1 >= SEED_LIMIT:
            raise LensrunError(
                f"seed {seed} with {count} images would give seeds up to {seed + count - 1}, past 2^63 - 1: "
                f"use a seed below {SEED_LIMIT - count + 1}"
            )
        if o["noise"] not in NOISE_SOURCES:
            raise LensrunError(f"noise must be one of {', '.join(NOISE_SOURCES)}, got '{o['noise']}'")
        if not isinstance(o["template_date"], str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", o["template_date"]):
            raise LensrunError(f"template date must look like YYYY-MM-DD, got '{o['template_date']}'")
        cache = o["cache"]
        if cache is not None:
            if not isinstance(cache, (int, float)) or isinstance(cache, bool) or not 0 < cache < 1:
                raise LensrunError(f"cache threshold must be in (0, 1), e.g. 0.05; got {cache}")
            if variant == "turbo" or steps < 8:
                raise LensrunError("the step cache is for 8+ step runs (Lens 20, Base 50); Turbo has no steps to spare")
        explicit_size = o["height"] is not None
        return cls(
            prompt=prompts,
            negative_prompt=o["negative_prompt"],
            variant=variant,
            base_resolution=None if explicit_size else (o["base_resolution"] or DEFAULT_BASE_RESOLUTION),
            aspect_ratio=None if explicit_size else (o["aspect_ratio"] or DEFAULT_ASPECT_RATIO),
            height=h,
            width=w,
            steps=steps,
            cfg=float(cfg),
            seed=draw_seed() if seed is None or seed == -1 else seed,
            n=n,
            noise=o["noise"],
            template_date=o["template_date"],
            cache=None if cache is None else float(cache),
        )

    @property
    def prompts(self) -> tuple[str, ...]:
        return self.prompt

    @property
    def grid(self) -> tuple[int, int]:
        """Latent token grid (each token is a 16×16 pixel patch)."""
        return self.height // 16, self.width // 16

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def prompts_to_encode(self, embeds_given: bool = False, negative_embeds_given: bool = False) -> list[tuple[str, str]]:
        """(text, template date) pairs this request needs from the encoder; an empty negative needs none."""
        texts = [] if embeds_given else list(self.prompts)
        if self.cfg != 1.0 and not negative_embeds_given and self.negative_prompt.strip():
            texts.append(self.negative_prompt)
        return [(text, self.template_date) for text in texts]

    def images(self) -> list[GenerationRequest]:
        """One request per image (prompt-major; image k of prompt p has seed + p·n + k)."""
        return [
            dataclasses.replace(self, prompt=(p,), n=1, seed=self.seed + i * self.n + k)
            for i, p in enumerate(self.prompts)
            for k in range(self.n)
        ]

    def record(self) -> dict:
        """The settings stored with a single image (its recipe, with the run's model settings added)."""
        assert len(self.prompts) == 1 and self.n == 1, "record() is for single-image requests (see images())"
        d = dataclasses.asdict(self)
        d["prompt"] = self.prompts[0]
        return d


# How several GPUs share one image (lensrun.parallel): the CFG branches, the image tokens, or both.
SPLITS = ("auto", "cfg", "sequence", "cfg+sequence")


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """How a run uses the machine: which weights, where, in which precision, compiled or not."""

    model: str = option(
        DEFAULT_MODEL, f"diffusers folder, Hub repo id, ComfyUI models folder, or '{TINY_MODEL}'", example=TINY_MODEL
    )
    transformer: str | None = option(
        None, "the DiT from a ComfyUI single file (lens_bf16 / lens_mxfp8 …) instead of --model's transformer/",
        example="diffusion_models/lens_bf16.safetensors",
    )  # fmt: skip
    text_encoder: str | None = option(
        None, "the text encoder and tokenizer from ComfyUI's gpt_oss_20b_nvfp4 file instead of --model's",
        example="text_encoders/gpt_oss_20b_nvfp4.safetensors",
    )  # fmt: skip
    vae: str | None = option(
        None, "the VAE from a single file (ComfyUI's flux2-vae, BFL names) instead of --model's vae/",
        example="vae/flux2-vae.safetensors",
    )  # fmt: skip
    dtype: str | None = option(None, "default: bfloat16 on CUDA, else float32", choices=tuple(DTYPES), example="float32")
    device: str | None = option(None, "cpu, cuda, cuda:N (default: cuda if present)", example="cpu")
    vram: str | None = option(None, "GPU memory budget, e.g. 24GB (default: what is free now)", example="24GB")
    placement: str | None = option(None, "override the planner's placement", choices=PLACEMENTS, example="resident")
    quantize: str | None = option(
        None, "override the DiT precision", choices=(*PRECISIONS, *PRECISION_ALIASES), example="bf16"
    )
    offload: bool = option(False, "same as --placement offload", example=True)
    quant_transformer: str | None = option(
        None, "same as --quantize", choices=(*PRECISIONS, *PRECISION_ALIASES), example="bf16", flag="--quant_transformer"
    )
    compile: bool | None = option(
        None, "regional torch.compile; default: when the run's images repay the compile time", example=False
    )
    gpus: int = option(1, "GPUs for each image: 2 runs the two CFG branches on two GPUs (generate)", example=2)
    split: str = option(
        "auto", "how --gpus share one image; auto: the CFG branches on 2 GPUs, else one GPU (sequence splits "
        "measured slower, docs/scale-out.md)", choices=SPLITS, example="sequence",
    )  # fmt: skip
    attention: str = option(
        "auto", "attention kernel; auto: the fastest installed one that passes a numeric check on this GPU",
        choices=("auto", *ATTENTION_BACKENDS), example="sdpa",
    )  # fmt: skip

    def resolved(self) -> EngineOptions:
        """Validate; fold the field report's spellings (offload, quant_transformer) into placement / quantize."""
        if self.dtype is not None:
            check_dtype(self.dtype)
        check_placement(self.placement)
        placement = self.placement
        if self.offload:
            if placement not in (None, "offload"):
                raise LensrunError(f"--offload conflicts with --placement {placement}")
            placement = "offload"
        quantize = normalize_precision(self.quantize) if self.quantize else None
        alias = normalize_precision(self.quant_transformer) if self.quant_transformer else None
        if quantize and alias and quantize != alias:
            raise LensrunError("--quant_transformer and --quantize disagree; give one")
        if self.compile is not None and not isinstance(self.compile, bool):
            raise LensrunError(f"compile must be true, false or absent (automatic), got {self.compile!r}")
        if not isinstance(self.gpus, int) or isinstance(self.gpus, bool) or self.gpus < 1:
            raise LensrunError(f"gpus must be a whole number of 1 or more, got {self.gpus!r}")
        if self.split not in SPLITS:
            raise LensrunError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.split != "auto" and self.gpus < 2:
            raise LensrunError(f"--split {self.split} shares one image between GPUs: give --gpus 2 or more")
        return dataclasses.replace(self, placement=placement, quantize=quantize or alias, offload=False, quant_transformer=None)


REQUEST_OPTIONS = tuple(s.name for s in option_specs(GenerationRequest))
ENGINE_OPTIONS = tuple(s.name for s in option_specs(EngineOptions))


def config_options(config: dict) -> dict:
    """The request options stored in an image's config (a PNG's or a manifest row's) that regenerate it alone."""
    options = {k: v for k, v in config.items() if k in REQUEST_OPTIONS and k != "n"}
    if config.get("base_resolution") is not None:  # a bucket: its size follows from it
        options.pop("height", None), options.pop("width", None)
    return options


def split_options(options: dict) -> tuple[dict, dict]:
    """Keywords → (request options, engine options); anything else is refused with the allowed names."""
    unknown = sorted(set(options) - set(REQUEST_OPTIONS) - set(ENGINE_OPTIONS))
    if unknown:
        allowed = ", ".join((*REQUEST_OPTIONS, *ENGINE_OPTIONS))
        raise LensrunError(f"unknown option(s) {unknown}; allowed: {allowed}")
    return (
        {k: v for k, v in options.items() if k in REQUEST_OPTIONS},
        {k: v for k, v in options.items() if k in ENGINE_OPTIONS},
    )
