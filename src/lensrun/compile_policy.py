"""Whether a run compiles: only when the images it makes repay the compilation, or when it costs little.

Compiling the DiT's blocks makes each denoising step about twice as fast but costs seconds of tracing and code
generation before the first step; a one-image command is quicker eager. The decision is a pure function of the
run (its images' predicted compiled denoise times), the device, and whether this machine has compiled this
model before (then torch's on-disk caches make a compilation cheap). Compiled state is remembered per process,
and a marker per (torch, lensrun, GPU, dtype, precision) records that the on-disk caches are warm.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

# Eager over compiled denoise time: H100 2026-11-26 (docs/performance.md): 3.542 / 1.555 s at 1024²,
# 7.836 / 4.063 s at 1440² 16:9, 0.376 / 0.163 s Turbo.
EAGER_OVER_COMPILED = 2.0
# Seconds compiling adds to a one-image process (tracing, code generation, compile workers; H200, torch 2.11,
# 2026-11-28, benchmarks/first_image.py): 53.8 vs 30.6 s with empty caches, 31.6 vs 21.9 s with warm ones.
COLD_COMPILE_S = 23.0
WARM_COMPILE_S = 10.0


@dataclass(frozen=True)
class CompileDecision:
    compile: bool
    reason: str


def decide(
    asked: bool | None,
    device_type: str,
    compiled_seconds: list[float],
    caches_warm: bool,
    already_compiled: bool = False,
) -> CompileDecision:
    """``compiled_seconds``: each image's predicted compiled denoise time (``memory.predict``)."""
    if asked is not None:
        return CompileDecision(asked, "asked with --compile" if asked else "asked with --no-compile")
    if device_type != "cuda":
        return CompileDecision(False, "eager: compilation pays off on CUDA GPUs only")
    if already_compiled:
        return CompileDecision(True, "compiled: this process has compiled already")
    saving = (EAGER_OVER_COMPILED - 1) * sum(compiled_seconds)
    cost = WARM_COMPILE_S if caches_warm else COLD_COMPILE_S
    state = "warm" if caches_warm else "empty"
    images = len(compiled_seconds)
    if saving > cost:
        return CompileDecision(True, f"compiled: {images} image(s) save ~{saving:.0f} s, compiling costs ~{cost:.0f} s (caches {state})")
    return CompileDecision(False, f"eager: {images} image(s) would save ~{saving:.0f} s, compiling costs ~{cost:.0f} s (caches {state})")


def cache_key(torch_version: str, lensrun_version: str, device_name: str, dtype: str, precision: str) -> str:
    blob = json.dumps([torch_version, lensrun_version, device_name, dtype, precision])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def marker(folder: Path, key: str) -> Path:
    return folder / f"compiled-{key}.json"
