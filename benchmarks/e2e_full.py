"""End-to-end Lens on the GPU with full-size random weights in the real checkpoint layout.

Writes the checkpoint (fp32 transformer shards, MXFP4-packed GPT-OSS-20B shards, FLUX.2 VAE, scheduler, a small
tokenizer) unless it exists, loads it through ``LensPipeline.from_pretrained`` and generates, measuring each
phase and the peak VRAM. Also times the encoder alone at 512 tokens. Prints a table, writes JSON.

    python benchmarks/e2e_full.py --root /tmp/lens-full --json $OUT/e2e.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from lensrun import LensPipeline, __version__
from lensrun.random_checkpoint import ensure_checkpoint

CASES = [  # (label, generate kwargs)
    ("Lens 1024² 1:1, 20 steps, CFG 5", dict(base_resolution=1024, aspect_ratio="1:1")),
    ("Lens 1440² 16:9, 20 steps, CFG 5", dict(base_resolution=1440, aspect_ratio="16:9")),
    ("Turbo-preset 1024², 4 steps, CFG 1", dict(base_resolution=1024, aspect_ratio="1:1", num_inference_steps=4, guidance_scale=1.0)),
]  # fmt: skip
PROMPT = "A cinematic film still of a lone astronaut on a red desert dune at dusk, two distant moons"


def gib(n: int) -> float:
    return n / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/lens-full")
    ap.add_argument("--json", default="e2e.json")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    root = Path(args.root)
    rows: list[dict] = []
    info = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "lensrun": __version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    t0 = time.perf_counter()
    if ensure_checkpoint(root, device="cuda"):
        info["write_checkpoint_s"] = time.perf_counter() - t0
        torch.cuda.empty_cache()
    info["checkpoint_gib"] = gib(sum(f.stat().st_size for f in root.rglob("*") if f.is_file()))

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pipe = LensPipeline.from_pretrained(root, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    info["load_s"] = time.perf_counter() - t0
    info["resident_weights_gib"] = gib(torch.cuda.memory_allocated())
    info["weights_gib"] = {
        name: gib(sum(p.numel() * p.element_size() for p in m.parameters()))
        for name, m in (("transformer", pipe.transformer), ("text_encoder", pipe.text_encoder), ("vae", pipe.vae))
    }

    # Encoder alone at 512 tokens (the maximum the template allows).
    ids = torch.randint(0, 199_000, (1, 512))
    mask = torch.ones(1, 512, dtype=torch.bool)
    enc_times = []
    for _ in range(4):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipe.text_encoder(ids, mask)
        torch.cuda.synchronize()
        enc_times.append(time.perf_counter() - t0)
    info["encoder_512_tokens_s"] = sorted(enc_times[1:])[len(enc_times[1:]) // 2]

    for label, kwargs in CASES:
        runs = []
        for _ in range(args.repeats + 1):  # first run warms up
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            out = pipe(PROMPT, seed=42, output_type="pil", **kwargs)
            torch.cuda.synchronize()
            total = time.perf_counter() - t0
            runs.append(
                dict(
                    total_s=total,
                    **{f"{k}_s": v for k, v in out.timings.items()},
                    peak_allocated_gib=gib(torch.cuda.max_memory_allocated()),
                    peak_reserved_gib=gib(torch.cuda.max_memory_reserved()),
                )
            )
        warm = runs[1:]
        med = {k: sorted(r[k] for r in warm)[len(warm) // 2] for k in warm[0]}
        size = out.images[0].size
        rows.append(dict(case=label, size=f"{size[0]}x{size[1]}", warmup=runs[0], **med))
        out.images[0].save(Path(args.json).with_name(f"e2e_{len(rows)}.png"))

    print(f"\nGPU: {info['gpu']}  torch {info['torch']}  date {info['date']}")
    print(f"load {info['load_s']:.1f}s, resident weights {info['resident_weights_gib']:.2f} GiB {info['weights_gib']}")
    print(f"encoder, 512 tokens: {info['encoder_512_tokens_s'] * 1000:.0f} ms")
    print(f"{'case':38s} {'size':>10s} {'total s':>8s} {'encode':>7s} {'denoise':>8s} {'decode':>7s} {'peak alloc':>10s} {'peak rsvd':>9s}")
    for r in rows:
        print(
            f"{r['case']:38s} {r['size']:>10s} {r['total_s']:8.2f} {r.get('encode_s', 0):7.3f} {r.get('denoise_s', 0):8.2f} "
            f"{r.get('decode_s', 0):7.3f} {r['peak_allocated_gib']:9.2f}G {r['peak_reserved_gib']:8.2f}G"
        )
    Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
