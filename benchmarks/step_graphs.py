"""Denoising with each step replayed as one CUDA graph vs the compiled Python loop, same process, same weights.

1024² Lens (20 steps, CFG 5): denoise median of 3 with and without step graphs, the largest latent difference
between the two, and Turbo (4 steps, CFG 1) end to end with unseen prompts. One precision per process (dynamo
guards of a second precision would slow the first's blocks):

    python benchmarks/step_graphs.py --root /tmp/lens-full --precision bf16 --json $OUT/graphs-bf16.json

The Python loop is what every image of a shape not seen before runs (a new text bucket included), so its
time with and without the one-pass attention inputs (``--unfused``) is the user's, not only the replays'; the
``new_shape`` rows compare that loop with capturing the step at once (``GraphCache(sightings=1)``) for Lens and
Turbo — whether the first image of a shape should capture (fp8's loop took 2.4 s against 1.1 s replayed). Last,
one replayed denoise under the profiler: kernel time against wall time per step (the GPU's idle time in the graph).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lensrun import LensPipeline, attention
from lensrun.random_checkpoint import ensure_checkpoint
from lensrun.request import GenerationRequest

PROMPT = "A cinematic film still of a lone astronaut on a red desert dune at dusk, two distant moons"


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def replay_profile(denoise, steps: int) -> dict:
    """One denoise replayed from its step graphs under the profiler: the GPU's time in kernels against the wall
    time per step. What is left is idle time between kernels inside the graphs (a dependent kernel's launch and
    its predecessor's tail), which only fewer kernels can remove."""
    for _ in range(2):  # the shape's graph exists after these under either sighting rule: none is captured below
        denoise()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        denoise()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(e.device_time_total for e in kernels) / 1000
    ranked = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[:12]
    out = {"wall_ms_per_step": wall * 1000 / steps, "kernel_ms_per_step": busy_ms / steps,
           "kernels_per_step": len(kernels) / steps,
           "top": [{"kernel": e.key[:100], "ms_per_step": e.device_time_total / 1000 / steps, "calls_per_step": e.count / steps}
                   for e in ranked]}  # fmt: skip
    idle = out["wall_ms_per_step"] - out["kernel_ms_per_step"]
    print(f"replayed step: {out['wall_ms_per_step']:.2f} ms wall, {out['kernel_ms_per_step']:.2f} ms in "
          f"{out['kernels_per_step']:.0f} kernels, {idle:.2f} ms idle ({1000 * idle / out['kernels_per_step']:.2f} µs per kernel)", flush=True)  # fmt: skip
    for row in out["top"]:
        print(f"  {row['ms_per_step']:7.2f} ms  x{row['calls_per_step']:<5.0f} {row['kernel']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/lens-full")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--json", default="graphs.json")
    ap.add_argument("--attention", default="auto", help="the DiT's attention backend (auto: as a run picks it)")
    ap.add_argument(
        "--unfused", action="store_true", help="FlashAttention's inputs by Inductor's kernels, not lensrun.joint_qkv"
    )
    args = ap.parse_args()
    root = Path(args.root)
    ensure_checkpoint(root, device="cuda")
    t0 = time.perf_counter()
    pipe = LensPipeline.from_pretrained(root, dtype=torch.bfloat16, device="cuda")
    backend, why = attention.resolve(args.attention, args.precision, pipe.device, pipe.dtype)
    pipe.transformer.set_attention_backend(backend)
    pipe.transformer.set_fused_attention_inputs(not args.unfused)
    pipe.optimize(True, args.precision)
    print(why, "(one-pass inputs off)" if args.unfused else "", flush=True)
    req = GenerationRequest.build(prompt=PROMPT, seed=7, base_resolution=1024, aspect_ratio="1:1", steps=20, cfg=5.0)
    cond = pipe.encode_one(PROMPT)
    empty = [f[:, :0] for f in cond]
    noise = pipe.initial_noise(7, req.grid)
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "precision": args.precision, "attention": backend, "one_pass_inputs": not args.unfused,
              "rows": []}  # fmt: skip
    latents = {}
    for graphs in (False, True):
        pipe.graph_steps = graphs
        first, _ = timed(lambda: pipe.denoise(noise, cond, empty, req), 1)  # compile / capture
        med, latents[graphs] = timed(lambda: pipe.denoise(noise, cond, empty, req), 3)
        prompts = iter([f"turbo prompt {graphs} {i}" for i in range(8)])
        turbo = lambda: pipe(next(prompts), base_resolution=1024, aspect_ratio="1:1", num_inference_steps=4,
                             guidance_scale=1.0, seed=3, output_type="pt")  # fmt: skip
        timed(turbo, 1)
        turbo_s, out = timed(turbo, 3)
        row = {"step_graphs": graphs, "first_denoise_s": first, "denoise_s": med, "turbo_e2e_s": turbo_s,
               "turbo_phases_s": out.timings}  # fmt: skip
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    # The first image of a shape not seen before (compiled code warm): the Python loop (a graph on the second
    # sighting, bf16's rule) against capturing at once and replaying every step (quantized DiTs' rule).
    turbo_req = GenerationRequest.build(prompt=PROMPT, seed=7, base_resolution=1024, aspect_ratio="1:1", steps=4,
                                        cfg=1.0)  # fmt: skip
    report["new_shape"] = []
    for name, r, uncond in (("Lens 1024²", req, empty), ("Turbo 1024²", turbo_req, None)):
        for sightings in (2, 1):
            pipe.step_graphs.reset()
            pipe.step_graphs.graphs.sightings = sightings
            first_s, _ = timed(lambda r=r, uncond=uncond: pipe.denoise(noise, cond, uncond, r), 1)
            row = {"case": name, "sightings": sightings, "first_image_denoise_s": first_s}
            report["new_shape"].append(row)
            print(json.dumps(row), flush=True)
    pipe.step_graphs.follow_precision(pipe.precision)  # the rule in force again
    pipe.graph_steps = True
    report["replay_profile"] = replay_profile(lambda: pipe.denoise(noise, cond, empty, req), req.steps)
    pipe.step_graphs.reset()
    diff = (latents[True].float() - latents[False].float()).abs().max().item()
    report["max_latent_diff"] = diff
    report["total_s"] = time.perf_counter() - t0
    Path(args.json).write_text(json.dumps(report, indent=1))
    base, fast = report["rows"]
    print(f"{args.precision}: denoise 1024² {base['denoise_s']:.3f} s -> {fast['denoise_s']:.3f} s with step graphs "
          f"({base['denoise_s'] / fast['denoise_s']:.2f}x); Turbo e2e {base['turbo_e2e_s']:.3f} -> {fast['turbo_e2e_s']:.3f} s; "
          f"max latent diff {diff:.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
