"""Capturing a call as a CUDA graph, shared by the encoder's and the denoising step's graphs."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def capture(fn: Callable[[], T], pool) -> tuple[torch.cuda.CUDAGraph, T]:
    """Run ``fn`` twice on a side stream (compilation, cuBLAS/cuDNN plans and workspaces stay out of the graph),
    then capture one call drawing on ``pool``; returns the graph and that call's (static) outputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = fn()
    return graph, outputs
