"""What one generation asks for, validated up front: sizes, buckets, variants' defaults (LENS_SPEC §5, §7).

Everything here is checked before a model is touched, so bad input costs nothing and writes nothing.
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import asdict, dataclass

import torch

from lensrun.errors import LensrunError
from lensrun.prompting import DEFAULT_TEMPLATE_DATE

# (height, width) per aspect-ratio key (width:height) for each base resolution.
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


def resolve_size(
    height: int | None, width: int | None, base_resolution: int | None, aspect_ratio: str | None
) -> tuple[int, int]:
    """Explicit height/width (multiples of 16) win; else the bucket of (base_resolution, aspect_ratio)."""
    if (height is None) != (width is None):
        raise LensrunError("give both height and width, or neither (then base resolution and aspect ratio apply)")
    if height is not None:
        for label, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v < 16 or v % 16:
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


@dataclass
class GenerationRequest:
    """The sampling settings of one call, validated; ``record()`` is what each image's metadata stores."""

    prompts: list[str]
    negative_prompt: str = ""
    height: int = 1024
    width: int = 1024
    base_resolution: int | None = None
    aspect_ratio: str | None = None
    steps: int = 20
    cfg: float = 5.0
    n: int = 1
    seed: int | None = None
    noise: str = "cpu"
    template_date: str = DEFAULT_TEMPLATE_DATE
    cache: float | None = None

    @classmethod
    def build(
        cls,
        prompt: str | list[str] | None,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        base_resolution: int | None = None,
        aspect_ratio: str | None = None,
        steps: int | None = None,
        cfg: float | None = None,
        n: int = 1,
        seed: int | None = None,
        noise: str = "cpu",
        variant: str = "lens",
        template_date: str = DEFAULT_TEMPLATE_DATE,
        need_prompt: bool = True,
        cache: float | None = None,
    ) -> GenerationRequest:
        """Validate and fill defaults; explicit steps/cfg win over the variant's preset."""
        check_variant(variant)
        preset = VARIANTS[variant]
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if need_prompt and not prompts:
            raise LensrunError("no prompt given")
        if any(not isinstance(p, str) for p in prompts):
            raise LensrunError("prompts must be strings")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise LensrunError("negative prompt must be a string")
        h, w = resolve_size(height, width, base_resolution, aspect_ratio)
        steps = preset.steps if steps is None else steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise LensrunError(f"steps must be an integer ≥ 1, got {steps}")
        cfg = preset.cfg if cfg is None else cfg
        if not isinstance(cfg, (int, float)) or isinstance(cfg, bool) or not math.isfinite(cfg) or cfg < 0:
            raise LensrunError(f"cfg must be a finite number ≥ 0, got {cfg}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise LensrunError(f"n (images per prompt) must be an integer ≥ 1, got {n}")
        if seed is not None and (not isinstance(seed, int) or seed < -1 or seed >= 2**63):
            raise LensrunError(f"seed must be an integer in [0, 2^63) or -1 for random, got {seed}")
        if noise not in NOISE_SOURCES:
            raise LensrunError(f"noise must be one of {', '.join(NOISE_SOURCES)}, got '{noise}'")
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", template_date):
            raise LensrunError(f"template date must look like YYYY-MM-DD, got '{template_date}'")
        if cache is not None:
            if not isinstance(cache, (int, float)) or not 0 < cache < 1:
                raise LensrunError(f"cache threshold must be in (0, 1), e.g. 0.05; got {cache}")
            if variant == "turbo" or steps < 8:
                raise LensrunError("the step cache is for 8+ step runs (Lens 20, Base 50); Turbo has no steps to spare")
        if seed is None or seed == -1:
            seed = draw_seed()
        explicit_size = height is not None
        return cls(
            prompts=prompts,
            negative_prompt=negative_prompt or "",
            height=h,
            width=w,
            base_resolution=None if explicit_size else (base_resolution or DEFAULT_BASE_RESOLUTION),
            aspect_ratio=None if explicit_size else (aspect_ratio or DEFAULT_ASPECT_RATIO),
            steps=steps,
            cfg=float(cfg),
            n=n,
            seed=seed,
            noise=noise,
            template_date=template_date,
            cache=None if cache is None else float(cache),
        )

    @property
    def grid(self) -> tuple[int, int]:
        """Latent token grid (each token is a 16×16 pixel patch)."""
        return self.height // 16, self.width // 16

    def prompts_to_encode(self, embeds_given: bool = False, negative_embeds_given: bool = False) -> list[tuple[str, str]]:
        """(text, template date) pairs this request needs from the encoder; an empty negative needs none."""
        texts = [] if embeds_given else list(self.prompts)
        if self.cfg != 1.0 and not negative_embeds_given and self.negative_prompt.strip():
            texts.append(self.negative_prompt)
        return [(text, self.template_date) for text in texts]

    def image_settings(self, prompt_index: int, k: int) -> dict:
        """Settings that regenerate image k of prompt ``prompt_index`` on its own (its own seed)."""
        d = asdict(self)
        d.pop("prompts")
        d.update(prompt=self.prompts[prompt_index], seed=self.seed + prompt_index * self.n + k, n=1)
        return d
