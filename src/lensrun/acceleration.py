"""Speed settings for a loaded pipeline: attention kernel order, regional compilation, DiT precision (torchao).

The DiT's modulation, timestep, norm and in/out projections always stay bf16: quantizing the modulation
linears gives grid artefacts (LENS_SPEC §13). Only the big linears inside the blocks are quantized.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from lensrun.errors import LensrunError
from lensrun.request import normalize_precision


def check_precision(precision: str, device: torch.device) -> str:
    """Refuse, with the reason, precisions this machine cannot run; returns the canonical name."""
    precision = normalize_precision(precision)
    if precision == "bf16":
        return precision
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise LensrunError(f"--quantize {precision} needs torchao: pip install torchao") from None
    if device.type != "cuda":
        raise LensrunError(f"--quantize {precision} needs a CUDA GPU (this run is on {device.type})")
    if precision.startswith("fp8"):
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise LensrunError(
                f"--quantize {precision} needs float8 tensor cores (sm_89+: RTX 40xx, L4, H100); this GPU is "
                f"sm_{major}{minor}: use int8-weight or bf16"
            )
    return precision


def _torchao_config(precision: str):
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    # set_inductor_config=False: torchao's default turns on Inductor's coordinate-descent tuning for the whole
    # process, which cost fp8 235 s of a cold first image on an H200 (78 s with warm caches; docs/performance.md).
    keep = {"set_inductor_config": False}
    return {
        "fp8": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), **keep),
        "fp8-weight": lambda: Float8WeightOnlyConfig(**keep),
        "int8-weight": lambda: Int8WeightOnlyConfig(**keep),
        "int4-weight": lambda: Int4WeightOnlyConfig(group_size=128, **keep),
    }[precision]()


def quantizable(module: nn.Module, fqn: str) -> bool:
    """Block linears only (QKV, attention outputs, MLPs); never ``img_mod``/``txt_mod``."""
    return isinstance(module, nn.Linear) and quantizable_name(fqn)


def quantizable_name(fqn: str) -> bool:
    """The name test of ``quantizable``, for checkpoint keys (``lensrun convert``'s MXFP8 DiT)."""
    return fqn.startswith("transformer_blocks.") and "_mod" not in fqn


def quantize_transformer(transformer: nn.Module, precision: str) -> None:
    """Quantize the DiT's block linears in place with torchao (no-op for bf16)."""
    if precision == "bf16":
        return
    from torchao.quantization import quantize_

    quantize_(transformer, _torchao_config(precision), filter_fn=quantizable)


def quantize_block(block: nn.Module, index: int, precision: str) -> None:
    """The same quantization for one DiT block (``transformer_blocks.{index}``), e.g. while a DiT is loading."""
    if precision == "bf16":
        return
    from torchao.quantization import quantize_

    quantize_(block, _torchao_config(precision), filter_fn=lambda m, fqn: quantizable(m, f"transformer_blocks.{index}.{fqn}"))


@contextlib.contextmanager
def attention_kernels(device: torch.device):
    """On CUDA prefer cuDNN attention (fastest for 24×64 heads on Hopper), then flash, then the rest."""
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        yield


_OUR_INDUCTOR_CACHE: str | None = None  # what compile_cache_dir last put in TORCHINDUCTOR_CACHE_DIR


def compile_cache_dir() -> Path:
    """Inductor's on-disk cache, kept between runs under lensrun's cache folder (or where the user's own
    ``TORCHINDUCTOR_CACHE_DIR`` points), so a shape compiles once per machine.

    Inductor writes its default into that variable when it first looks, so a value equal to that default (or
    to the folder lensrun itself put there) is not the user's choice."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as inductor_default

    from lensrun.prompt_cache import default_cache_dir

    global _OUR_INDUCTOR_CACHE
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current and current not in (_OUR_INDUCTOR_CACHE, os.path.abspath(inductor_default())):
        return Path(current)
    _OUR_INDUCTOR_CACHE = str(default_cache_dir() / "inductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _OUR_INDUCTOR_CACHE  # inductor reads it at each look-up
    return Path(_OUR_INDUCTOR_CACHE)
