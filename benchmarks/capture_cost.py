"""What capturing the denoising step costs, and whether it recompiles: four 4-step 1024² denoises of one shape
(compile, loop, capture, replay). Run with TORCH_LOGS=recompiles to see any recompilation.

    TORCH_LOGS=recompiles python benchmarks/capture_cost.py --precision fp8
"""

import argparse
import time

import torch

from lensrun import LensPipeline, attention
from lensrun.random_checkpoint import ensure_checkpoint
from lensrun.request import GenerationRequest

ap = argparse.ArgumentParser()
ap.add_argument("--root", default="/tmp/lens-full")
ap.add_argument("--precision", default="bf16")
ap.add_argument("--attention", default="auto")
args = ap.parse_args()
ensure_checkpoint(args.root, device="cuda")
p = LensPipeline.from_pretrained(args.root, dtype=torch.bfloat16, device="cuda")
backend, why = attention.resolve(args.attention, args.precision, p.device, p.dtype)
p.transformer.set_attention_backend(backend)
print(why, flush=True)
p.optimize(True, args.precision)
req = GenerationRequest.build(prompt="x", seed=7, base_resolution=1024, aspect_ratio="1:1", steps=4, cfg=5.0)
cond = p.encode_one("a lighthouse on a cliff at dusk")
empty = [f[:, :0] for f in cond]
noise = p.initial_noise(7, req.grid)
for i in range(4):
    torch.cuda.synchronize()
    t = time.perf_counter()
    print(f"=== call {i} start (graphs {len(p.step_graphs.graphs)}, failed {p.step_graphs.failed})", flush=True)
    p.denoise(noise, cond, empty, req)
    torch.cuda.synchronize()
    print(f"=== call {i}: {time.perf_counter() - t:.2f} s", flush=True)
    if i == 0:  # where the first call's time went: tracing, AOT, Inductor, Triton (seconds per phase)
        print(torch._dynamo.utils.compile_times(repr="str", aggregate=True), flush=True)
