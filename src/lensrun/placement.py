"""Carrying out a memory plan: where each component's weights live during each phase.

* resident: everything on the GPU (the embedding table may stay in CPU memory: a ≤512-row lookup).
* phased: each component's weights live in pinned CPU memory and visit the GPU only for its phase
  (encode → denoise → decode), copied asynchronously with respect to the host.
* offload: the same phases with plain (pageable) CPU memory and blocking copies, as model-level CPU offload does;
  kept for comparison and as the last fallback.

Swapping replaces each tensor's storage (``tensor.data``) rather than moving modules, so nothing else (the
pipeline's notion of its device, compiled graphs, hooks) notices; leaving a phase just drops the GPU copies.
"""

from __future__ import annotations

import contextlib
import gc

import torch
from torch import nn

from lensrun.memory import Plan


class HostedWeights:
    """A module whose parameters and buffers are kept in CPU memory and copied to ``device`` on demand."""

    def __init__(self, module: nn.Module, device: torch.device, pinned: bool) -> None:
        self.device = device
        self.pinned = pinned and device.type == "cuda"
        self.tensors = [t for t in list(module.parameters()) + list(module.buffers())]
        self.host = []
        for t in self.tensors:
            cpu = t.data.to("cpu")
            if self.pinned:
                cpu = cpu.pin_memory()
            self.host.append(cpu)
            t.data = cpu
        self.on_device = False

    def load(self) -> None:
        for t, cpu in zip(self.tensors, self.host, strict=True):
            t.data = cpu.to(self.device, non_blocking=self.pinned)
        self.on_device = True

    def unload(self) -> None:
        for t, cpu in zip(self.tensors, self.host, strict=True):
            t.data = cpu
        self.on_device = False

    def release(self) -> None:
        """Stop managing: the tensors stay in CPU memory, where the next plan picks them up. (Loading them back
        onto the GPU here would put every component there at once, the very peak the plan avoided.)"""
        self.unload()
        self.tensors, self.host = [], []


class Placer:
    """Applies a plan to a pipeline's components and brings the right one onto the GPU for each phase."""

    PHASE_COMPONENT = {"encode": "text_encoder", "denoise": "transformer", "decode": "vae"}

    def __init__(self, pipe, plan: Plan) -> None:
        self.pipe = pipe
        self.plan = plan
        self.device = pipe.device
        self.hosted: dict[str, HostedWeights] = {}

    def apply(self) -> None:
        pipe, plan = self.pipe, self.plan
        encoder = pipe.text_encoder
        if encoder is not None:
            encoder.set_decode_chunk(plan.encoder_chunk)
            encoder.embed_tokens.to("cpu" if plan.embedding_on_cpu else self.device)
        if plan.vae_tiling:
            pipe.vae.enable_tiling()
        else:
            pipe.vae.disable_tiling()
        if plan.placement == "resident" or self.device.type != "cuda":
            for module in (pipe.transformer, pipe.vae, encoder.layers if encoder is not None else None):
                if module is not None:
                    module.to(self.device)
            if encoder is not None:
                encoder.rotary_emb.to(self.device)
            return
        for name in self.PHASE_COMPONENT.values():
            module = getattr(pipe, name)
            if module is None:
                continue
            if name == "text_encoder":  # everything but the embedding, which the plan placed above
                module = nn.ModuleList([module.layers, module.rotary_emb])
            self.hosted[name] = HostedWeights(module, self.device, pinned=plan.placement == "phased")
        torch.cuda.empty_cache()

    def release(self) -> None:
        """Undo the plan's hosting; the next plan's ``apply`` places the weights."""
        for hosted in self.hosted.values():
            hosted.release()
        self.hosted.clear()

    @contextlib.contextmanager
    def phase(self, name: str):
        hosted = self.hosted.get(self.PHASE_COMPONENT[name])
        if hosted is None:
            yield
            return
        hosted.load()
        try:
            yield
        finally:
            hosted.unload()
            gc.collect()
            torch.cuda.empty_cache()
