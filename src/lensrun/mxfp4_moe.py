"""Grouped matmul that reads GPT-OSS's packed MXFP4 expert weights directly (Triton).

The plain path decodes a layer's experts to bf16 (~1.6 GB written and read again per layer) before a grouped
matmul. This kernel decodes each weight tile in registers instead, so a layer reads only its packed bytes
(~0.4 GB) and no decoded copy ever exists: the encoder gets faster and needs no decode workspace.

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
def _mxfp4_grouped_kernel(
    x_ptr, blocks_ptr, scales_ptr, bias_ptr, out_ptr, ends_ptr, tile_expert_ptr, tile_row_ptr,
    N, K: tl.constexpr,
    stride_xm, stride_be, stride_bn, stride_se, stride_sn, stride_bias, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
    half = tl.arange(0, BLOCK_K // 2)
    groups = tl.arange(0, BLOCK_K // 32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + kk[None, :], mask=row_ok[:, None], other=0.0)
        packed = tl.load(w_rows + (k0 // 2 + half)[None, :], mask=col_ok[:, None], other=0).to(tl.int32)
        scale = tl.load(s_rows + (k0 // 32 + groups)[None, :], mask=col_ok[:, None], other=127).to(tl.int32)
        # low nibble = even element, high nibble = odd element: decode both halves, then interleave them
        w = tl.join(_e2m1(packed & 0xF), _e2m1(packed >> 4)).reshape(BLOCK_N, BLOCK_K // 32, 32)
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
    block_m: int | None = None,
    block_n: int = 128,
    block_k: int = 64,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """``x`` [M, K] (rows sorted by expert, ``ends`` [E] cumulative counts) times each expert's packed weight
    ``blocks`` [E, N, K/32, 16] / ``scales`` [E, N, K/32], plus ``bias`` [E, N] → [M, N] in ``x``'s dtype.

    Default tiles: the fastest of benchmarks/encoder.py's sweep on an H200 at GPT-OSS-20B's shapes (wide
    gate_up: 64×128, 4 warps, 4 stages; down: 128×128, 8 warps, 3 stages)."""
    m, k = x.shape
    e, n = blocks.shape[:2]
    wide = n >= 4096
    block_m = block_m or (64 if wide else 128)
    num_warps = num_warps or (4 if wide else 8)
    num_stages = num_stages or (4 if wide else 3)
    if blocks.shape[2] * 32 != k or k % block_k or block_k % 32:
        raise ValueError(f"packed weights for K={blocks.shape[2] * 32} do not fit rows of K={k} (block_k {block_k})")
    x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    tile_expert, tile_row = tiles(ends, m, block_m)
    packed = blocks.reshape(e, n, k // 2)
    grid = (tile_expert.numel(), triton.cdiv(n, block_n))
    _mxfp4_grouped_kernel[grid](
        x, packed, scales, bias, out, ends, tile_expert, tile_row, n, k,
        x.stride(0), packed.stride(0), packed.stride(1), scales.stride(0), scales.stride(1), bias.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
