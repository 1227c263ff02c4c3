"""The Triton grouped matmul on packed MXFP4 and NVFP4 expert weights against decode-then-matmul. Runs on the
GPU where there is one, else through Triton's CPU interpreter (bf16 is left to the GPU: the interpreter has no
bf16 arithmetic)."""

import pytest
import torch

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()  # without it, conftest.py has put Triton in interpreter mode

import triton
import triton.language as tl

from lensrun import mxfp4
from lensrun.mxfp4_moe import _e4m3, grouped_matmul, tiles

DEVICE = "cuda" if CUDA else "cpu"
SMALL_BLOCKS = dict(block_m=16, block_n=32, block_k=64)


def reference(x, blocks, scales, bias, counts):
    deq = mxfp4.dequantize(blocks, scales, torch.float32)
    outs, start = [], 0
    for e, c in enumerate(counts):
        outs.append(x[start : start + c].double() @ deq[e].T.double() + bias[e].double())
        start += c
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []))
@pytest.mark.parametrize("counts", [[5, 0, 37, 12], [0, 0, 16, 1], [64, 3, 0, 0]])
def test_grouped_matmul_matches_decode_then_matmul(dtype, counts):
    torch.manual_seed(len(counts) + sum(counts))
    e, n, k = 4, 96, 128
    blocks, scales = mxfp4.quantize(torch.randn(e, n, k) * 0.1)
    bias = torch.randn(e, n)
    x = torch.randn(sum(counts), k)
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    to = lambda t, dt=None: t.to(DEVICE, dt) if dt is not None else t.to(DEVICE)
    out = grouped_matmul(to(x, dtype), to(blocks), to(scales), to(bias, dtype), to(ends), **SMALL_BLOCKS)
    ref = reference(x.to(dtype).float(), blocks, scales, bias.to(dtype).float(), counts)
    assert out.shape == (sum(counts), n) and not out.isnan().any()
    tol = {torch.float32: 1e-3 if CUDA else 1e-5,  # tf32 dot on the GPU
           torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert ((out.double().cpu() - ref).norm() / ref.norm()).item() < tol


def test_tiles_cover_every_row_once():
    counts = torch.tensor([5, 0, 37, 12, 16])
    ends = counts.cumsum(0)
    expert, row = tiles(ends, int(counts.sum()), 16)
    assert expert.numel() == 70 // 16 + 5  # the static bound, padded with -1
    covered = []
    for e, r in zip(expert.tolist(), row.tolist()):
        if e >= 0:
            end = int(ends[e])
            covered += [i for i in range(r, min(r + 16, end))]
            assert r < end and (e == 0 or r >= int(ends[e - 1]))
    assert sorted(covered) == list(range(70))


def test_bad_shapes_are_refused():
    blocks, scales = mxfp4.quantize(torch.randn(2, 32, 64))
    with pytest.raises(ValueError, match="do not fit rows of K=128"):
        grouped_matmul(torch.randn(3, 128), blocks, scales, torch.zeros(2, 32), torch.tensor([1, 3], dtype=torch.int32))


def nvfp4_reference(x, packed, scales, scale_2, bias, counts, dtype):
    """Decode-then-matmul, exactly the path the kernel replaces (weights cast to ``dtype`` before the product)."""
    from lensrun import nvfp4

    deq = nvfp4.dequantize(packed, scales, scale_2, dtype).double()
    outs, start = [], 0
    for e, c in enumerate(counts):
        outs.append(x[start : start + c].double() @ deq[e].T + bias[e].double())
        start += c
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []))
@pytest.mark.parametrize("counts", [[5, 0, 37, 12], [0, 0, 16, 1], [64, 3, 0, 0]])
def test_nvfp4_grouped_matmul_matches_decode_then_matmul(dtype, counts):
    """High nibble first, e4m3 block scales (subnormal and negative-zero bytes included), per-expert fp32 scale."""
    from lensrun import nvfp4

    torch.manual_seed(7 + sum(counts))
    e, n, k = 4, 96, 128
    weight = torch.randn(e, n, k) * torch.logspace(-3, 1, e).view(e, 1, 1)
    weight[0, :, :16] *= 1e-4  # tiny blocks: subnormal e4m3 scales
    packed, scales, scale_2 = nvfp4.quantize(weight)
    assert (scales.view(torch.uint8) < 8).any()  # the subnormal range is exercised
    bias = torch.randn(e, n)
    x = torch.randn(sum(counts), k)
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    to = lambda t, dt=None: t.to(DEVICE, dt) if dt is not None else t.to(DEVICE)
    out = grouped_matmul(to(x, dtype), to(packed), to(scales), to(bias, dtype), to(ends), scale_2=to(scale_2), **SMALL_BLOCKS)
    ref = nvfp4_reference(x.to(dtype).float(), packed, scales, scale_2, bias.to(dtype).float(), counts, dtype)
    assert out.shape == (sum(counts), n) and not out.isnan().any()
    tol = {torch.float32: 1e-3 if CUDA else 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert ((out.double().cpu() - ref).norm() / ref.norm()).item() < tol


@triton.jit
def _decode_e4m3(src, dst, n: tl.constexpr):
    i = tl.arange(0, n)
    tl.store(dst + i, _e4m3(tl.load(src + i).to(tl.int32)))


def test_e4m3_decode_is_exact_for_every_byte():
    """The kernel's e4m3 decode against torch's for all 256 bytes but the two NaNs."""
    codes = torch.tensor([b for b in range(256) if b not in (0x7F, 0xFF)], dtype=torch.uint8)
    padded = torch.cat([codes, torch.zeros(256 - codes.numel(), dtype=torch.uint8)]).to(DEVICE)
    out = torch.empty(256, dtype=torch.float32, device=DEVICE)
    _decode_e4m3[(1,)](padded, out, 256)
    expected = codes.view(torch.float8_e4m3fn).float()
    assert torch.equal(out[: codes.numel()].cpu(), expected)


def test_nvfp4_bad_scales_are_refused():
    from lensrun import nvfp4

    packed, scales, scale_2 = nvfp4.quantize(torch.randn(2, 32, 64))
    with pytest.raises(ValueError, match="NVFP4 scales must be"):
        grouped_matmul(torch.randn(3, 64), packed, scales[..., :2], torch.zeros(2, 32), torch.tensor([1, 3], dtype=torch.int32), scale_2=scale_2)
