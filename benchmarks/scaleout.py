"""Two GPUs against one, in one run.

One image (`--cases`): denoise time per image and how close the pixels are to the single-GPU pixels. Lens
(CFG 5) runs CFG-parallel, Turbo (CFG 1) sequence-parallel (Ulysses). Each case is a fresh `lensrun generate`
process (compiled, 3 images of one prompt: the last one's denoise time counts, after compilation and any
CUDA-graph capture), first with `--gpus 1`, then `--gpus 2`; the PNGs' run reports give the times.

Many images (`--gallery N`): an N-image 1024² Lens gallery (unique prompts and seeds), a fresh `lensrun
gallery` process on one GPU, then `lensrun gallery --ray` (a local Ray instance, one worker per GPU), after a
compiled two-image warm-up gallery that fills the compile caches both use. Images per second from process start
to the last PNG (what a user waits), and after each run's first PNG; the pixels of the two galleries compared.

    python benchmarks/scaleout.py --root /tmp/lens-full --json scaleout.json
    python benchmarks/scaleout.py --root /tmp/lens-full --cases "" --gallery 40 --json gallery.json
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
# On two GPUs: Lens splits its CFG branches (the default); Turbo asks for the token split, which --gpus alone
# does not choose (measured slower than one GPU before its exchanges were traced into the compiled blocks).
TWO_GPUS = {"1024² Turbo": ["--split", "sequence"], "1440² 16:9 Turbo": ["--split", "sequence"]}


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


def gallery(root: str, file: Path, out: Path, extra: list[str]) -> dict:
    """One `lensrun gallery` process: wall time, and the PNGs' completion times relative to its start."""
    command = [sys.executable, "-m", "lensrun", "gallery", str(file), "--out", str(out), "--model", root, *extra]
    start = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    done = sorted(f.stat().st_mtime - start for f in out.glob("*.png"))
    steady = (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 and done[-1] > done[0] else None
    return {"wall_s": wall, "images": len(done), "images_per_s": len(done) / wall, "first_png_s": done[0],
            "images_per_s_after_first": steady, "files": sorted(f.name for f in out.glob("*.png"))}  # fmt: skip


def gallery_case(root: str, n: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    things = ["fox", "lighthouse", "teapot", "glacier", "violin", "market", "robot", "orchard", "comet", "harbor"]
    lines = [f"a detailed photo of a {things[i % 10]} number {i}, {i * 7 % 13} birds" for i in range(n)]
    (out / "gallery.txt").write_text("\n".join(lines) + "\n")
    (out / "warm.txt").write_text("a warm-up teapot\na warm-up kite\n")
    size = ["--height", "1024", "--width", "1024"]
    gallery(root, out / "warm.txt", out / "warm", [*size, "--compile"])
    one = gallery(root, out / "gallery.txt", out / "one", size)
    two = gallery(root, out / "gallery.txt", out / "two", [*size, "--ray"])
    same = [psnr(out / "one" / f, out / "two" / f) for f in one["files"] if f in two["files"]]
    return {"case": f"{n}-image 1024² gallery", "one_gpu": one, "two_gpus": two, "psnr_db": same,
            "speedup": two["images_per_s"] / one["images_per_s"]}  # fmt: skip


def psnr(a: Path, b: Path) -> float:
    return psnr_db(np.asarray(Image.open(a)), np.asarray(Image.open(b)), 255)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/lens-full")
    ap.add_argument("--out", default="/tmp/scaleout")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--gallery", type=int, default=0, help="images of the gallery case (0: none)")
    ap.add_argument("--json", default="scaleout.json")
    args = ap.parse_args()
    from lensrun.random_checkpoint import ensure_checkpoint

    ensure_checkpoint(args.root, device="cuda")
    rows = []
    for name in filter(None, args.cases.split(",")):
        one = run(args.root, 1, CASES[name], Path(args.out) / name.replace(" ", "_") / "1")
        two = run(args.root, 2, CASES[name] + TWO_GPUS.get(name, []), Path(args.out) / name.replace(" ", "_") / "2")
        same = [psnr(a, b) for a, b in zip(one["files"], two["files"], strict=True)]
        rows.append({"case": name, "one_gpu": one, "two_gpus": two, "psnr_db": same,
                     "ratio": two["denoise_s"][-1] / one["denoise_s"][-1]})  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.gallery:
        rows.append(gallery_case(args.root, args.gallery, Path(args.out) / "gallery"))
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"{'case':<18} {'1 GPU denoise s':>16} {'2 GPUs denoise s':>17} {'ratio':>6} {'1/2 GPU wall s':>15}  PSNR 2 vs 1 GPU")
    for r in rows:
        same = "identical" if all(p == float("inf") for p in r["psnr_db"]) else f"{min(r['psnr_db']):.1f} dB"
        if "speedup" in r:
            one, two = r["one_gpu"], r["two_gpus"]
            print(f"{r['case']}: {one['images_per_s']:.3f} vs {two['images_per_s']:.3f} images/s from process start "
                  f"(wall {one['wall_s']:.1f} / {two['wall_s']:.1f} s) = {r['speedup']:.2f}x; after the first PNG "
                  f"{one['images_per_s_after_first']:.3f} vs {two['images_per_s_after_first']:.3f}; {same}")  # fmt: skip
            continue
        print(f"{r['case']:<18} {r['one_gpu']['denoise_s'][-1]:>16.3f} {r['two_gpus']['denoise_s'][-1]:>17.3f} "
              f"{r['ratio']:>6.2f} {r['one_gpu']['wall_s']:>7.1f}/{r['two_gpus']['wall_s']:<7.1f}  {same}")  # fmt: skip


if __name__ == "__main__":
    main()
