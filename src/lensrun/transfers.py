"""Copies and clocks that never make the CPU thread wait for the GPU.

A plain ``.to("cuda")`` of a CPU tensor, or ``.cpu()`` of a CUDA one, synchronizes the stream: the thread that
feeds the GPU stops until everything queued has run, and the GPU then idles while that thread prepares the next
work. The engine's GPU thread therefore uploads from pinned memory, starts downloads that other threads (the PNG
writer, the prompt cache's disk writer) wait for, and times phases with CUDA events read later. On the CPU each
of these is the plain operation.
"""

from __future__ import annotations

import time

import torch


def upload(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` (CPU) on ``device`` without waiting for the GPU: copied from pinned memory, in stream order."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device, dtype)
    return tensor.pin_memory().to(device, dtype, non_blocking=True)


class Download:
    """A CUDA tensor's copy to (pinned) CPU memory, started now in stream order; ``result()`` waits for it."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.event = None
        if tensor.device.type != "cuda":
            self.tensor = tensor.detach().cpu()
            return
        self.tensor = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.tensor.copy_(tensor.detach(), non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def result(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.tensor


class Mark:
    """A point in the GPU's work queue (a CUDA event) or, on the CPU, in wall time."""

    def __init__(self, device: torch.device) -> None:
        self.event = None
        self.time = time.perf_counter()
        if device.type == "cuda":
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()

    def wait(self) -> None:
        """Block until the GPU has reached this point."""
        if self.event is not None:
            self.event.synchronize()

    def seconds_since(self, earlier: Mark) -> float:
        """GPU time between two marks (waits until this one is reached)."""
        if self.event is None:
            return self.time - earlier.time
        self.event.synchronize()
        return earlier.event.elapsed_time(self.event) / 1000
