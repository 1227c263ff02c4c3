"""The Triton MXFP4 grouped matmul against decode-then-matmul. Runs on the GPU where there is one, else through
Triton's CPU interpreter (bf16 is left to the GPU: the interpreter has no bf16 arithmetic)."""

import pytest
import torch

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()  # without it, conftest.py has put Triton in interpreter mode

from lensrun import mxfp4
from lensrun.mxfp4_moe import grouped_matmul, tiles

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
