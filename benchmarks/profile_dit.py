"""Where a DiT forward spends its time: SDPA backends at the Lens shapes, and the top kernels of one compiled
forward (full-size random weights). Guides the speed work; prints tables, writes JSON.

    python benchmarks/profile_dit.py --root /tmp/lens-full --json $OUT/profile.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from lensrun import LensPipeline
from lensrun.acceleration import attention_kernels
from lensrun.random_checkpoint import ensure_checkpoint

GRIDS = {"1024": (64, 64), "1440-16:9": (68, 121)}
TEXT = 100


def attention_table() -> list[dict]:
    rows = []
    for name, (gh, gw) in GRIDS.items():
        for text in (TEXT, 0):
            s = gh * gw + text
            q, k, v = (torch.randn(1, 24, s, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            flops = 4 * s * s * 64 * 24
            for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
                try:
                    with sdpa_kernel(backend):
                        ms = do_bench(lambda qkv=(q, k, v): F.scaled_dot_product_attention(*qkv), warmup=25, rep=100)
                    rows.append({"grid": name, "seq": s, "backend": backend.name, "ms": ms, "tflops": flops / ms / 1e9})
                except RuntimeError as err:
                    rows.append({"grid": name, "seq": s, "backend": backend.name, "error": str(err)[:120]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/lens-full")
    ap.add_argument("--json", default="profile.json")
    ap.add_argument("--precisions", default="bf16", help="comma-separated DiT precisions to profile, e.g. bf16,fp8")
    ap.add_argument("--skip-attention-table", action="store_true")
    ap.add_argument("--attention", default="sdpa", help="the DiT's attention backend (lensrun.attention.BACKENDS)")
    ap.add_argument("--unfused", action="store_true", help="FlashAttention's inputs by Inductor's kernels, not lensrun.joint_qkv")
    ap.add_argument("--max-autotune", action="store_true",
                    help="Inductor's Triton GEMM templates beside cuBLAS, chosen by timing, with the elementwise work "
                         "after a GEMM fused into it (the first call pays the tuning)")  # fmt: skip
    args = ap.parse_args()
    if args.max_autotune:  # the experiment behind docs/performance.md's "replacing cuBLAS": what fusing into the
        # GEMMs saves per forward, and what the tuning costs the first call
        import torch._inductor.config as inductor_config

        inductor_config.max_autotune_gemm = True
        inductor_config.max_autotune_gemm_backends = "TRITON,ATEN"
    ensure_checkpoint(args.root, device="cuda")
    report = {"gpu": torch.cuda.get_device_name(0), "attention": [] if args.skip_attention_table else attention_table(),
              "forward": {}}  # fmt: skip
    for r in report["attention"]:
        print(r, flush=True)
    for precision in args.precisions.split(","):
        profile_forward(Path(args.root), precision, args.attention, not args.unfused, report)
        Path(args.json).write_text(json.dumps(report, indent=1))


def profile_forward(root: Path, precision: str, attention: str, fused: bool, report: dict) -> None:
    """First-call (compile) time, graphs compiled, steady forward time and top kernels, at each grid."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    pipe = LensPipeline.from_pretrained(root, dtype=torch.bfloat16, device="cuda").optimize(True, precision)
    pipe.transformer.set_attention_backend(attention)
    pipe.transformer.set_fused_attention_inputs(fused)
    text = [torch.randn(1, TEXT, 2880, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    t = torch.tensor([0.5], device="cuda", dtype=torch.bfloat16)
    for grid, (gh, gw) in GRIDS.items():
        tuned = " max-autotune" if inductor_config.max_autotune_gemm else ""
        name = f"{precision} {attention}{' one-pass inputs' if fused and attention != 'sdpa' else ''}{tuned} {grid}"
        x = torch.randn(1, gh * gw, 128, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode(), attention_kernels(torch.device("cuda")):
            cond = pipe.transformer.conditioning(t)

            def run(model=pipe.transformer, x=x, shape=(1, gh, gw), cond=cond):
                return model(x, text, None, t, [shape], step_conditioning=cond)

            graphs = counters["stats"]["unique_graphs"]
            t0 = time.perf_counter()
            run()
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            for _ in range(2):
                run()
            new_graphs = counters["stats"]["unique_graphs"] - graphs
            print(f"{name}: first call {first:.1f} s, {new_graphs} graph(s) compiled", flush=True)
            ms = do_bench(run, warmup=50, rep=300)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                run()
                torch.cuda.synchronize()
        events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
        total = sum(e.device_time_total for e in events)
        top = [{"kernel": e.key[:110], "us": e.device_time_total, "pct": 100 * e.device_time_total / total, "calls": e.count}
               for e in events[:18]]  # fmt: skip
        report["forward"][name] = {"ms": ms, "kernel_us_total": total, "top": top, "first_call_s": first,
                                   "graphs_compiled": new_graphs}  # fmt: skip
        print(f"\n{name}: compiled forward {ms:.2f} ms (kernels {total / 1000:.2f} ms)")
        for row in top:
            print(f"  {row['pct']:5.1f}%  {row['us'] / 1000:7.2f} ms  x{row['calls']:<4d} {row['kernel']}")
    del pipe
    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
