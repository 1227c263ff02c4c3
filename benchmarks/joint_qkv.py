"""The one-pass attention inputs (``lensrun.joint_qkv``) against Inductor's kernels for the same work, and the
one pass's tiles: tokens per program × warps, at the Lens shapes, bf16 and fp8, in one run.

Baseline: the eager path of ``LensJointAttention`` from the QKV projections to FlashAttention's layout (q/k
RMSNorm, RoPE, [image; text] concatenation; fp8: amax scales and e4m3 q/k/v), compiled by Inductor. GB/s counts
the bytes that must move in bf16: the projections read once, q/k/v written once (fp8 moves less).

    python benchmarks/joint_qkv.py --json $OUT/joint_qkv.json
    TRITON_INTERPRET=1 python benchmarks/joint_qkv.py --dry-run   # on a CPU: the script itself
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lensrun.attention import to_fp8
from lensrun.joint_qkv import BLOCK_L, WARPS, _joint_qkv
from lensrun.models.transformer_lens import LensJointAttention, lens_rope

HEADS, DIM, TEXT = 24, 64, 100
GRIDS = {"1024²": (64, 64), "1440² 16:9": (68, 121)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run through Triton's interpreter


def bench_ms(fn) -> float:
    if DEVICE == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200)
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


TILES = [(block, warps) for block in (16, 32, 64, 128) for warps in (1, 2, 4, 8) if block * DIM // (32 * warps) >= 4]


def inductor_path(attn: LensJointAttention, img, txt, cos, sin, fp8: bool):
    """What Inductor runs without the one pass: the model's ``joint_inputs`` in FlashAttention's [B, L, H, D]
    layout (fp8: e4m3 with per-head amax scales)."""
    q, k, v = (t.transpose(1, 2) for t in attn.joint_inputs(img, txt, cos, sin))
    return tuple(to_fp8(t) for t in (q, k, v)) if fp8 else (q.contiguous(), k.contiguous(), v.contiguous())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="joint_qkv.json")
    ap.add_argument("--tiles", help="tokens×warps to try, e.g. 64x4,128x8 (default: every sensible pair)")
    ap.add_argument("--dry-run", action="store_true", help="one small grid, two tiles (TRITON_INTERPRET=1 on a CPU)")
    args = ap.parse_args()
    grids = {"5×7": (5, 7)} if args.dry_run else GRIDS
    tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")] if args.tiles else TILES
    tiles = tiles[:2] if args.dry_run else tiles
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
    print(f"GPU {gpu}, torch {torch.__version__}; fp8 one-pass rows include v's quantization")
    print(f"{'grid':<11} {'fp8':<5} {'kernel':<16} {'µs':>7} {'GB/s':>6} {'vs Inductor':>11}", flush=True)
    rows = []
    for grid_name, grid in grids.items():
        for fp8 in (False, True):
            group = measure(grid_name, grid, fp8, tiles)
            for r in group:
                mark = " (default)" if r.get("default") else ""
                print(f"{r['grid']:<11} {r['fp8']!s:<5} {r['kernel']:<16} {r['ms'] * 1e3:7.1f} {r['gb_s']:6.0f} "
                      f"{r['vs_inductor']:10.2f}×{mark}", flush=True)  # fmt: skip
            rows += group
            with open(args.json, "w") as f:  # after every group: a run cut short keeps what it measured
                json.dump({"gpu": gpu, "torch": torch.__version__, "rows": rows}, f, indent=1)


def measure(grid_name: str, grid: tuple[int, int], fp8: bool, tiles: list[tuple[int, int]]) -> list[dict]:
    """Inductor's row, then one row per tile, each with its speed relative to Inductor's."""
    n = grid[0] * grid[1]
    img = torch.randn(1, n, 3 * HEADS * DIM, device=DEVICE, dtype=torch.bfloat16)
    txt = torch.randn(1, TEXT, 3 * HEADS * DIM, device=DEVICE, dtype=torch.bfloat16)
    attn = LensJointAttention(HEADS * DIM, HEADS, DIM).to(DEVICE, torch.bfloat16)
    cos, sin = lens_rope(grid, TEXT, (8, 28, 28), device=DEVICE)
    weights = [attn.norm_q.weight, attn.norm_k.weight, attn.norm_added_q.weight, attn.norm_added_k.weight]
    moved = 2 * img.numel() * 2 + 2 * txt.numel() * 2  # bytes: read the projections, write q/k/v (bf16)
    compiled = torch.compile(inductor_path, dynamic=False) if DEVICE == "cuda" else inductor_path
    with torch.no_grad():
        base = bench_ms(lambda: compiled(attn, img, txt, cos, sin, fp8))
        rows = [{"grid": grid_name, "fp8": fp8, "kernel": "Inductor", "ms": base, "gb_s": moved / base / 1e6}]
        extra = 0.0  # fp8: v's quantization from the pass's amax, as the DiT's compiled blocks run it
        if fp8:
            _, v, _, v_amax = _joint_qkv(img, txt, *weights, cos, sin, 1e-6, HEADS, True, BLOCK_L, WARPS)
            quantize_v = torch.compile(to_fp8, dynamic=False) if DEVICE == "cuda" else to_fp8
            extra = bench_ms(lambda: quantize_v(v, v_amax))
        for block, warps in tiles:
            ms = (
                bench_ms(lambda b=block, w=warps: _joint_qkv(img, txt, *weights, cos, sin, 1e-6, HEADS, fp8, b, w))
                + extra
            )
            rows.append({"grid": grid_name, "fp8": fp8, "kernel": f"one pass {block}×{warps}", "block": block,
                         "warps": warps, "default": (block, warps) == (BLOCK_L, WARPS), "ms": ms,
                         "gb_s": moved / ms / 1e6, "v_quantization_ms": extra})  # fmt: skip
    for r in rows:
        r["vs_inductor"] = base / r["ms"]
    return rows


if __name__ == "__main__":
    main()
