"""The denoising step as one CUDA graph: both CFG branches, guidance and the Euler update replayed without Python.

A compiled forward still pays ~1,000 Python-side launches and subclass unwraps per call (11.6 ms of a 43 ms fp8
forward at 1024² on an H200, docs/performance.md); a replayed graph pays none. Everything the step reads lives
in static buffers filled once per image (latents, text features, every step's modulation, sigmas); the step index
is a device scalar, so a replay needs one tiny fill and no host sync. Which shapes get a graph follows the one
policy of ``lensrun.cuda_graphs.GraphCache`` (the second sighting in bf16, the first for a quantized DiT; at most
``MAX_GRAPHS`` kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lensrun.cuda_graphs import GraphCache, capture
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
    keys: list[torch.Tensor | None]  # per branch: the count of keys that count (padded text), or None

    def fill(self, latents, cond, uncond, conditioning: StepConditioning, sigmas: torch.Tensor, keys) -> None:
        pairs = [(self.latents, latents), (self.temb, conditioning.temb), (self.sigmas, sigmas)]
        pairs += [(a, b) for a, b in zip(self.keys, keys, strict=True) if a is not None]
        pairs += list(zip(self.cond, cond, strict=True))
        if uncond is not None:
            pairs += list(zip(self.uncond, uncond, strict=True))
        for (a, b), (c, d) in zip(self.mods, conditioning.mods, strict=True):
            pairs += [(a, c), (b, d)]
        for dst, src in pairs:
            dst.copy_(src)


class StepGraphs:
    """Captured denoising steps of one transformer, keyed by every shape and constant they bake in."""

    # A server's mix is a few sizes × the prompt lengths in use (each ~35 MiB of static inputs at 20 steps, the
    # pool shared): 16 keep a loaded server from evicting and recapturing (H200 2026-11-28, docs/serve.md).
    MAX_GRAPHS = 16

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer
        self.graphs: GraphCache[tuple[torch.cuda.CUDAGraph, _Static]] = GraphCache(self.MAX_GRAPHS)

    @property
    def failed(self) -> str | None:
        """Why a capture failed (no further tries until ``reset``)."""
        return self.graphs.failed

    def reset(self) -> None:
        """Forget every graph (they hold weight addresses: call whenever weights move or change)."""
        self.graphs.reset()

    def follow_precision(self, precision: str) -> None:
        """A shape gets its graph on its second sighting in bf16, where a capture costs about what it saves on
        a shape seen once (compiled loop against replays: 1.73 / 1.38 s at 1024², 3.47 / 3.47 s at 1440² 16:9),
        and on its first with a torchao-quantized DiT, whose Python loop is launch-bound (fp8, a shape's first
        image through the loop against capturing at once: 2.88 / 1.44 s Lens 1024², 0.39 / 0.33 s Turbo; H200,
        2026-11-29)."""
        self.graphs.sightings = 2 if precision == "bf16" else 1

    def _step(self, s: _Static, grid: tuple[int, int], cfg: float) -> None:
        i = s.index
        cond = StepConditioning(
            s.temb.index_select(0, i), [(a.index_select(0, i), b.index_select(0, i)) for a, b in s.mods]
        )
        shapes = [(1, *grid)]
        if s.uncond is not None:
            v, v_u = self.transformer.forward_branches(s.latents, [s.cond, s.uncond], None, shapes, cond, s.keys)
            v = guided_velocity(v.float(), v_u.float(), cfg)
        else:
            v = self.transformer(s.latents, s.cond, None, None, shapes, step_conditioning=cond, key_counts=s.keys[0]).sample
        s.latents.copy_(euler_step(s.latents, v, s.sigmas.index_select(0, i), s.sigmas.index_select(0, i + 1)))

    def run(
        self, latents, cond, uncond, conditioning: StepConditioning, sigmas: torch.Tensor, grid, cfg, on_step=None,
        keys: list[torch.Tensor | None] | None = None,
    ):  # fmt: skip
        """Every step of one image; returns the final latents, or None when the caller should run its Python
        loop: the first time a shape is seen (a capture pays off only when the shape comes back: more images of
        the prompt, a gallery, a server) or when this model cannot be captured (the reason in ``self.failed``).
        ``keys``: each branch's count of keys that count when its text is padded (``LensPipeline.bucket_text``)."""
        steps = sigmas.numel() - 1
        keys = keys or [None, None]
        counted = tuple(k is not None for k in keys)
        key = (
            tuple(latents.shape),
            tuple(cond[0].shape),
            None if uncond is None else tuple(uncond[0].shape),
            grid,
            cfg,
            steps,
            counted,
        )
        build = lambda pool: self._capture(latents, cond, uncond, conditioning, sigmas, grid, cfg, keys, pool)
        entry = self.graphs.get(key, build)
        if entry is None:
            return None
        graph, static = entry
        static.fill(latents, cond, uncond, conditioning, sigmas, keys)
        for i in range(steps):
            static.index.fill_(i)
            graph.replay()
            if on_step is not None:
                on_step(i + 1, steps)
        return static.latents.clone()

    def _capture(self, latents, cond, uncond, conditioning, sigmas, grid, cfg, keys, pool):
        clone = lambda ts: [t.clone() for t in ts]
        static = _Static(
            latents.clone(), clone(cond), None if uncond is None else clone(uncond), conditioning.temb.clone(),
            [(a.clone(), b.clone()) for a, b in conditioning.mods], sigmas.clone(),
            torch.zeros(1, dtype=torch.long, device=latents.device), [None if k is None else k.clone() for k in keys],
        )  # fmt: skip
        graph, _ = capture(lambda: self._step(static, grid, cfg), pool)  # the step writes static.latents
        return graph, static
