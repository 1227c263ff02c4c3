"""The GPT-OSS encoder's MXFP4 experts: Triton kernel on the packed weights vs decode-then-grouped-matmul.

1. Kernel configs at the real shapes (32 experts, 2880→5760 and 2880→2880, 512 tokens × top-4 rows): median
   time, effective GB/s of packed weights read, TFLOP/s.
2. The whole encoder (24 layers, as loaded from the checkpoint) at 512 and 128 tokens: decode path eager,
   decode path with the compiled decode, fused kernel, each of the last two also as CUDA graphs; peak memory above the weights; relative distance of the
   selected layers' features between the fused and decode paths.

    python benchmarks/encoder.py --root /tmp/lens-full --json $OUT/encoder.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lensrun import LensPipeline, mxfp4
from lensrun.mxfp4_moe import grouped_matmul
from lensrun.random_checkpoint import ensure_checkpoint

CONFIGS = [  # block_m, block_n, block_k, warps, stages
    (16, 128, 64, 4, 3), (32, 128, 64, 4, 3), (64, 128, 64, 4, 3), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
    (64, 256, 64, 8, 3), (128, 128, 64, 8, 3), (32, 64, 64, 4, 4), (64, 128, 32, 4, 4), (128, 256, 64, 8, 3),
]  # fmt: skip


def bench(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def kernels(report: dict) -> None:
    torch.manual_seed(0)
    e, h = 32, 2880
    rows = 512 * 4
    flat = torch.randint(0, e, (rows,), device="cuda")
    ends = torch.bincount(flat, minlength=e).cumsum(0).to(torch.int32)
    for name, n in (("gate_up", 2 * h), ("down", h)):
        blocks, scales = mxfp4.quantize(torch.randn(e, n, h, device="cuda") * h**-0.5)
        bias = torch.randn(e, n, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(rows, h, device="cuda", dtype=torch.bfloat16)
        deq = mxfp4.dequantize(blocks, scales, torch.bfloat16)
        ref = torch._grouped_mm(x, deq.transpose(-2, -1), offs=ends)
        bias_rows = bias[flat.sort().values]
        ref = ref + bias_rows
        t_ref = bench(lambda: torch._grouped_mm(x, mxfp4.dequantize(blocks, scales, torch.bfloat16).transpose(-2, -1), offs=ends))
        packed_bytes = blocks.numel() + scales.numel()
        flops = 2 * rows * n * h
        rows_out = []
        for bm, bn, bk, w, s in CONFIGS:
            try:
                out = grouped_matmul(x, blocks, scales, bias, ends, bm, bn, bk, w, s)
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                t = bench(lambda: grouped_matmul(x, blocks, scales, bias, ends, bm, bn, bk, w, s))
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported
                rows_out.append({"config": [bm, bn, bk, w, s], "error": str(exc)[:200]})
                continue
            rows_out.append({"config": [bm, bn, bk, w, s], "ms": t * 1e3, "GBps": packed_bytes / t / 1e9,
                             "TFLOPs": flops / t / 1e12, "rel_err": err})  # fmt: skip
            print(f"{name:8s} {str((bm, bn, bk, w, s)):24s} {t * 1e3:7.3f} ms {packed_bytes / t / 1e9:7.0f} GB/s "
                  f"{flops / t / 1e12:6.1f} TFLOP/s  err {err:.1e}", flush=True)  # fmt: skip
        print(f"{name:8s} eager decode + grouped_mm: {t_ref * 1e3:7.3f} ms", flush=True)
        report["kernels"][name] = {"decode_then_grouped_mm_ms": t_ref * 1e3, "configs": rows_out}


def encoder(report: dict, root: Path) -> None:
    pipe = LensPipeline.from_pretrained(root, dtype=torch.bfloat16, device="cuda")
    te = pipe.text_encoder
    weights = torch.cuda.memory_allocated()
    for tokens in (512, 128):
        ids = torch.randint(0, te.config.vocab_size, (1, tokens))
        mask = torch.ones(1, tokens, dtype=torch.bool)
        results = {}
        for mode in ("decode-eager", "decode-compiled", "decode-compiled+graphs", "fused", "fused+graphs"):
            te.reset_graphs()
            te.use_graphs = mode.endswith("+graphs")
            te.use_fused_experts(mode.startswith("fused"))
            if mode.startswith("decode-compiled"):
                te.compile_dequantize()
            elif mode == "decode-eager":
                for layer in te.layers:
                    layer.mlp.experts.dequantize = mxfp4.dequantize
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            feats = te(ids, mask)
            extra = (torch.cuda.max_memory_allocated() - weights) / 2**30
            t = bench(lambda: te(ids, mask), repeats=10)
            results[mode] = feats
            dist = None
            if mode != "decode-eager":
                ref = results["decode-eager"]
                dist = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(feats, ref))
            report["encoder"].append({"tokens": tokens, "mode": mode, "ms": t * 1e3, "extra_gib": extra, "rel_dist_vs_eager": dist})
            print(f"encoder {tokens:4d} tokens {mode:16s} {t * 1e3:7.1f} ms  peak above weights {extra:5.2f} GiB  "
                  f"dist vs decode-eager {dist}", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/lens-full")
    ap.add_argument("--json", default="encoder.json")
    args = ap.parse_args()
    root = Path(args.root)
    ensure_checkpoint(root, device="cuda")
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "kernels": {}, "encoder": []}  # fmt: skip
    kernels(report)
    Path(args.json).write_text(json.dumps(report, indent=1))
    encoder(report, root)
    Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
