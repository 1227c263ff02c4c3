"""The FLUX.2 VAE decode at the Lens sizes, several ways in one process, each with its first call (autotuning /
compilation included), median, largest difference from the first way's image and peak memory; and the top
kernels of each eager way at 1024².

Rows: eager with torch's GroupNorm (the diffusers model as is), eager with lensrun's ``decoding.group_norm`` (what
the pipeline runs on a GPU), the same channels-last; ``--compiled`` adds the channels-last decoder compiled per
size (the 2026-11-26 engine's decode, 36 ms at 1024² on an H200 after 23.5 s of compiling, 45.7 s again for
1440² 16:9). 2026-11-29, H200: torch's GroupNorm statistics kernel took 44.6 of the 85 ms eager decode; cuDNN's
autotuner (85.0 ms) and channels-last alone (129.5 ms) did not help; lensrun's GroupNorm: 41.4 ms, no compiling.

    python benchmarks/decode.py --json $OUT/decode.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from diffusers import AutoencoderKLFlux2

from lensrun.configs import FULL_VAE_CONFIG, vae_init_kwargs
from lensrun.decoding import use_fast_group_norm

SIZES = {"1024²": (128, 128), "1440² 16:9": (136, 242)}  # VAE latents [32, 2H, 2W] of the token grids


def seconds(fn, repeats: int = 5) -> tuple[float, float]:
    """(first call, median of ``repeats`` later calls), synchronized."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def top_kernels(decode, z: torch.Tensor, count: int = 12) -> list[dict]:
    """The GPU kernels of one decode, largest total time first (printed too)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode(z)
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events)
    print(f"eager decode 1024², GPU time {total / 1e3:.1f} ms in kernels; top {count}:")
    top = []
    for e in events[:count]:
        top.append({"name": e.key[:120], "calls": e.count, "ms": e.device_time_total / 1e3})
        print(f"  {e.device_time_total / 1e3:7.2f} ms  {e.count:4d}×  {e.key[:100]}")
    return top


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="decode.json")
    ap.add_argument("--compiled", action="store_true", help="also the compiled channels-last decoder (70 s of compiling)")
    args = ap.parse_args()
    latents = {name: torch.randn(1, 32, h, w, device="cuda", dtype=torch.bfloat16) for name, (h, w) in SIZES.items()}
    reference: dict[str, torch.Tensor] = {}
    rows = []

    def fresh_vae(channels_last: bool) -> AutoencoderKLFlux2:
        torch.manual_seed(0)  # the same weights for every way
        vae = AutoencoderKLFlux2(**vae_init_kwargs(FULL_VAE_CONFIG)).to("cuda", torch.bfloat16).eval()
        return vae.to(memory_format=torch.channels_last) if channels_last else vae

    def decoder_of(vae: AutoencoderKLFlux2, channels_last: bool):
        layout = torch.channels_last if channels_last else torch.contiguous_format
        return lambda z: vae.decode(z.contiguous(memory_format=layout), return_dict=False)[0]

    def measure(way: str, decode) -> None:
        for name, z in latents.items():
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                first, median = seconds(lambda z=z: decode(z))
                image = decode(z).float()
            reference.setdefault(name, image)
            rows.append({"way": way, "size": name, "first_s": first, "median_s": median,
                         "max_diff_vs_eager": float((image - reference[name]).abs().max()),
                         "peak_gib": torch.cuda.max_memory_allocated() / 2**30})  # fmt: skip
            r = rows[-1]
            print(f"{way:<34} {name:<11} first {first:7.3f} s  median {median * 1e3:7.1f} ms  "
                  f"max diff {r['max_diff_vs_eager']:.1e}  peak {r['peak_gib']:.1f} GiB", flush=True)  # fmt: skip

    eager = decoder_of(fresh_vae(False), False)
    measure("eager, torch's GroupNorm", eager)
    top = {"torch GroupNorm": top_kernels(eager, latents["1024²"])}
    for channels_last in (False, True):
        vae = fresh_vae(channels_last)
        use_fast_group_norm(vae.decoder)
        fast = decoder_of(vae, channels_last)
        way = f"eager{', channels-last' if channels_last else ''}, lensrun group_norm"
        measure(way, fast)
        top[way] = top_kernels(fast, latents["1024²"])
    if args.compiled:
        vae = fresh_vae(True)
        vae.decoder.compile()
        measure("compiled channels-last, per size", decoder_of(vae, True))
    with open(args.json, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "top_kernels_1024": top}, f, indent=1)


if __name__ == "__main__":
    main()
