"""FlashAttention-3 and cuBLAS rates at the Lens shapes under sustained load, with the SM clock and power.

A kernel timed alone on an idle GPU runs at boost clock; inside a denoise the H200 sits at its power cap and
clocks down. This times FA3 (bf16 and fp8) at 1024² and 1440² 16:9 in the layouts the DiT uses — the head-major
layout `attention.py` timed, token-major, the conditional branch's padded text with key counts, the exact length,
the unconditional branch without text — back to back and between two MLP-sized GEMMs (as in a block), while
`nvidia-smi` samples the SM clock and board power every 50 ms.

    python benchmarks/sustained_rates.py --json sustained.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import time
from pathlib import Path

import torch

HEADS, HEAD_DIM, TEXT_PADDED, TEXT = 24, 64, 128, 74
SIZES = {"1024²": 4096, "1440² 16:9": 8228}  # image tokens


def event_ms(fn, reps: int, between=None) -> tuple[float, float, float]:
    """Median kernel time of ``fn`` (CUDA events around it alone), and the wall-clock span of the timed loop."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for _ in range(3):
        fn()
        if between:
            between()
    torch.cuda.synchronize()
    t0 = time.time()
    for s, e in zip(starts, ends, strict=True):
        if between:
            between()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
    return ms[reps // 2], t0, time.time()


def flash(q, k, v, used=None):
    from fa3_fwd_interface import _flash_attn_forward

    ones = torch.ones(q.shape[0], HEADS, device="cuda") if q.dtype == torch.float8_e4m3fn else None
    return lambda: _flash_attn_forward(q, k, v, seqused_k=used, q_descale=ones, k_descale=ones, v_descale=ones,
                                       softmax_scale=HEAD_DIM**-0.5)  # fmt: skip


def cases(img: int) -> dict:
    """name → (kernel, query·key pairs it computes)."""
    new = lambda length, head_major=False: (
        torch.randn(1, HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2) if head_major
        else torch.randn(1, length, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    )  # fmt: skip
    s, padded, valid = img + 100, img + TEXT_PADDED, img + TEXT
    used = torch.tensor([valid], dtype=torch.int32, device="cuda")
    cond = [new(padded) for _ in range(3)]
    uncond = [new(img) for _ in range(3)]
    fp8 = lambda ts: [t.to(torch.float8_e4m3fn) for t in ts]
    return {
        "head-major, no text padding (attention.py)": (flash(*[new(s, True) for _ in range(3)]), s * s),
        "token-major, no text padding": (flash(*[new(s) for _ in range(3)]), s * s),
        "conditional: padded text, key counts": (flash(*cond, used), padded * valid),
        "conditional: exact length": (flash(*[t[:, :valid] for t in cond]), valid * valid),
        "unconditional: image only": (flash(*uncond), img * img),
        "fp8 conditional, key counts": (flash(*fp8(cond), used), padded * valid),
        "fp8 unconditional": (flash(*fp8(uncond)), img * img),
    }


def clock_samples(path: Path) -> list[tuple[float, float, float]]:
    samples = []
    for line in path.read_text().splitlines():
        try:
            stamp, mhz, watts = (x.strip() for x in line.split(","))
            t = datetime.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
            samples.append((t, float(mhz.split()[0]), float(watts.split()[0])))
        except ValueError:
            continue
    return samples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="sustained.json")
    args = ap.parse_args()
    log = Path(args.json).with_suffix(".smi.csv")
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw", "--format=csv,noheader",
                            "-lms", "50"], stdout=log.open("w"))  # fmt: skip
    time.sleep(1)
    rows = []
    for size, img in SIZES.items():
        a = torch.randn(img, 1536, device="cuda", dtype=torch.bfloat16)
        w_up = torch.randn(1536, 8192, device="cuda", dtype=torch.bfloat16) * 0.02
        w_down = torch.randn(4096, 1536, device="cuda", dtype=torch.bfloat16) * 0.02
        gemms = lambda a=a, w_up=w_up, w_down=w_down: (a @ w_up)[:, :4096] @ w_down
        reps = 400 if img < 5000 else 200
        for case, (fn, pairs) in cases(img).items():
            for mode, between in (("back to back", None), ("between GEMMs", gemms)):
                ms, t0, t1 = event_ms(fn, reps, between)
                rows.append({"size": size, "case": case, "mode": mode, "ms": ms,
                             "tflops": 4 * pairs * HEAD_DIM * HEADS / ms / 1e9, "t0": t0, "t1": t1})  # fmt: skip
        ms, t0, t1 = event_ms(gemms, reps)
        flops = 2 * img * 1536 * 8192 + 2 * img * 4096 * 1536
        rows.append({"size": size, "case": "the two GEMMs (cuBLAS)", "mode": "back to back", "ms": ms,
                     "tflops": flops / ms / 1e9, "t0": t0, "t1": t1})  # fmt: skip
    time.sleep(0.5)
    smi.terminate()
    smi.wait()
    samples = clock_samples(log)
    print(f"{'size':11s} {'case':44s} {'mode':14s} {'ms':>7s} {'TFLOP/s':>8s} {'SM MHz':>7s} {'W':>5s}")
    for r in rows:
        inside = [s for s in samples if r["t0"] <= s[0] <= r["t1"]]
        r["sm_mhz"] = sum(s[1] for s in inside) / len(inside) if inside else None
        r["watts"] = sum(s[2] for s in inside) / len(inside) if inside else None
        print(f"{r['size']:11s} {r['case']:44s} {r['mode']:14s} {r['ms']:7.3f} {r['tflops']:8.0f} "
              f"{r['sm_mhz'] or float('nan'):7.0f} {r['watts'] or float('nan'):5.0f}")  # fmt: skip
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
