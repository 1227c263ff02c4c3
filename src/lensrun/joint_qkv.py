"""The joint attention's inputs in one pass (Triton): per-head RMSNorm of q and k, RoPE, and the [image; text]
concatenation, written straight into FlashAttention's [B, L, H, D] layout.

Compiled by Inductor these steps are five kernels per block that read q and k twice — the norms' statistics
first, then the rotation, which mixes pairs of elements and so is not fused into the reduction: 2.8 ms of a
33.7 ms 1024² forward on an H200 (benchmarks/profile_dit.py, 2026-11-29). Here every (token block, head) tile of
the two QKV projections is read once and written once.

fp8 attention: q and k are written as e4m3 in the same pass. After an RMSNorm a head vector's norm is at most
√D·max|w| and a rotation keeps the norm of each pair, so |q_i| ≤ √D·max|w|: that bound is the scale (no
reduction over the tokens). v has no such bound: it stays bf16 and its amax per (batch, head) comes out of the
pass for the attention to quantize it.

Rounding follows the eager path (diffusers' RMSNorm then ``apply_rope``): statistics in fp32, the normalized
value rounded to the weights' dtype before the weight product, the rotation in fp32, one rounding at the end.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

E4M3_MAX = tl.constexpr(448.0)
# Tokens per program (one head of q, k or v each) and warps per program. 32 × 4 beat the first guess (64 × 4) in
# every group benchmarks/joint_qkv.py measured on an H200 (2026-11-29: 1.2–1.4× at 1024² and 1440² 16:9, bf16 and
# fp8; that sweep did not finish), and inside a compiled forward (profile_dit.py: 1.45 → 1.33 ms per 1024²
# forward, 2.83 → 2.50 ms at 1440² 16:9).
BLOCK_L, WARPS = 32, 4


@triton.jit(do_not_specialize=["N", "L", "B", "s_img_b", "s_txt_b", "s_qk_which", "s_out_b"])
def _joint_qkv_kernel(
    img_ptr, txt_ptr, wq_ptr, wk_ptr, wq_txt_ptr, wk_txt_ptr, cos_ptr, sin_ptr,
    qk_ptr, v_ptr, descale_ptr, v_amax_ptr,
    N, L, B, eps, bound,
    s_img_b, s_img_l, s_txt_b, s_txt_l, s_qk_which, s_out_b, s_out_l, s_rope_l,
    H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    which = tl.program_id(1) // H  # 0 q, 1 k, 2 v
    h = tl.program_id(1) % H
    b = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    img = rows < N
    txt = (rows >= N) & (rows < L)
    src = (which * H * D + h * D + cols)[None, :]
    x_img = tl.load(img_ptr + b * s_img_b + rows[:, None].to(tl.int64) * s_img_l + src, mask=img[:, None], other=0.0)
    x_txt = tl.load(
        txt_ptr + b * s_txt_b + (rows - N)[:, None].to(tl.int64) * s_txt_l + src, mask=txt[:, None], other=0.0
    )
    x = tl.where(img[:, None], x_img, x_txt)
    inside = (rows < L)[:, None]
    dst = b * s_out_b + rows[:, None].to(tl.int64) * s_out_l + (h * D + cols)[None, :]
    if which == 2:
        tl.store(v_ptr + dst, x, mask=inside)
        if FP8:
            tl.atomic_max(v_amax_ptr + b * H + h, tl.max(tl.max(tl.abs(x.to(tl.float32)), axis=1), axis=0))
    else:
        if which == 0:
            w_img = tl.load(wq_ptr + cols)
            w_txt = tl.load(wq_txt_ptr + cols)
        else:
            w_img = tl.load(wk_ptr + cols)
            w_txt = tl.load(wk_txt_ptr + cols)
        xf = x.to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / D + eps)
        normed = (xf * r[:, None]).to(x.dtype).to(tl.float32)  # a product of two bf16 values is exact in fp32
        w = tl.where(img[:, None], w_img.to(tl.float32)[None, :], w_txt.to(tl.float32)[None, :])
        y = (normed * w).to(x.dtype).to(tl.float32)
        y0, y1 = tl.split(tl.reshape(y, (BLOCK, D // 2, 2)))
        half = tl.arange(0, D // 2)[None, :]
        c = tl.load(cos_ptr + rows[:, None].to(tl.int64) * s_rope_l + half, mask=inside, other=0.0)
        s = tl.load(sin_ptr + rows[:, None].to(tl.int64) * s_rope_l + half, mask=inside, other=0.0)
        out = tl.reshape(tl.join(y0 * c - y1 * s, y0 * s + y1 * c), (BLOCK, D)).to(x.dtype)
        if FP8:
            w_max = tl.maximum(
                tl.max(tl.abs(w_img.to(tl.float32)), axis=0), tl.max(tl.abs(w_txt.to(tl.float32)), axis=0)
            )
            scale = tl.maximum((w_max * bound).to(tl.float32) / E4M3_MAX, 1e-12)
            q8 = tl.minimum(tl.maximum(out.to(tl.float32) / scale, -E4M3_MAX), E4M3_MAX).to(tl.float8e4nv)
            tl.store(qk_ptr + which * s_qk_which + dst, q8.to(tl.uint8, bitcast=True), mask=inside)
            if tl.program_id(0) == 0:
                tl.store(descale_ptr + which * B * H + b * H + h, scale)
        else:
            tl.store(qk_ptr + which * s_qk_which + dst, out, mask=inside)


def joint_qkv(
    img: torch.Tensor,
    txt: torch.Tensor,
    norm_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    rope: tuple[torch.Tensor, torch.Tensor],
    eps: float,
    heads: int,
    fp8: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """QKV projections ``img`` [B, N, 3·H·D] and ``txt`` [B, S, 3·H·D] (S may be 0), the four norm weights
    [D] (image q, image k, text q, text k), RoPE cos/sin [N + S, D/2] → (q and k stacked [2, B, N + S, H, D], v
    [B, N + S, H, D], q/k descales [2, B, H], v's amax [B, H]). bf16 q/k, or e4m3 with their descales when
    ``fp8``; v and its amax always bf16 / fp32 (the descales and amax are zeros unless ``fp8``)."""
    qk, v, descale, v_amax = _joint_qkv(img, txt, *norm_weights, *rope, eps, heads, fp8, BLOCK_L, WARPS)
    return (qk.view(torch.float8_e4m3fn) if fp8 else qk), v, descale, v_amax


@torch.library.triton_op("lensrun::joint_qkv", mutates_args=())
def _joint_qkv(
    img: torch.Tensor,
    txt: torch.Tensor,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_txt_q: torch.Tensor,
    w_txt_k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    heads: int,
    fp8: bool,
    block: int,
    warps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``joint_qkv`` (``block`` tokens per program, ``warps`` warps per program) with fp8 q/k as their bytes
    (uint8): Inductor's call of this kernel failed to lower an e4m3 pointer on torch 2.11 / Triton 3.6 (H200,
    2026-11-29); a byte pointer lowers everywhere."""
    img, txt, cos, sin = (t.contiguous() for t in (img, txt, cos, sin))  # the kernel indexes rows of them
    b, n, width = img.shape
    d = width // (3 * heads)
    length = n + txt.shape[1]
    qk = img.new_empty((2, b, length, heads, d), dtype=torch.uint8 if fp8 else img.dtype)
    v = img.new_empty((b, length, heads, d))
    descale = img.new_zeros((2, b, heads), dtype=torch.float32)
    v_amax = img.new_zeros((b, heads), dtype=torch.float32)
    txt = txt if txt.shape[1] else img  # never read when empty; a real pointer for Triton
    grid = ((length + block - 1) // block, 3 * heads, b)
    torch.library.wrap_triton(_joint_qkv_kernel)[grid](
        img, txt, w_q, w_k, w_txt_q, w_txt_k, cos, sin, qk, v, descale, v_amax,
        n, length, b, eps, math.sqrt(d) * (1 + 2**-6),
        img.stride(0), img.stride(1), txt.stride(0), txt.stride(1), qk.stride(0), v.stride(0), v.stride(1), cos.stride(0),
        H=heads, D=d, BLOCK=block, FP8=fp8, num_warps=warps,
    )  # fmt: skip
    return qk, v, descale, v_amax
