"""What capturing a CUDA graph costs, and whether it recompiles.

First four 4-step 1024² denoises of one shape (compile, loop, capture, replay); run with TORCH_LOGS=recompiles to
see any recompilation. Then lensrun's capture against the ``torch.cuda.graph`` context it replaced (which empties
the allocator's device and pinned-host caches before every capture), alternating, twice each, in this process
that has run denoises: the encoder's graph for a new padded length (the second new prompt captures it), then the
step graph for a new shape (the sighting that captures it under the precision's rule), each followed by a run that
allocates whatever was freed.

    TORCH_LOGS=recompiles python benchmarks/capture_cost.py --precision fp8 --json capture.json
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lensrun import LensPipeline, attention, cuda_graphs, step_graph
from lensrun.models import text_encoder
from lensrun.random_checkpoint import ensure_checkpoint
from lensrun.request import GenerationRequest


def torch_context_capture(fn, pool):
    """The capture as lensrun did it before 2026-11-29: warm-up on a side stream, then ``torch.cuda.graph``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        outputs = fn()
    return graph, outputs


METHODS = {"torch.cuda.graph": torch_context_capture, "lensrun": cuda_graphs.capture}


def seconds(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def compare(p: LensPipeline, cond, empty, noise, req) -> list[dict]:
    rows = []
    for round_ in range(2):
        for name, method in METHODS.items():
            text_encoder.capture = step_graph.capture = method
            p.text_encoder.reset_graphs()
            p.encode_one(f"a new prompt {time.perf_counter()}")  # first sighting of the length: eager
            reserved = torch.cuda.memory_reserved()
            encoder_capture = seconds(lambda: p.encode_one(f"another new prompt {time.perf_counter()}"))
            emptied = (reserved - torch.cuda.memory_reserved()) / 2**30
            after_encoder = seconds(lambda: p.denoise(noise, cond, empty, req))  # replayed: allocates what was freed
            p.step_graphs.reset()
            for _ in range(p.step_graphs.graphs.sightings - 1):  # the loop, until the sighting that captures
                p.denoise(noise, cond, empty, req)
            step_capture = seconds(lambda: p.denoise(noise, cond, empty, req))
            replay = statistics.median(seconds(lambda: p.denoise(noise, cond, empty, req)) for _ in range(3))
            row = {"method": name, "round": round_, "encoder_capture_s": encoder_capture, "emptied_gib": emptied,
                   "denoise_after_encoder_capture_s": after_encoder, "denoise_with_step_capture_s": step_capture,
                   "denoise_replayed_s": replay}  # fmt: skip
            rows.append(row)
            print(f"{name:17s} round {round_}: encoder capture {encoder_capture:.3f} s (emptied {emptied:.1f} GiB), "
                  f"next denoise {after_encoder:.3f} s; step capture {step_capture:.3f} s, replayed {replay:.3f} s", flush=True)  # fmt: skip
    text_encoder.capture = step_graph.capture = cuda_graphs.capture
    return rows


ap = argparse.ArgumentParser()
ap.add_argument("--root", default="/tmp/lens-full")
ap.add_argument("--precision", default="bf16")
ap.add_argument("--attention", default="auto")
ap.add_argument("--json", default="capture.json")
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
calls = []
for i in range(4):
    print(f"=== call {i} start (graphs {len(p.step_graphs.graphs)}, failed {p.step_graphs.failed})", flush=True)
    calls.append(seconds(lambda: p.denoise(noise, cond, empty, req)))
    print(f"=== call {i}: {calls[-1]:.2f} s", flush=True)
    if i == 0:  # where the first call's time went: tracing, AOT, Inductor, Triton (seconds per phase)
        print(torch._dynamo.utils.compile_times(repr="str", aggregate=True), flush=True)
rows = compare(p, cond, empty, noise, req)
report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
          "precision": args.precision, "attention": backend, "calls_s": calls, "capture": rows}  # fmt: skip
Path(args.json).write_text(json.dumps(report, indent=1))
print(f"\n{'method':17s} {'encoder capture s':>17s} {'emptied GiB':>11s} {'next denoise s':>14s} {'step capture s':>14s} {'replayed s':>10s}")
for r in rows:
    print(f"{r['method']:17s} {r['encoder_capture_s']:17.3f} {r['emptied_gib']:11.1f} {r['denoise_after_encoder_capture_s']:14.3f} "
          f"{r['denoise_with_step_capture_s']:14.3f} {r['denoise_replayed_s']:10.3f}")  # fmt: skip
