"""Compiling while serving: the DiT's blocks compile on a side thread while requests keep running eagerly.

A server must not hold a request behind a compilation (tens of seconds with empty caches). The compiled blocks
are installed closed (``LensTransformer.compile_blocks(open=False)``); a daemon thread runs one small forward
through them — both text-length graphs (a prompt, and the empty negative prompt of length 0), token counts
symbolic — so every later size and prompt length finds its code compiled; the engine switches between two runs.

Compiling holds the interpreter lock most of the time, which slows the eager runs meanwhile (measured ~4× on an
H200 with empty caches). So with empty caches a child process first compiles a one-block DiT of the same
config — regional compilation compiles one block graph whatever the depth — filling the on-disk compile caches
with no lock shared; the thread's own compilation then mostly reads them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time

import torch

# The warm-up forward: a 16×16 token grid, an 8-token prompt and the empty (0-token) negative prompt.
WARM_GRID = (16, 16)
WARM_TEXT_TOKENS = 8


class BackgroundCompile:
    """One compilation on its own thread; ``ready`` once it finished (``error`` says if it failed)."""

    def __init__(self, pipe, fill_caches_first: bool = False) -> None:
        self.pipe = pipe
        self.child = fill_caches(pipe.transformer, pipe.device, pipe.dtype) if fill_caches_first else None
        self.gate = pipe.transformer.compile_blocks(open=False)
        self.error: str | None = None
        self.seconds: float | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lensrun-compile", daemon=True)
        self.thread.start()

    def ready(self) -> bool:
        return self.done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            if self.child is not None:  # a failed child only means the compilation below starts cold
                self.child.wait()
            with self.gate.warming():
                warm_up(self.pipe.transformer, self.pipe.device, self.pipe.dtype)
        except Exception as err:  # noqa: BLE001 - a failed compilation leaves the server eager, said once
            self.error = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
        finally:
            self.seconds = time.perf_counter() - start
            self.done.set()


def fill_caches(transformer, device: torch.device, dtype: torch.dtype) -> subprocess.Popen:
    """Start a child process that compiles a one-block copy of ``transformer`` (same config, attention backend,
    device and dtype; random weights) into the on-disk compile caches this process uses."""
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    spec = {"config": config, "attention": transformer.attention_backend, "device": str(device),
            "dtype": str(dtype).removeprefix("torch.")}  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "lensrun.background_compile", json.dumps(spec)], env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def _fill_caches(spec: dict) -> None:
    from lensrun.models.transformer_lens import LensTransformer2DModel

    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    with torch.device(device):
        transformer = LensTransformer2DModel.from_config({**spec["config"], "num_layers": 1}).to(dtype).eval()
    transformer.set_attention_backend(spec["attention"])
    transformer.compile_blocks()
    warm_up(transformer, device, dtype)


@torch.inference_mode()
def warm_up(transformer, device: torch.device, dtype: torch.dtype) -> None:
    """One CFG forward at a small size through the compiled blocks, on a side stream on CUDA (the serving
    thread's kernels keep their own stream)."""
    from lensrun.acceleration import attention_kernels

    config = transformer.config
    feature_dim = transformer.txt_norm[0].weight.shape[0]
    n_features = len(transformer.txt_norm)
    tokens = WARM_GRID[0] * WARM_GRID[1]
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext(), attention_kernels(device):
        latents = torch.randn(1, tokens, config.in_channels, device=device, dtype=dtype)
        prompt = [torch.randn(1, WARM_TEXT_TOKENS, feature_dim, device=device, dtype=dtype) for _ in range(n_features)]
        empty = [torch.zeros(1, 0, feature_dim, device=device, dtype=dtype) for _ in range(n_features)]
        conditioning = transformer.conditioning(torch.full((1,), 0.5, device=device, dtype=dtype))
        transformer.forward_branches(latents, [prompt, empty], None, [(1, *WARM_GRID)], conditioning)
    if stream is not None:
        stream.synchronize()


if __name__ == "__main__":
    _fill_caches(json.loads(sys.argv[1]))
