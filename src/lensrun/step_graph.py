"""The denoising step as one CUDA graph: both CFG branches, guidance and the Euler update replayed without Python.

A compiled forward still pays ~1,000 Python-side launches and subclass unwraps per call (11.6 ms of a 43 ms fp8
forward at 1024² on an H200, docs/performance.md); a replayed graph pays none. Everything the step reads lives
in static buffers filled once per image (latents, text features, every step's modulation, sigmas); the step index
is a device scalar, so a replay needs one tiny fill and no host sync. One graph per shape key (captured when a
shape comes a second time); all share a pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lensrun.cuda_graphs import capture
from lensrun.models.transformer_lens import StepConditioning
from lensrun.sampling import euler_step, guided_velocity


@dataclass
class _Static:
    latents: torch.Tensor
    cond: list[torch.Tensor]
    uncond: list[torch.Tensor] | None
    temb: torch.Tensor
    mods: list[tuple[torch.Tensor, torch.Tensor]]
    sigmas: torch.Tensor
    index: torch.Tensor

    def fill(self, latents, cond, uncond, conditioning: StepConditioning, sigmas: torch.Tensor) -> None:
        pairs = [(self.latents, latents), (self.temb, conditioning.temb), (self.sigmas, sigmas)]
        pairs += list(zip(self.cond, cond, strict=True))
        if uncond is not None:
            pairs += list(zip(self.uncond, uncond, strict=True))
        for (a, b), (c, d) in zip(self.mods, conditioning.mods, strict=True):
            pairs += [(a, c), (b, d)]
        for dst, src in pairs:
            dst.copy_(src)


class StepGraphs:
    """Captured denoising steps of one transformer, keyed by every shape and constant they bake in."""

    MAX_GRAPHS = 4  # text lengths differ per prompt; keep the recent shapes only

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, _Static]] = {}
        self.pool = None
        self.failed: str | None = None  # why a capture failed; no further tries until reset
        self.seen: set[tuple] = set()

    def reset(self) -> None:
        """Forget every graph (they hold weight addresses: call whenever weights move or change)."""
        self.graphs.clear()
        self.pool = None
        self.failed = None
        self.seen.clear()

    def _step(self, s: _Static, grid: tuple[int, int], cfg: float) -> None:
        i = s.index
        cond = StepConditioning(s.temb.index_select(0, i), [(a.index_select(0, i), b.index_select(0, i)) for a, b in s.mods])
        shapes = [(1, *grid)]
        v = self.transformer(s.latents, s.cond, None, None, shapes, step_conditioning=cond).sample
        if s.uncond is not None:
            v_u = self.transformer(s.latents, s.uncond, None, None, shapes, step_conditioning=cond).sample
            v = guided_velocity(v.float(), v_u.float(), cfg)
        s.latents.copy_(euler_step(s.latents, v, s.sigmas.index_select(0, i), s.sigmas.index_select(0, i + 1)))

    def run(self, latents, cond, uncond, conditioning: StepConditioning, sigmas: torch.Tensor, grid, cfg, on_step=None):
        """Every step of one image; returns the final latents, or None when the caller should run its Python
        loop: the first time a shape is seen (a capture pays off only when the shape comes back: more images of
        the prompt, a gallery, a server) or when this model cannot be captured (the reason in ``self.failed``)."""
        steps = sigmas.numel() - 1
        key = (tuple(latents.shape), tuple(cond[0].shape), None if uncond is None else tuple(uncond[0].shape), grid, cfg, steps)
        if self.failed is not None:
            return None
        if key not in self.graphs:
            if key not in self.seen:  # a capture costs about a step's time: only shapes that come back get one
                self.seen.add(key)
                return None
            while len(self.graphs) >= self.MAX_GRAPHS:  # oldest first: each holds its step's static inputs
                self.graphs.pop(next(iter(self.graphs)))
            try:
                self.graphs[key] = self._capture(latents, cond, uncond, conditioning, sigmas, grid, cfg)
            except RuntimeError as err:  # e.g. an op that syncs with the host: not capturable, loop instead
                self.failed = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                if latents.is_cuda:
                    torch.cuda.synchronize()
                return None
        graph, static = self.graphs[key]
        static.fill(latents, cond, uncond, conditioning, sigmas)
        for i in range(steps):
            static.index.fill_(i)
            graph.replay()
            if on_step is not None:
                on_step(i + 1, steps)
        return static.latents.clone()

    def _capture(self, latents, cond, uncond, conditioning, sigmas, grid, cfg):
        clone = lambda ts: [t.clone() for t in ts]
        static = _Static(
            latents.clone(), clone(cond), None if uncond is None else clone(uncond), conditioning.temb.clone(),
            [(a.clone(), b.clone()) for a, b in conditioning.mods], sigmas.clone(),
            torch.zeros(1, dtype=torch.long, device=latents.device),
        )  # fmt: skip
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph, _ = capture(lambda: self._step(static, grid, cfg), self.pool)  # the step writes static.latents
        return graph, static
