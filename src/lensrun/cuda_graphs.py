"""CUDA graphs, one policy for the encoder's and the denoising step's: how a call is captured, and which shapes
get a graph (``GraphCache``)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


def capture(fn: Callable[[], T], pool) -> tuple[torch.cuda.CUDAGraph, T]:
    """Run ``fn`` once on a side stream (cuBLAS/cuDNN plans, workspaces and any compilation a new shape needs
    stay out of the graph), then capture one call drawing on ``pool``; returns the graph and that call's
    (static) outputs. The capture forbids unsafe CUDA calls on this thread only: the PNG writer waits on CUDA
    events, and a server's other replicas keep running their GPUs, while a new shape is captured.

    Not the ``torch.cuda.graph`` context: it empties the allocator's device and pinned-host caches before every
    capture, which in a process that has run a denoise costs up to seconds, and the next runs allocate it all
    again (benchmarks/capture_cost.py). During a capture the allocator cannot give cached blocks back, so a
    capture that runs out of memory empties the device cache and is recorded once more."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        try:
            graph, outputs = _record(fn, pool)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            graph, outputs = _record(fn, pool)
    torch.cuda.current_stream().wait_stream(side)
    return graph, outputs


def _record(fn: Callable[[], T], pool) -> tuple[torch.cuda.CUDAGraph, T]:
    """One call of ``fn`` captured into a new graph on the current stream."""
    graph = torch.cuda.CUDAGraph()
    graph.capture_begin(pool=pool, capture_error_mode="thread_local")
    try:
        outputs = fn()
    except BaseException:
        with contextlib.suppress(RuntimeError):  # the capture is void; the error to report is fn's
            graph.capture_end()
        raise
    graph.capture_end()
    return graph, outputs


E = TypeVar("E")


class GraphCache(Generic[E]):
    """Captured graphs by shape key. A key gets a graph the ``sightings``-th time it is seen (default 2: a
    capture costs a few runs, so only shapes that recur pay for one); at most ``limit`` are kept, oldest dropped
    (each holds its static inputs); all share one memory pool (they never run at once); after a failed capture
    (an op that syncs with the host, a kernel that refuses capture) none is tried again until ``reset``, with the
    reason in ``failed``. Every graph holds the weights' addresses: reset whenever weights move or change."""

    def __init__(self, limit: int | None = None, sightings: int = 2) -> None:
        self.limit = limit
        self.sightings = sightings
        self.entries: dict[Hashable, E] = {}
        self.seen: Counter[Hashable] = Counter()
        self.pool = None
        self.failed: str | None = None

    def get(self, key: Hashable, build: Callable[[object], E]) -> E | None:
        """The graph entry for ``key``, captured now by ``build(pool)`` on its ``sightings``-th sighting; None
        when the caller should run eagerly (seen too few times, or captures failed)."""
        if self.failed is not None:
            return None
        if key in self.entries:
            return self.entries[key]
        self.seen[key] += 1
        if self.seen[key] < self.sightings:
            return None
        while self.limit is not None and len(self.entries) >= self.limit:
            self.entries.pop(next(iter(self.entries)))
        if self.pool is None and torch.cuda.is_available():
            self.pool = torch.cuda.graph_pool_handle()
        try:
            entry = self.entries[key] = build(self.pool)
        except RuntimeError as err:
            self.failed = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return None
        return entry

    def reset(self) -> None:
        self.entries.clear()
        self.seen.clear()
        self.pool = None
        self.failed = None

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)
