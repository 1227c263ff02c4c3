"""NVFP4 as ComfyUI stores GPT-OSS's experts (``../shared/COMFY_FORMATS.md`` §3).

Per expert: E2M1 codes packed two per byte with the HIGH nibble first (element 2j in bits 7–4 — the opposite of
MXFP4), one e4m3 scale per 16 inputs (stored in the cuBLAS block layout; unswizzled once at load), and one fp32
scale per expert: W[r, c] = E2M1[code] · e4m3(S[r, c // 16]) · g. Decoding is in fp32, then cast.
"""

from __future__ import annotations

import torch

from lensrun.mxfp4 import fp4_table

BLOCK = 16


def scale_shape(rows: int, cols: int) -> tuple[int, int]:
    """Stored shape of the block scales of a [rows, cols] matrix: [roundup(rows, 128), roundup(cols/16, 4)]."""
    return -(-rows // 128) * 128, -(-(cols // BLOCK) // 4) * 4


def dequantize(packed: torch.Tensor, scales: torch.Tensor, scale_2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[E, R, K/2] codes, [E, R, K/16] e4m3 scales (logical), [E] fp32 → [E, R, K] in ``dtype``."""
    e, rows, half = packed.shape
    cols = 2 * half
    lut = fp4_table(packed.device, torch.float32)
    values = torch.stack([lut[(packed >> 4).int()], lut[(packed & 0x0F).int()]], dim=-1).view(e, rows, cols // BLOCK, BLOCK)
    out = values * scales.float().unsqueeze(-1) * scale_2.float().view(e, 1, 1, 1)
    return out.view(e, rows, cols).to(dtype)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[E, R, K] → (codes [E, R, K/2], logical e4m3 scales [E, R, K/16], fp32 [E]) as ComfyUI's quantizer does:
    g = amax(W_e) / (6 · 448), block scale = amax(block) / (6 · g), nearest E2M1 code. Writes test and
    benchmark files; the swizzle of the scales is the caller's (``to_blocked`` layout)."""
    e, rows, cols = weight.shape
    w = weight.float()
    g = (w.abs().amax(dim=(1, 2)) / (6 * 448)).clamp_min(2.0**-126)
    blocks = w.view(e, rows, cols // BLOCK, BLOCK)
    block_scale = (blocks.abs().amax(-1) / (6 * g.view(e, 1, 1))).to(torch.float8_e4m3fn)
    divisor = block_scale.float().unsqueeze(-1) * g.view(e, 1, 1, 1)
    scaled = torch.where(divisor > 0, blocks / divisor.clamp_min(1e-30), 0.0)
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=w.device)
    codes = torch.bucketize(scaled.abs(), midpoints).to(torch.uint8)
    codes = (codes | (((scaled < 0) & (codes > 0)).to(torch.uint8) << 3)).view(e, rows, cols)
    packed = (codes[..., 0::2] << 4) | codes[..., 1::2]
    return packed.contiguous(), block_scale.contiguous(), g
