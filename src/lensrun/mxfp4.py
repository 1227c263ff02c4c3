"""MXFP4 (OCP microscaling FP4) as GPT-OSS ships it: E2M1 nibbles, 32 values per E8M0 scale byte.

Layout (transformers' ``convert_moe_packed_tensors``): blocks [..., R, G, 16] uint8, scales [..., R, G] uint8;
low nibble = even element, high nibble = odd element; value = LUT[nibble] · 2^(scale − 127).
"""

from __future__ import annotations

import importlib.util
from functools import cache

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_LUT_CACHE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def fp4_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The 16 E2M1 values on ``device`` (cached: decoding runs per layer, per call)."""
    key = (device, dtype)
    if key not in _LUT_CACHE:
        _LUT_CACHE[key] = torch.tensor(FP4_VALUES, dtype=dtype, device=device)
    return _LUT_CACHE[key]


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """[..., R, G, 16] blocks + [..., R, G] scales → [..., R, G·32] values (row-major like a Linear weight)."""
    lut = fp4_table(blocks.device, dtype)
    lo = lut[(blocks & 0x0F).int()]
    hi = lut[(blocks >> 4).int()]
    vals = torch.stack([lo, hi], dim=-1).flatten(-2)  # [..., R, G, 32]
    vals = torch.ldexp(vals, (scales.int() - 127).unsqueeze(-1).to(dtype))
    return vals.flatten(-2)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., R, K] float → (blocks [..., R, K/32, 16], scales [..., R, K/32]); round-to-nearest per 32-group.

    Used to write test and benchmark checkpoints in the shipped format; K must be a multiple of 32.
    """
    *lead, k = weight.shape
    if k % 32:
        raise ValueError(f"MXFP4 needs the packed dimension to be a multiple of 32, got {k}")
    w = weight.float().reshape(*lead, k // 32, 32)
    amax = w.abs().amax(dim=-1, keepdim=True).clamp_min(2.0**-126)
    # Smallest power of two so that amax / 2^e ≤ 6 (the largest E2M1 magnitude).
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = w / torch.exp2(exp)
    # Nearest E2M1 magnitude by the midpoints between the eight codes 0, 0.5, …, 6.
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=w.device)
    codes = torch.bucketize(scaled.abs(), midpoints).to(torch.uint8)
    codes = codes | (((scaled < 0) & (codes > 0)).to(torch.uint8) << 3)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exp.squeeze(-1) + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


@cache
def fused_kernel_available() -> bool:
    """Whether ``lensrun.mxfp4_moe`` (Triton) can run: needs Triton and a CUDA GPU; elsewhere experts are decoded."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()
