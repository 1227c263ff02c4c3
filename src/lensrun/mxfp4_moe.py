"""Grouped matmul that reads GPT-OSS's packed 4-bit expert weights directly (Triton): OpenAI's MXFP4, or the
NVFP4 of ComfyUI's re-quantized file.

The plain path decodes a layer's experts to bf16 (~1.6 GB written and read again per layer) before a grouped
matmul. This kernel decodes each weight tile in registers instead, so a layer reads only its packed bytes
(~0.4 GB) and no decoded copy ever exists: the encoder gets faster and needs no decode workspace. The two
formats differ only in the decode: MXFP4 has the low nibble first and one power-of-two (E8M0) scale per 32
inputs; NVFP4 the high nibble first, one e4m3 scale per 16 inputs and one fp32 scale per expert. A tile's weights
are decoded in fp32 and cast exactly as the decode-then-matmul path casts them.

Rows are sorted by expert (``offsets`` = cumulative row counts); the tile list — which expert and which first row
each block of ``BLOCK_M`` rows belongs to — is built on the device with a static upper bound on its length, so
a call never syncs with the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _e2m1(code):
    """4-bit E2M1 codes → fp32: normal codes are 2^(e−1)·(1 + m/2), code 1 the subnormal 0.5, code 0 zero."""
    exp = (code >> 1) & 3
    mant = code & 1
    bits = tl.where(exp > 0, ((exp + 126) << 23) | (mant << 22), mant * (126 << 23))
    return (bits | ((code >> 3) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def _e4m3(bits):
    """e4m3fn bytes (as int32) → fp32: normal 2^(e−7)·(1 + m/8), subnormal m·2^−9 (no NaN in scales)."""
    exp = (bits >> 3) & 15
    mant = bits & 7
    normal = (((bits >> 7) << 31) | ((exp + 120) << 23) | (mant << 20)).to(tl.float32, bitcast=True)
    sub = mant.to(tl.float32) * 0.001953125
    return tl.where(exp > 0, normal, tl.where((bits >> 7) > 0, -sub, sub))


@triton.jit
def _grouped_kernel(
    x_ptr, blocks_ptr, scales_ptr, scale2_ptr, bias_ptr, out_ptr, ends_ptr, tile_expert_ptr, tile_row_ptr,
    N, K: tl.constexpr,
    stride_xm, stride_be, stride_bn, stride_se, stride_sn, stride_bias, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NVFP4: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:  # past the last real tile (the grid is sized by an upper bound)
        return
    row0 = tl.load(tile_row_ptr + tile)
    row_end = tl.load(ends_ptr + expert)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w_rows = blocks_ptr + expert.to(tl.int64) * stride_be + cols[:, None].to(tl.int64) * stride_bn
    s_rows = scales_ptr + expert.to(tl.int64) * stride_se + cols[:, None].to(tl.int64) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    GROUP: tl.constexpr = 16 if NVFP4 else 32
    half = tl.arange(0, BLOCK_K // 2)
    groups = tl.arange(0, BLOCK_K // GROUP)
    if NVFP4:
        expert_scale = tl.load(scale2_ptr + expert)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + kk[None, :], mask=row_ok[:, None], other=0.0)
        packed = tl.load(w_rows + (k0 // 2 + half)[None, :], mask=col_ok[:, None], other=0).to(tl.int32)
        scale = tl.load(s_rows + (k0 // GROUP + groups)[None, :], mask=col_ok[:, None], other=0).to(tl.int32)
        if NVFP4:  # high nibble = even element; (code · block scale) · expert scale, as nvfp4.dequantize
            w = tl.join(_e2m1(packed >> 4), _e2m1(packed & 0xF)).reshape(BLOCK_N, BLOCK_K // GROUP, GROUP)
            w = w * _e4m3(scale)[:, :, None] * expert_scale
        else:  # low nibble = even element; the E8M0 scale is a power of two
            w = tl.join(_e2m1(packed & 0xF), _e2m1(packed >> 4)).reshape(BLOCK_N, BLOCK_K // GROUP, GROUP)
            w = w * (scale << 23).to(tl.float32, bitcast=True)[:, :, None]
        acc = tl.dot(a, tl.trans(w.reshape(BLOCK_N, BLOCK_K).to(a.dtype)), acc)
    acc += tl.load(bias_ptr + expert * stride_bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def tiles(ends: torch.Tensor, rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert, first row) of every ``block_m``-row tile of the expert-sorted rows; −1 pads the static bound."""
    num_experts = ends.numel()
    bound = rows // block_m + num_experts
    ends = ends.to(torch.int64)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    per_expert = (ends - starts + block_m - 1) // block_m
    tile_ends = per_expert.cumsum(0)
    t = torch.arange(bound, device=ends.device)
    expert = torch.searchsorted(tile_ends, t, right=True)
    valid = expert < num_experts
    expert = expert.clamp(max=num_experts - 1)
    first_tile = tile_ends[expert] - per_expert[expert]
    row = starts[expert] + (t - first_tile) * block_m
    return torch.where(valid, expert, -1).to(torch.int32), row.to(torch.int32)


def grouped_matmul(
    x: torch.Tensor,
    blocks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor,
    ends: torch.Tensor,
    scale_2: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int = 128,
    block_k: int = 64,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """``x`` [M, K] (rows sorted by expert, ``ends`` [E] cumulative counts) times each expert's packed weight,
    plus ``bias`` [E, N] → [M, N] in ``x``'s dtype. MXFP4: ``blocks`` [E, N, K/32, 16] uint8, ``scales``
    [E, N, K/32] uint8 (E8M0). NVFP4 (``scale_2`` given): ``blocks`` [E, N, K/2] uint8, ``scales`` [E, N, K/16]
    e4m3 (logical layout), ``scale_2`` [E] fp32.

    Default tiles: the fastest of benchmarks/encoder.py's sweep on an H200 at GPT-OSS-20B's shapes (wide
    gate_up: 64×128, 4 warps, 4 stages; down: 128×128, 8 warps, 3 stages)."""
    m, k = x.shape
    e, n = blocks.shape[:2]
    nvfp4 = scale_2 is not None
    wide = n >= 4096
    block_m = block_m or (64 if wide else 128)
    num_warps = num_warps or (4 if wide else 8)
    num_stages = num_stages or (4 if wide else 3)
    packed_k = blocks.shape[2] * (2 if nvfp4 else 32)
    if packed_k != k or k % block_k or block_k % 32:
        raise ValueError(f"packed weights for K={packed_k} do not fit rows of K={k} (block_k {block_k})")
    if nvfp4 and (scales.shape[2] * 16 != k or scales.dtype != torch.float8_e4m3fn or scale_2.shape != (e,)):
        raise ValueError(f"NVFP4 scales must be [E, N, K/16] e4m3 and scale_2 [E]; got {tuple(scales.shape)} "
                         f"{scales.dtype} and {tuple(scale_2.shape)}")  # fmt: skip
    x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    tile_expert, tile_row = tiles(ends, m, block_m)
    packed = blocks.reshape(e, n, k // 2)
    scale_bytes = scales.view(torch.uint8) if nvfp4 else scales
    grid = (tile_expert.numel(), triton.cdiv(n, block_n))
    _grouped_kernel[grid](
        x, packed, scale_bytes, scale_2.float() if nvfp4 else bias, bias, out, ends, tile_expert, tile_row, n, k,
        x.stride(0), packed.stride(0), packed.stride(1), scale_bytes.stride(0), scale_bytes.stride(1), bias.stride(0),
        out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, NVFP4=nvfp4, num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    return out
