"""Measure the activation memory the planner's model needs (full-size random weights, one GPU).

For each phase, the peak allocated above what was allocated before it: DiT forward (fast path, eager and
compiled) at several token counts, the encoder at several prompt lengths, the VAE decode full and tiled.
Writes JSON; `lensrun/memory.py` takes its coefficients from these numbers.

    python benchmarks/calibrate_memory.py --root /tmp/lens-full --json $OUT/calibration.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lensrun import LensPipeline
from lensrun.decoding import decode_tokens
from lensrun.random_checkpoint import ensure_checkpoint

GRIDS = [(64, 64), (68, 121), (90, 90)]  # 1024², 1440² 16:9 (1088×1936), 1440² 1:1


def extra_peak(fn) -> float:
    """GiB allocated at the peak of ``fn`` above what was allocated when it started."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/lens-full")
    ap.add_argument("--json", default="calibration.json")
    ap.add_argument("--compiled", action="store_true", help="also measure the compiled DiT")
    args = ap.parse_args()
    ensure_checkpoint(args.root, device="cuda")
    pipe = LensPipeline.from_pretrained(Path(args.root), dtype=torch.bfloat16, device="cuda")
    out: dict = {"gpu": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "dit": [], "encoder": [], "vae": []}
    weights = {
        "transformer": sum(p.numel() * p.element_size() for p in pipe.transformer.parameters()) / 2**30,
        "text_encoder": sum(p.numel() * p.element_size() for p in pipe.text_encoder.parameters()) / 2**30,
        "embedding": pipe.text_encoder.embed_tokens.weight.numel() * 2 / 2**30,
        "vae": sum(p.numel() * p.element_size() for p in pipe.vae.parameters()) / 2**30,
    }
    out["weights_gib"] = weights
    for tokens in (64, 256, 512):
        ids, mask = torch.randint(0, pipe.text_encoder.config.vocab_size, (1, tokens)), torch.ones(1, tokens, dtype=torch.bool)
        out["encoder"].append({"tokens": tokens, "extra_gib": extra_peak(lambda: pipe.text_encoder(ids, mask))})
    text = [torch.randn(1, 120, 2880, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    t = torch.tensor([0.5], device="cuda", dtype=torch.bfloat16)

    def dit_rows(label: str) -> None:
        for gh, gw in GRIDS:
            x = torch.randn(1, gh * gw, 128, device="cuda", dtype=torch.bfloat16)
            with torch.inference_mode():
                pipe.transformer(x, text, None, t, [(1, gh, gw)])  # warm (compile)
                gib = extra_peak(lambda: pipe.transformer(x, text, None, t, [(1, gh, gw)]))
            out["dit"].append({"mode": label, "grid": [gh, gw], "tokens": gh * gw + 120, "extra_gib": gib})
            print(label, gh, gw, f"{gib:.3f} GiB", flush=True)

    dit_rows("eager")
    for tiled in (False, True):
        if tiled:
            pipe.vae.enable_tiling()
        for gh, gw in GRIDS:
            z = torch.randn(1, gh * gw, 128, device="cuda", dtype=torch.bfloat16)
            gib = extra_peak(lambda: decode_tokens(pipe.vae, z, (gh, gw)))
            out["vae"].append({"tiled": tiled, "pixels": gh * gw * 256, "grid": [gh, gw], "extra_gib": gib})
            print("vae", "tiled" if tiled else "full", gh, gw, f"{gib:.3f} GiB", flush=True)
    pipe.vae.disable_tiling()
    if args.compiled:
        pipe.optimize(compile=True)
        dit_rows("compiled")
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
