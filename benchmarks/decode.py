"""The FLUX.2 VAE decode at the Lens sizes, four ways in one process: eager (today's path), eager with cuDNN's
autotuner, eager channels-last (with the autotuner), and the channels-last decoder compiled — each with its first
call (autotuning / compilation included) and its largest difference from the eager image.

Why: Turbo's 1024² image ends with the decode. On 2026-11-26 the compiled channels-last decoder took 36 ms at
1024² (H200); since the engine dropped its compilation (2026-11-28: "compiling it cost more than a decode
saves"), the eager decode takes 88–90 ms (speed.py's e2e rows), a third of Turbo's 0.25 s end to end. This
measures which part of the 36 ms came from channels-last or the autotuner alone, which cost no compilation.

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="decode.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(**vae_init_kwargs(FULL_VAE_CONFIG)).to("cuda", torch.bfloat16).eval()
    latents = {name: torch.randn(1, 32, h, w, device="cuda", dtype=torch.bfloat16) for name, (h, w) in SIZES.items()}
    reference: dict[str, torch.Tensor] = {}
    rows = []

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

    def plain(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z, return_dict=False)[0]

    measure("eager (today)", plain)
    torch.backends.cudnn.benchmark = True
    measure("eager + cudnn.benchmark", plain)
    vae.to(memory_format=torch.channels_last)
    measure("eager channels-last + benchmark", lambda z: plain(z.contiguous(memory_format=torch.channels_last)))
    vae.decoder.compile()
    measure("compiled channels-last + benchmark", lambda z: plain(z.contiguous(memory_format=torch.channels_last)))
    with open(args.json, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
