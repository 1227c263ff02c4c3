"""One image on two GPUs against one GPU, in one run: denoise time per image and how close the pixels are to
the single-GPU pixels. Lens (CFG 5) runs CFG-parallel, Turbo (CFG 1) sequence-parallel (Ulysses).

Each case is a fresh `lensrun generate` process (compiled, 3 images of one prompt: the last one's denoise time
counts, after compilation and any CUDA-graph capture), first with `--gpus 1`, then `--gpus 2`; the PNGs' run
reports give the times.

    python benchmarks/scaleout.py --root /tmp/lens-full --json scaleout.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from quality import psnr as psnr_db

CASES = {
    "1024² Lens": ["--height", "1024", "--width", "1024"],
    "1440² 16:9 Lens": ["--base-resolution", "1440", "--aspect-ratio", "16:9"],
    "1024² Turbo": ["--height", "1024", "--width", "1024", "--variant", "turbo"],  # CFG 1: sequence-parallel
    "1440² 16:9 Turbo": ["--base-resolution", "1440", "--aspect-ratio", "16:9", "--variant", "turbo"],
}


def run(root: str, gpus: int, size: list[str], out: Path) -> dict:
    command = [sys.executable, "-m", "lensrun", "generate", "--model", root, "--prompt", "a lighthouse on a cliff at dusk",
               "--n", "3", "--seed", "11", "--compile", "--gpus", str(gpus), "--out", str(out), *size]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    from lensrun.metadata import read_report

    files = sorted(out.glob("*.png"))
    reports = [read_report(f) for f in files]
    return {"wall_s": wall, "files": [str(f) for f in files], "denoise_s": [r["seconds"]["denoise"] for r in reports]}


def psnr(a: Path, b: Path) -> float:
    return psnr_db(np.asarray(Image.open(a)), np.asarray(Image.open(b)), 255)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/lens-full")
    ap.add_argument("--out", default="/tmp/scaleout")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--json", default="scaleout.json")
    args = ap.parse_args()
    from lensrun.random_checkpoint import ensure_checkpoint

    ensure_checkpoint(args.root, device="cuda")
    rows = []
    for name in args.cases.split(","):
        one = run(args.root, 1, CASES[name], Path(args.out) / name.replace(" ", "_") / "1")
        two = run(args.root, 2, CASES[name], Path(args.out) / name.replace(" ", "_") / "2")
        same = [psnr(a, b) for a, b in zip(one["files"], two["files"], strict=True)]
        rows.append({"case": name, "one_gpu": one, "two_gpus": two, "psnr_db": same,
                     "ratio": two["denoise_s"][-1] / one["denoise_s"][-1]})  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"{'case':<18} {'1 GPU denoise s':>16} {'2 GPUs denoise s':>17} {'ratio':>6} {'1/2 GPU wall s':>15}  PSNR 2 vs 1 GPU")
    for r in rows:
        same = "identical" if all(p == float("inf") for p in r["psnr_db"]) else f"{min(r['psnr_db']):.1f} dB"
        print(f"{r['case']:<18} {r['one_gpu']['denoise_s'][-1]:>16.3f} {r['two_gpus']['denoise_s'][-1]:>17.3f} "
              f"{r['ratio']:>6.2f} {r['one_gpu']['wall_s']:>7.1f}/{r['two_gpus']['wall_s']:<7.1f}  {same}")  # fmt: skip


if __name__ == "__main__":
    main()
