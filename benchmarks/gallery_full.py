"""The example gallery end to end on the GPU (full-size random weights), phase-batched vs one image at a time.

Phase-batched = `lensrun gallery` (encode all → denoise all, grouped by size → decode all). One-by-one = one
`lensrun generate` per image with the same settings and plan. Both run under the same budget in one process
(default 16 GiB, where the planner picks a phased plan, so component swaps are what batching saves); the
resident bf16 pipeline is loaded once for both. Prints a table, writes JSON.

    python benchmarks/gallery_full.py --root /tmp/lens-full --vram 16 --json $OUT/gallery.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import lensrun.gallery as g
from lensrun import api
from lensrun.random_checkpoint import ensure_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/lens-full")
    ap.add_argument("--file", default=str(Path(__file__).parents[1] / "examples" / "gallery.toml"))
    ap.add_argument("--model", default=None, help="default: the random checkpoint under --root")
    ap.add_argument("--vram", type=float, default=16.0)
    ap.add_argument("--json", default="gallery.json")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    model = args.model or args.root
    if args.model is None:
        ensure_checkpoint(args.root, device="cuda" if cuda else "cpu")
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.vram * 2**30 / total), 0)
    device = "cuda" if cuda else "cpu"
    vram = f"{args.vram}GB" if cuda else None
    entries = g.load_gallery(args.file)
    out = Path(tempfile.mkdtemp(prefix="lensrun-gallery-"))
    # Load and warm the pipeline once, outside both timings.
    api.generate("warm up", model=model, device=device, vram=vram, compile=False, height=256, width=256, steps=1,
                 seed=0, out=out / "warm")  # fmt: skip

    def forget_prompts() -> None:
        """Both modes must encode their prompts: empty the prompt cache (memory and disk) between them."""
        from lensrun.engine import Engine

        for engine in Engine._shared.values():
            pipe = engine.pipe
            pipe.prompt_cache._memory.clear()
            if pipe.prompt_cache.folder is not None:
                shutil.rmtree(pipe.prompt_cache.folder, ignore_errors=True)

    forget_prompts()
    t0 = time.perf_counter()
    summary = api.gallery(args.file, out=out / "batched", model=model, device=device, vram=vram, compile=False)
    batched = time.perf_counter() - t0
    rows = g.read_manifest(out / "batched")
    forget_prompts()
    t0 = time.perf_counter()
    for e in entries:
        options = {k: v for k, v in e.settings.items() if k not in ("name", "prompt")}
        api.generate(e.settings["prompt"], model=model, device=device, vram=vram, compile=False, out=out / "single", **options)
    single = time.perf_counter() - t0
    images = summary["done"]
    report = {
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu", "date": time.strftime("%Y-%m-%d"),
        "budget_gib": args.vram, "images": images, "failed": summary["failed"], "plan": rows[0]["report"]["plan"] if rows else None,
        "batched_s": batched, "batched_per_image_s": batched / max(images, 1),
        "one_by_one_s": single, "one_by_one_per_image_s": single / max(images, 1),
        "saving_pct": 100 * (single - batched) / single,
    }  # fmt: skip
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"\n{report['gpu']} {report['date']}, budget {args.vram} GiB, plan {report['plan']}, {images} images")
    print(f"phase-batched gallery: {batched:7.1f} s ({report['batched_per_image_s']:.2f} s/image)")
    print(f"one by one (generate): {single:7.1f} s ({report['one_by_one_per_image_s']:.2f} s/image)")
    print(f"saving: {report['saving_pct']:.1f}%")


if __name__ == "__main__":
    main()
