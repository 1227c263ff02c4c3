"""Compiling while serving: the DiT's blocks compile on a side thread while requests keep running eagerly.

A server must not hold a request behind a compilation (tens of seconds with empty caches). The compiled blocks
are installed closed (``LensTransformer.compile_blocks(open=False)``); a daemon thread runs one small forward
through them — both text-length graphs (a prompt, and the empty negative prompt of length 0), token counts
symbolic — so every later size and prompt length finds its code compiled; the engine switches between two runs.
"""

from __future__ import annotations

import contextlib
import threading
import time

import torch

# The warm-up forward: a 16×16 token grid, an 8-token prompt and the empty (0-token) negative prompt.
WARM_GRID = (16, 16)
WARM_TEXT_TOKENS = 8


class BackgroundCompile:
    """One compilation on its own thread; ``ready`` once it finished (``error`` says if it failed)."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
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
            with self.gate.warming():
                warm_up(self.pipe)
        except Exception as err:  # noqa: BLE001 - a failed compilation leaves the server eager, said once
            self.error = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
        finally:
            self.seconds = time.perf_counter() - start
            self.done.set()


@torch.inference_mode()
def warm_up(pipe) -> None:
    """One CFG forward at a small size through the compiled blocks, on a side stream on CUDA (the serving
    thread's kernels keep their own stream)."""
    from lensrun.acceleration import attention_kernels

    transformer = pipe.transformer
    device, dtype = pipe.device, pipe.dtype
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
