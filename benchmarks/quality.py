"""Image distance for the benchmarks (imported by the scripts beside it)."""

from __future__ import annotations

import numpy as np


def psnr(a, b, peak: float) -> float:
    """PSNR in dB of two images of the same range (``peak``: 1.0 for [0, 1], 255 for 8-bit); inf when equal."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)
