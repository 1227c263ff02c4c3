"""Carrying out a memory plan: where each component's weights live during each phase.

* resident: everything on the GPU (the embedding table may stay in CPU memory: a ≤512-row lookup).
* phased: each component's weights live in pinned CPU memory and visit the GPU only for its phase
  (encode → denoise → decode), copied asynchronously with respect to the host.
* offload: the same phases with plain (pageable) CPU memory and blocking copies, as model-level CPU offload does;
  kept for comparison and as the last fallback.
* stream: the DiT's blocks and the encoder's layers stay in pinned CPU memory; only a window of them is on the
  GPU at a time, the next ones copied on a side CUDA stream while the current one computes (6–8 GB cards).

Swapping replaces each tensor's storage (``tensor.data``) rather than moving modules, so nothing else (the
pipeline's notion of its device, compiled graphs, hooks) notices; leaving a phase just drops the GPU copies.
Streaming is installed from outside the models: while a stream plan is applied, the DiT's block list and the
encoder's layer list are replaced by lists of ``StreamedModule`` stand-ins, and put back when the plan is
released. The model files know nothing of placement.
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


class Streamer:
    """Runs a sequence of modules whose weights live in pinned CPU memory, keeping ``window`` of them on the
    GPU: ``before(i)`` drops the modules outside [i, i + window), waits for module i (fetching it if needed)
    and starts copying the next ones on a side stream. Module i stays until a later one is needed, so calling
    it again (another CFG branch) costs no copy; a dropped copy's memory is reused only once the compute
    stream is past it."""

    def __init__(self, modules: list[nn.Module], device: torch.device, window: int = 2) -> None:
        self.device = device
        self.window = max(1, window)
        self.hosted = [HostedWeights(m, device, pinned=True) for m in modules]
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ready: dict[int, torch.cuda.Event] = {}
        self.peak_window = 0

    def _fetch(self, i: int) -> None:
        hosted = self.hosted[i % len(self.hosted)]
        if hosted.on_device:
            return
        if self.copy_stream is None:
            hosted.load()
            return
        with torch.cuda.stream(self.copy_stream):
            hosted.load()
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self.ready[i % len(self.hosted)] = event

    def before(self, i: int) -> None:
        keep = {j % len(self.hosted) for j in range(i, i + self.window)}
        for j, hosted in enumerate(self.hosted):
            if hosted.on_device and j not in keep:
                hosted.unload()
                self.ready.pop(j, None)
        self._fetch(i)
        event = self.ready.pop(i, None)
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for t in self.hosted[i].tensors:
                t.data.record_stream(compute)
        for j in range(i + 1, i + self.window):
            self._fetch(j)
        self.peak_window = max(self.peak_window, sum(h.on_device for h in self.hosted))

    def idle(self) -> None:
        """End of a phase: drop what is on the GPU (the next phase needs the memory)."""
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        for hosted in self.hosted:
            if hosted.on_device:
                hosted.unload()
        self.ready.clear()

    def release(self) -> None:
        if self.copy_stream is not None:
            torch.cuda.synchronize(self.device)
        for hosted in self.hosted:
            hosted.release()


class StreamedModule(nn.Module):
    """Stands in for module ``index`` of a streamed list: its weights are fetched before each call (and before
    ``modulation``, the DiT block's per-step conditioning)."""

    def __init__(self, inner: nn.Module, streamer: Streamer, index: int) -> None:
        super().__init__()
        self.inner = inner
        self.index = index
        self._streamer = [streamer]  # a plain list: not a submodule, not in the state dict

    def forward(self, *args, **kwargs):
        self._streamer[0].before(self.index)
        return self.inner(*args, **kwargs)

    def modulation(self, *args, **kwargs):
        self._streamer[0].before(self.index)
        return self.inner.modulation(*args, **kwargs)

    def __getattr__(self, name: str):
        """Other attributes (sub-layers, settings) are the inner module's; reading them moves no weights."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def _streamed(modules: nn.ModuleList, device: torch.device, window: int) -> tuple[nn.ModuleList, Streamer]:
    streamer = Streamer(list(modules), device, window)
    return nn.ModuleList(StreamedModule(m, streamer, i) for i, m in enumerate(modules)), streamer


class Placer:
    """Applies a plan to a pipeline's components and brings the right one onto the GPU for each phase."""

    PHASE_COMPONENT = {"encode": "text_encoder", "denoise": "transformer", "decode": "vae"}

    def __init__(self, pipe, plan: Plan) -> None:
        self.pipe = pipe
        self.plan = plan
        self.device = pipe.device
        self.hosted: dict[str, HostedWeights] = {}
        self.streamers: dict[str, Streamer] = {}  # component → its streamer, under a stream plan
        self._replaced: list[tuple[nn.Module, str, nn.ModuleList]] = []  # (owner, attribute, original list)

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
        if plan.placement == "stream":
            self._stream()
            return
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

    def _stream(self) -> None:
        """Everything but the DiT blocks and the encoder layers resident; those two streamed."""
        pipe = self.pipe
        for name, module in pipe.transformer.named_children():
            if name != "transformer_blocks":
                module.to(self.device)
        self._stream_list("transformer", pipe.transformer, "transformer_blocks")
        pipe.vae.to(self.device)
        encoder = pipe.text_encoder
        if encoder is not None:
            encoder.rotary_emb.to(self.device)
            self._stream_list("text_encoder", encoder, "layers")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _stream_list(self, component: str, owner: nn.Module, attribute: str) -> None:
        original = getattr(owner, attribute)
        wrapped, self.streamers[component] = _streamed(original, self.device, self.plan.stream_window)
        setattr(owner, attribute, wrapped)
        self._replaced.append((owner, attribute, original))

    def release(self) -> None:
        """Undo the plan's hosting and streaming; the next plan's ``apply`` places the weights."""
        for hosted in self.hosted.values():
            hosted.release()
        self.hosted.clear()
        for owner, attribute, original in self._replaced:
            setattr(owner, attribute, original)
        self._replaced.clear()
        for streamer in self.streamers.values():
            streamer.release()
        self.streamers.clear()

    @contextlib.contextmanager
    def phase(self, name: str):
        component = self.PHASE_COMPONENT[name]
        hosted = self.hosted.get(component)
        streamer = self.streamers.get(component)
        if hosted is not None:
            hosted.load()
        try:
            yield
        finally:
            if hosted is not None:
                hosted.unload()
                gc.collect()
                torch.cuda.empty_cache()
            if streamer is not None:
                streamer.idle()
