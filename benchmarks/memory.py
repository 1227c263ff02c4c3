"""The memory planner on the GPU: simulated budgets, the plan chosen, predicted vs measured peak, time.

Each cell runs in its own process with ``torch.cuda.set_per_process_memory_fraction`` at the budget: full
pipeline (encode, 20 steps CFG 5, decode), eager, full-size random weights. The all-resident run without a
budget is the baseline of the same run. A last cell forces the all-resident bf16 plan at 23 GiB for 1440² 16:9
(the field report's OOM: measured 23.3 GiB allocated, so it must fail) and shows the recovery onto the next plan,
with the allocated memory before the failed attempt and after the clean-up.

    python benchmarks/memory.py --root /tmp/lens-full --json $OUT/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GIB = 2**30
SIZES = {"1024 1:1": (1024, 1024), "1440 16:9": (1088, 1936)}


def cell(root: str, budget: float | None, size: str, force_resident: bool) -> dict:
    """One generation under a budget; returns what the table needs."""
    from lensrun import memory
    from lensrun.engine import Engine, Task, plans_for
    from lensrun.request import EngineOptions, GenerationRequest

    height, width = SIZES[size]
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    if budget is not None:
        torch.cuda.set_per_process_memory_fraction(budget * GIB / total, device)
    vram = budget if budget is not None else total / GIB
    options = EngineOptions(model=root, vram=str(vram), compile=False)
    request = GenerationRequest.build(prompt="a cinematic mountain lake at sunrise", seed=42, height=height, width=width)
    try:
        plans, _ = plans_for(device, [request], options, memory.ComponentSizes.lens(), compiled=False)
    except Exception as err:  # noqa: BLE001 - reported in the table
        return {"error": str(err)}
    if force_resident:
        plans = [memory.Plan(), *plans]
    pred = memory.predict(plans[0], memory.ComponentSizes.lens(), height, width)
    engine = Engine.load(options)  # weights in CPU memory: each plan places them
    notes: list[str] = []
    if not force_resident:  # warm kernels and pinned buffers, so the timed run is a steady-state one
        warm = GenerationRequest.build(prompt="warm up", seed=1, height=height, width=width, steps=2)
        engine.run([Task(warm)], plans=list(plans))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    [result] = engine.run([Task(request)], plans=list(plans), notify=notes.append)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = result
    final = memory.predict(
        next(p for p in plans if p.name == out.report["plan"]), memory.ComponentSizes.lens(), height, width
    )
    return {
        "plan": out.report["plan"], "first_plan": plans[0].name, "fallbacks": out.report.get("fallbacks", []),
        "notes": notes, "predicted_gib": final.peak_bytes / GIB, "first_predicted_gib": pred.peak_bytes / GIB,
        "measured_allocated_gib": out.report["peak_allocated_gib"], "measured_reserved_gib": out.report["peak_reserved_gib"],
        "seconds": seconds, "phase_seconds": out.report["seconds"], "allocated_before_gib": before / GIB,
        "allocated_after_gib": torch.cuda.memory_allocated(device) / GIB,
        "recoveries": out.report.get("recoveries", []),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/lens-full")
    ap.add_argument("--json", default="memory.json")
    ap.add_argument("--cell", nargs=3, metavar=("BUDGET", "SIZE", "FORCE"), help=argparse.SUPPRESS)
    ap.add_argument("--budgets", default="none,24,16,12,8", help="comma-separated GiB; 'none' = the resident baseline")
    ap.add_argument("--no-forced", action="store_true", help="skip the forced-OOM cell")
    args = ap.parse_args()
    if args.cell:
        budget = None if args.cell[0] == "none" else float(args.cell[0])
        print("CELL " + json.dumps(cell(args.root, budget, args.cell[1], args.cell[2] == "1")), flush=True)
        return
    from lensrun.random_checkpoint import ensure_checkpoint

    ensure_checkpoint(args.root, device="cuda")
    rows = []
    budgets = [None if b == "none" else float(b) if "." in b else int(b) for b in args.budgets.split(",")]
    jobs = [(b, s, False) for s in SIZES for b in budgets] + ([] if args.no_forced else [(23, "1440 16:9", True)])
    for budget, size, force in jobs:
        cmd = [sys.executable, __file__, "--root", args.root, "--cell", str(budget).lower(), size, str(int(force))]
        env = {**os.environ, "LENSRUN_CACHE_DIR": tempfile.mkdtemp(prefix="lensrun-cell-")}  # every cell encodes
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("CELL ")), None)
        result = json.loads(line[5:]) if line else {"error": (proc.stderr or proc.stdout)[-400:]}
        rows.append({"budget_gib": budget, "size": size, "forced_resident": force, **result})
        Path(args.json).write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
        print(json.dumps(rows[-1]), flush=True)
    base = {r["size"]: r.get("seconds") for r in rows if r["budget_gib"] is None}
    print(f"\nGPU {torch.cuda.get_device_name(0)}, {time.strftime('%Y-%m-%d')}")
    print(f"{'budget':>7s} {'size':10s} {'plan':48s} {'pred GiB':>8s} {'alloc':>6s} {'rsvd':>6s} {'err %':>6s} {'time s':>7s} {'vs resident':>11s}")
    for r in rows:
        label = "none" if r["budget_gib"] is None else f"{r['budget_gib']}G" + ("*" if r["forced_resident"] else "")
        if "error" in r:
            print(f"{label:>7s} {r['size']:10s} {'— ' + r['error'][:90]}")
            continue
        err = 100 * (r["predicted_gib"] - r["measured_allocated_gib"]) / r["measured_allocated_gib"]
        print(
            f"{label:>7s} {r['size']:10s} {r['plan']:48s} {r['predicted_gib']:8.2f} {r['measured_allocated_gib']:6.2f} "
            f"{r['measured_reserved_gib']:6.2f} {err:+6.1f} {r['seconds']:7.2f} "
            + (f"{r['seconds'] / base[r['size']]:10.2f}x" if base.get(r["size"]) else f"{'—':>11s}")
        )
        for rec in r.get("recoveries", []):
            print(f"{'':18s}recovered from OOM under {rec['plan']}: allocated {rec['allocated_before_gib']:.2f} GiB "
                  f"before the attempt, {rec['allocated_after_cleanup_gib']:.2f} GiB after clean-up")  # fmt: skip


if __name__ == "__main__":
    main()
