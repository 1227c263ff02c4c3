"""LensPipeline: text encoding → denoising → decoding.

Every image is its own computation (its own seed, its own forward passes), so an image regenerated alone from
its stored config is pixel-identical to the one made inside a batch. Text conditions are cut to their valid
tokens and run without an attention mask (LENS_SPEC §11): an empty negative is a forward with no text tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lensrun import acceleration, attention, loading
from lensrun.decoding import decode_tokens, to_pil, use_fast_group_norm
from lensrun.errors import LensrunError
from lensrun.memory import Plan
from lensrun.placement import Placer
from lensrun.prompt_cache import PromptCache, default_cache_dir, folder_fingerprint
from lensrun.prompting import DEFAULT_TEMPLATE_DATE, MAX_SEQUENCE_LENGTH, tokenize_prompts
from lensrun.request import DEFAULT_MODEL, OUTPUT_TYPES, TINY_MODEL, GenerationRequest, check_variant, infer_variant
from lensrun.sampling import euler_step, guided_velocity, lens_sigmas
from lensrun.transfers import upload

if TYPE_CHECKING:  # the model classes import diffusers/transformers: loaded with the weights, not with lensrun
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler

    from lensrun.models.text_encoder import LensTextEncoder
    from lensrun.models.transformer_lens import LensTransformer2DModel

# Text lengths a FlashAttention run pads to (``LensPipeline.bucket_text``): prompts of 20–150 tokens give two or
# three shapes to compile and capture instead of one per prompt length.
TEXT_BUCKET = 64


@dataclass
class LensPipelineOutput:
    """``images`` in the requested output type; ``configs[i]`` regenerates image i (see ``lensrun.metadata``)."""

    images: list | np.ndarray | torch.Tensor
    configs: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    report: dict = field(default_factory=dict)


def _rows(features: list[torch.Tensor], mask: torch.Tensor | None) -> list[list[torch.Tensor]]:
    """Split batched features into per-row lists cut to their valid tokens (mask: True = valid, right padded)."""
    batch = features[0].shape[0]
    rows = []
    for b in range(batch):
        valid = int(mask[b].sum()) if mask is not None else features[0].shape[1]
        if mask is not None and not bool(mask[b, :valid].all()):
            raise LensrunError("text masks must be right-padded (valid tokens first)")
        rows.append([f[b : b + 1, :valid] for f in features])
    return rows


class LensPipeline:
    """Runs a Lens checkpoint. Construct from components, ``from_pretrained`` or ``tiny_random``."""

    def __init__(
        self,
        transformer: LensTransformer2DModel,
        vae: AutoencoderKLFlux2,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder: LensTextEncoder | None = None,
        tokenizer=None,
        *,
        model_name: str = "custom",
        variant: str | None = None,
        prompt_cache: PromptCache | None = None,
    ) -> None:
        self.transformer = transformer.eval()
        self.vae = vae.eval()
        use_fast_group_norm(self.vae.decoder)
        self.scheduler = scheduler
        self.text_encoder = text_encoder.eval() if text_encoder is not None else None
        self.tokenizer = tokenizer
        self.model_name = model_name
        check_variant(variant)
        self.variant = variant or infer_variant(model_name)
        self.prompt_cache = prompt_cache or PromptCache(f"unnamed:{id(text_encoder)}")
        self.weights_id = "unknown"  # fingerprint of the weights, stored with each image (replay compares it)
        self.precision = "bf16"
        self.compiled = False
        from lensrun.step_graph import StepGraphs

        self.step_graphs = StepGraphs(self.transformer)
        self.graph_steps = False  # denoising steps replayed as CUDA graphs (set with the encoder's graphs)
        self.placer: Placer | None = None
        self._device = transformer.img_in.weight.device
        self.parallel = None  # a lensrun.parallel.Group: this process runs one CFG branch, or one token slice

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        model: str | Path = DEFAULT_MODEL,
        variant: str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device | None = None,
        name: str | None = None,
        files: dict[str, str | Path] | None = None,
        precision: str = "bf16",
    ) -> LensPipeline:
        """Load a diffusers-layout folder or Hub repo id (``tiny-random`` builds a tiny random model instead).

        Weights are read straight onto ``device`` (no CPU copy first); ``name`` is what images record as the
        model (default: ``model`` as given). ``model`` may also be a ComfyUI models folder, and ``files`` ComfyUI
        single files that replace the folder's ``transformer``, ``text_encoder`` or ``vae``
        (``lensrun.single_file``). ``precision``: the DiT's block linears quantized at load (torchao); a DiT
        file is quantized block by block as it is read, so it never exists whole in bf16."""
        check_variant(variant)
        if str(model) == TINY_MODEL:
            return cls.tiny_random(dtype=dtype, device=device, variant=variant)
        from lensrun import single_file

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        precision = acceleration.check_precision(precision, device)
        root, files = resolve_sources(model, variant, files)
        parts = {name: root / name for name in ("transformer", "text_encoder", "vae") if name not in files}
        reader = loading.TensorReader(parts, device, skip={"text_encoder": {"lm_head.weight", "model.norm.weight"}})
        try:
            # While the reader copies the weights, import the model code and check every shape (headers only).
            from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2
            from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
            from transformers import PreTrainedTokenizerFast

            from lensrun.configs import (
                FULL_TRANSFORMER_CONFIG,
                FULL_VAE_CONFIG,
                LENS_SCHEDULER_CONFIG,
                transformer_meta_state,
                vae_init_kwargs,
                vae_meta_state,
            )  # fmt: skip
            from lensrun.models.text_encoder import LensTextEncoder
            from lensrun.models.transformer_lens import LensTransformer2DModel

            t_config = _init_kwargs(loading.component_config(root, "transformer", FULL_TRANSFORMER_CONFIG))
            v_config = vae_init_kwargs(loading.component_config(root, "vae", FULL_VAE_CONFIG))
            t_meta, v_meta = transformer_meta_state(t_config), vae_meta_state(v_config)
            for part, meta in (("transformer", t_meta), ("vae", v_meta)):
                if part not in files:
                    loading.check_shapes(root / part, meta)
            quantized = single_file.check_dit(files["transformer"], t_meta) if "transformer" in files else None
            v_state = single_file.read_vae(files["vae"], v_meta, device) if "vae" in files else None
        except BaseException:
            reader.cancel()
            raise
        with _quiet_diffusers():
            if "transformer" in files:
                tensors = single_file.dit_tensors(files["transformer"], t_meta, quantized, device, dtype)
                transformer = _assemble_by_block(LensTransformer2DModel, t_config, tensors, precision)
            else:
                transformer = _assemble(LensTransformer2DModel, t_config, reader.take("transformer"), dtype)
            vae = _assemble(AutoencoderKLFlux2, v_config, v_state or reader.take("vae"), dtype)
            scheduler = (
                FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler")
                if root is not None
                else FlowMatchEulerDiscreteScheduler.from_config(LENS_SCHEDULER_CONFIG)  # all Lens variants share it
            )
        encoder_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
        layers = tuple(transformer.config.selected_layer_index)
        if "text_encoder" in files:
            text_encoder, tokenizer = _comfy_text_encoder(root, files["text_encoder"], layers, encoder_dtype, device)
        else:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer")
            text_encoder = LensTextEncoder.from_pretrained(
                root / "text_encoder", layers, dtype=encoder_dtype, device=device, tensors=reader.take("text_encoder")
            )
        prints = {part: folder_fingerprint(where) for part, where in {**parts, **files}.items()}
        cache = PromptCache(prints["text_encoder"], default_cache_dir() / "prompts")
        pipe = cls(
            transformer, vae, scheduler, text_encoder, tokenizer, model_name=name or str(model), variant=variant,
            prompt_cache=cache,
        )  # fmt: skip
        pipe.weights_id = hashlib.sha256("".join(prints[p] for p in sorted(prints)).encode()).hexdigest()[:16]
        if "transformer" in files:
            pipe.precision = precision
        return pipe.to(device).optimize(precision=precision)

    @classmethod
    def tiny_random(
        cls,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        variant: str | None = None,
    ) -> LensPipeline:
        """A tiny random-weight Lens built in-process: it draws noise, and exists to check an install."""
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler

        from lensrun import configs as rc
        from lensrun.models.text_encoder import LensTextEncoder, gpt_oss_config
        from lensrun.models.transformer_lens import LensTransformer2DModel
        from lensrun.random_checkpoint import random_state, tiny_tokenizer

        def build(module: torch.nn.Module, meta: dict, offset: int, prefix: str = "") -> torch.nn.Module:
            state = random_state(meta, seed + offset, torch.float32)
            module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=False)
            return module

        transformer = build(
            LensTransformer2DModel(**rc.TINY_TRANSFORMER_CONFIG), rc.transformer_meta_state(rc.TINY_TRANSFORMER_CONFIG), 0
        )
        layers = tuple(rc.TINY_TRANSFORMER_CONFIG["selected_layer_index"])
        te_config = gpt_oss_config(rc.TINY_TEXT_ENCODER_CONFIG)
        encoder = build(
            LensTextEncoder(te_config, layers, dtype=torch.float32),
            rc.text_encoder_meta_state(rc.TINY_TEXT_ENCODER_CONFIG),
            1,
            prefix="model.",
        )
        vae = build(AutoencoderKLFlux2(**rc.vae_init_kwargs(rc.TINY_VAE_CONFIG)), rc.vae_meta_state(rc.TINY_VAE_CONFIG), 2)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(rc.LENS_SCHEDULER_CONFIG)
        with _quiet_diffusers():
            transformer, vae = transformer.to(dtype), vae.to(dtype)
        cache = PromptCache(f"tiny-random:{seed}")
        pipe = cls(
            transformer, vae, scheduler, encoder, tiny_tokenizer(), model_name=TINY_MODEL, variant=variant,
            prompt_cache=cache,
        )  # fmt: skip
        pipe.weights_id = f"tiny-random:{seed}"
        return pipe.to(device)

    def to(self, device: str | torch.device | None = None) -> LensPipeline:
        """Place every component on ``device`` (default: CUDA when present, else CPU)."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._device = device
        if self.placer is not None:  # plain residency replaces any memory plan
            self.placer.release()
            self.placer = None
        self.transformer.to(device)
        self.vae.to(device)
        if self.text_encoder is not None:
            self.text_encoder.to(device)
        self._reset_graphs()
        return self

    def _reset_graphs(self) -> None:
        """CUDA graphs (encoder, denoising step) when compiled on CUDA and resident: a captured graph pins the
        weights' addresses, which phased and streamed plans move; any re-placement drops the graphs so far."""
        resident = self.compiled and self.device.type == "cuda" and self.plan.placement == "resident"
        self.step_graphs.reset()
        self.step_graphs.follow_precision(self.precision)
        self.graph_steps = resident
        encoder = self.text_encoder
        if encoder is None:
            return
        encoder.reset_graphs()
        experts = [layer.mlp.experts for layer in encoder.layers]
        sync_free = all(e.fused or e.chunk >= e.num_experts for e in experts)  # chunks sync
        encoder.use_graphs = resident and sync_free

    def optimize(self, compile: bool = False, precision: str = "bf16") -> LensPipeline:
        """Quantize the DiT's block linears (torchao) and/or compile the hot paths; call once after loading.

        Compilation is regional (one graph for all 48 blocks), cached on disk between runs, and on CUDA also
        fuses the encoder's MXFP4 decode. The VAE stays eager: compiling it cost more than a decode saves.
        """
        precision = acceleration.check_precision(precision, self.device)
        if precision != self.precision:
            if self.precision != "bf16":
                raise LensrunError(f"the DiT is already quantized to {self.precision}; reload to change it")
            acceleration.quantize_transformer(self.transformer, precision)
            self.precision = precision
        if compile and not self.compiled:
            acceleration.compile_cache_dir()
            if self.transformer.compiled_gate is None:
                self.transformer.compile_blocks()
            else:  # compiled before ``use_eager``: the same compiled code again
                self.transformer.compiled_gate.open = True
            self._compiled_now()
        self._reset_graphs()  # new compiled code or quantized weights: captured graphs would be stale
        return self

    def compile_in_background(self, fill_caches_first: bool = False):
        """Start compiling the DiT's blocks on a side thread (``lensrun.background_compile``); this pipeline
        stays eager until ``switch_to_compiled`` is called with the returned job finished. ``fill_caches_first``
        (empty compile caches): a child process compiles a one-block DiT into them first."""
        from lensrun.background_compile import BackgroundCompile

        acceleration.compile_cache_dir()
        return BackgroundCompile(self, fill_caches_first)

    def switch_to_compiled(self, job) -> None:
        """Between runs: use the blocks a finished ``compile_in_background`` job compiled."""
        job.gate.open = True
        self._compiled_now()
        self._reset_graphs()

    def use_eager(self) -> None:
        """Between runs: the blocks run eagerly again (a run that asked for no compilation in a process that has
        compiled: its images must be the eager ones); their compiled code stays for a later compiled run."""
        if self.compiled:
            self.transformer.compiled_gate.open = False
            self.compiled = False
            self._reset_graphs()

    def _compiled_now(self) -> None:
        if self.device.type == "cuda" and self.text_encoder is not None:
            self.text_encoder.compile_dequantize()
        self.compiled = True

    def apply_plan(self, plan: Plan, device: str | torch.device | None = None) -> LensPipeline:
        """Carry out a memory plan (see ``lensrun.memory``): DiT precision, placement, decode chunk, VAE tiling.

        Weights may still be in CPU memory (``from_pretrained(device="cpu")``): a phased plan never puts more
        than one component on the GPU at a time.
        """
        if device is not None:
            self._device = torch.device(device)
        if self.placer is not None and self.placer.plan == plan and self.placer.device == self._device:
            return self
        if self.placer is not None:
            self.placer.release()
            self.placer = None
        self.placer = Placer(self, plan)
        self.placer.apply()
        if plan.precision != self.precision:  # after placement: torchao quantizes the weights where they are
            self.optimize(compile=self.compiled, precision=plan.precision)
        self._reset_graphs()
        return self

    @property
    def plan(self) -> Plan:
        return self.placer.plan if self.placer is not None else Plan(precision=self.precision)

    def phase(self, name: str):
        """Context for the encode / denoise / decode phase: brings that component's weights in under a plan."""
        return self.placer.phase(name) if self.placer is not None else contextlib.nullcontext()

    def encoding_phase(self, prompts: list[tuple[str, str]]):
        """The encode phase, entered only when one of ``prompts`` ((text, template date) pairs) misses the prompt
        cache: with every prompt cached, a phased plan never brings the encoder's weights onto the GPU."""
        keys = [self.prompt_cache.key(p, date, MAX_SEQUENCE_LENGTH, self.dtype) for p, date in prompts]
        return self.phase("encode") if not all(map(self.prompt_cache.has, keys)) else contextlib.nullcontext()

    @property
    def device(self) -> torch.device:
        """Where the computation runs (weights may visit it only for their phase under a plan)."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.img_in.weight.dtype

    # ------------------------------------------------------------------------------------------ text encoding
    def encode_prompt(
        self, prompts: list[str], template_date: str = DEFAULT_TEMPLATE_DATE
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Multi-layer features [B, S, H] and mask [B, S] of the prompts (template prefix already dropped)."""
        if self.text_encoder is None or self.tokenizer is None:
            raise LensrunError("this pipeline has no text encoder/tokenizer: pass prompt_embeds instead")
        tok = tokenize_prompts(self.tokenizer, prompts, template_date, MAX_SEQUENCE_LENGTH)
        hidden = self.text_encoder(tok.input_ids, tok.attention_mask)
        features = [h[:, tok.offset :].to(self.dtype) for h in hidden]
        return features, upload(tok.attention_mask[:, tok.offset :], features[0].device)

    def encode_one(self, prompt: str, template_date: str = DEFAULT_TEMPLATE_DATE) -> list[torch.Tensor]:
        """One prompt's features [1, S_valid, H] per layer, through the prompt cache. Prompts are always encoded
        alone, so a prompt's features never depend on what else was in the batch."""
        key = self.prompt_cache.key(prompt, template_date, MAX_SEQUENCE_LENGTH, self.dtype)
        cached = self.prompt_cache.get(key, self.device)
        if cached is not None:
            return cached
        features, _ = self.encode_prompt([prompt], template_date)
        self.prompt_cache.put(key, features)
        return features

    def conditions(
        self,
        req: GenerationRequest,
        prompt_embeds: list[torch.Tensor] | None = None,
        prompt_mask: torch.Tensor | None = None,
        negative_prompt_embeds: list[torch.Tensor] | None = None,
        negative_prompt_mask: torch.Tensor | None = None,
    ) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]] | None]:
        """Per-prompt positive rows and negative rows (None when guidance is off), each cut to valid tokens."""
        if prompt_embeds is not None:
            pos = _rows([f.to(self.device, self.dtype) for f in prompt_embeds], prompt_mask)
        else:
            pos = [self.encode_one(p, req.template_date) for p in req.prompts]
        if req.cfg == 1.0:
            return pos, None
        if negative_prompt_embeds is not None:
            neg = _rows([f.to(self.device, self.dtype) for f in negative_prompt_embeds], negative_prompt_mask)
            if len(neg) == 1:
                neg = neg * len(pos)
        elif req.negative_prompt.strip():
            neg = [self.encode_one(req.negative_prompt, req.template_date)] * len(pos)
        else:
            empty = [torch.zeros(1, 0, f.shape[-1], device=self.device, dtype=self.dtype) for f in pos[0]]
            neg = [empty] * len(pos)
        if len(neg) != len(pos):
            raise LensrunError(f"{len(neg)} negative conditions for {len(pos)} prompts")
        return pos, neg

    # --------------------------------------------------------------------------------------------- denoising
    def initial_noise(self, seed: int, grid: tuple[int, int], noise: str = "cpu") -> torch.Tensor:
        """Latent noise [1, H·W, 128]: from a CPU generator (same on every GPU) or, as upstream, the device's."""
        gen_device = torch.device("cpu") if noise == "cpu" else self.device
        gen = torch.Generator(gen_device).manual_seed(seed)
        shape = (1, grid[0] * grid[1], self.transformer.config.in_channels)
        return _randn(shape, gen, self.device, self.dtype)

    def _schedule(self, req: GenerationRequest) -> tuple[list[float], torch.Tensor]:
        """Sigmas (floats, terminal 0) and model timesteps (sigma rounded through the model dtype, as upstream)."""
        grid = req.grid
        sigmas, _ = lens_sigmas(self.scheduler, grid[0] * grid[1], req.steps)
        timesteps = upload(self.scheduler.timesteps, self.device).to(self.dtype) / 1000
        return sigmas.tolist(), timesteps

    @torch.inference_mode()
    def denoise(
        self,
        latents: torch.Tensor,
        cond: list[torch.Tensor],
        uncond: list[torch.Tensor] | None,
        req: GenerationRequest,
        on_step: Callable[[int, int], None] | None = None,
        stats: dict[str, float] | None = None,
    ) -> torch.Tensor:
        """Euler flow-matching from noise to clean latent tokens; CFG only when ``uncond`` is given.

        Each branch runs mask-free at its own text length (with FlashAttention padded to a bucket whose padding the
        attention leaves out, ``bucket_text``); the timestep embedding and all blocks' modulation
        are computed for every step before the loop; nothing in the loop waits for the GPU.
        """
        img_shapes = [(1, *req.grid)]
        sigmas, timesteps = self._schedule(req)
        conditioning = self.transformer.conditioning(timesteps)
        # Sequence-parallel: this rank's slice of the image tokens runs the loop below, gathered at the end.
        sequence = self.parallel is not None and self.parallel.mode == "sequence"
        if self.parallel is not None and not sequence and uncond is not None:
            return self._denoise_cfg_parallel(latents, cond, uncond, req, sigmas, timesteps, conditioning, on_step)
        cond, cond_keys = self.bucket_text(cond, latents.shape[1])
        uncond, uncond_keys = self.bucket_text(uncond, latents.shape[1]) if uncond is not None else (None, None)
        keys = [cond_keys, uncond_keys]
        if self.graph_steps and not req.cache and not sequence:
            with acceleration.attention_kernels(self.device):
                sig = upload(torch.tensor(sigmas, dtype=torch.float32), self.device)
                out = self.step_graphs.run(latents, cond, uncond, conditioning, sig, req.grid, req.cfg, on_step, keys)
            if out is not None:
                return out
        if self.graph_steps and self.step_graphs.failed is not None:
            warnings.warn(f"denoising steps could not be captured as a CUDA graph ({self.step_graphs.failed}); "
                          "running them one by one", stacklevel=2)  # fmt: skip
            self.graph_steps = False
        from lensrun.models.transformer_lens import FirstBlockCache

        cache = None if sequence else req.cache  # a block skipped on one rank only would desync the exchanges
        caches = [FirstBlockCache(cache), FirstBlockCache(cache)] if cache else [None, None]
        if sequence:
            latents = self.parallel.sequence.shard(latents)
        with acceleration.attention_kernels(self.device):
            for i in range(req.steps):
                t = timesteps[i : i + 1]
                step_cond = conditioning.select(i)
                if uncond is not None and not cache:
                    # Both branches block by block: a block's weights are read (or streamed) once per step.
                    v, v_u = self.transformer.forward_branches(latents, [cond, uncond], t, img_shapes, step_cond, keys)
                    v = guided_velocity(v.float(), v_u.float(), req.cfg)
                else:
                    v = self.transformer(
                        latents, cond, None, t, img_shapes, step_conditioning=step_cond, block_cache=caches[0],
                        key_counts=cond_keys,
                    ).sample  # fmt: skip
                    if uncond is not None:
                        v_u = self.transformer(
                            latents, uncond, None, t, img_shapes, step_conditioning=step_cond, block_cache=caches[1],
                            key_counts=uncond_keys,
                        ).sample  # fmt: skip
                        v = guided_velocity(v.float(), v_u.float(), req.cfg)
                latents = euler_step(latents, v, sigmas[i], sigmas[i + 1])
                if on_step is not None:
                    on_step(i + 1, req.steps)
        if stats is not None and cache:
            for name in ("skipped", "computed"):
                stats[f"cache_{name}"] = stats.get(f"cache_{name}", 0) + sum(getattr(c, name) for c in caches)
        return self.parallel.sequence.unshard(latents) if sequence else latents

    def bucket_text(self, features: list[torch.Tensor], image_tokens: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Text features zero-padded to a multiple of ``TEXT_BUCKET`` tokens, and the count of keys that count
        (image + valid text, int32 [B]) — for a FlashAttention backend on one device, where the count leaves
        the padding out of the attention (the same image). New prompt lengths then reuse compiled shapes and
        captured step graphs instead of running the Python step loop. SDPA, a token split and empty text keep
        their exact lengths (None: every key counts), as does SageAttention (it takes no key counts)."""
        length = features[0].shape[1]
        if self.transformer.attention_backend not in attention.FLASH or self.parallel is not None or length == 0:
            return features, None
        padded = -(-length // TEXT_BUCKET) * TEXT_BUCKET
        counts = torch.full((features[0].shape[0],), image_tokens + length, dtype=torch.int32, device=self.device)
        return [torch.nn.functional.pad(f, (0, 0, 0, padded - length)) for f in features], counts

    def _denoise_cfg_parallel(self, latents, cond, uncond, req, sigmas, timesteps, conditioning, on_step):
        """Each rank computes its branch's velocity (the conditional one on the first half of the ranks) exactly
        as one GPU would — over its slice of the tokens when the branch is split too — then one exchange with
        the rank holding the same tokens of the other branch; both take the same guided Euler step."""
        group = self.parallel
        mine = cond if group.branch == 0 else uncond
        img_shapes = [(1, *req.grid)]
        if group.sequence is not None:
            latents = group.sequence.shard(latents)
        with acceleration.attention_kernels(self.device):
            for i in range(req.steps):
                t = timesteps[i : i + 1]
                v = self.transformer(latents, mine, None, t, img_shapes, step_conditioning=conditioning.select(i)).sample
                v_c, v_u = group.branches(v)
                latents = euler_step(latents, guided_velocity(v_c.float(), v_u.float(), req.cfg), sigmas[i], sigmas[i + 1])
                if on_step is not None:
                    on_step(i + 1, req.steps)
        return group.sequence.unshard(latents) if group.sequence is not None else latents

    @torch.inference_mode()
    def denoise_reference(
        self,
        latents: torch.Tensor,
        cond: list[torch.Tensor],
        uncond: list[torch.Tensor],
        req: GenerationRequest,
    ) -> torch.Tensor:
        """Upstream semantics, kept as the yardstick: [cond; uncond] zero-padded to one length with a key mask,
        one batch-of-2 forward per step, modulation recomputed in every forward."""
        length = max(cond[0].shape[1], uncond[0].shape[1])
        pad = lambda f: torch.nn.functional.pad(f, (0, 0, 0, length - f.shape[1]))
        features = [torch.cat([pad(a), pad(b)]) for a, b in zip(cond, uncond, strict=True)]
        mask = torch.zeros(2, length, dtype=torch.bool, device=self.device)
        mask[0, : cond[0].shape[1]] = True
        mask[1, : uncond[0].shape[1]] = True
        img_shapes = [(1, *req.grid)]
        sigmas, timesteps = self._schedule(req)
        for i in range(req.steps):
            v_c, v_u = self.transformer(
                latents.repeat(2, 1, 1), features, mask, timesteps[i].expand(2), img_shapes
            ).sample.chunk(2)
            latents = euler_step(latents, guided_velocity(v_c, v_u, req.cfg), sigmas[i], sigmas[i + 1])
        return latents

    # ---------------------------------------------------------------------------------------------- the call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        base_resolution: int | None = None,
        aspect_ratio: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: list[torch.Tensor] | None = None,
        prompt_mask: torch.Tensor | None = None,
        negative_prompt_embeds: list[torch.Tensor] | None = None,
        negative_prompt_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        noise: str = "cpu",
        template_date: str = DEFAULT_TEMPLATE_DATE,
        cache: float | None = None,
        show_progress: bool = False,
        on_step: Callable[[int, int], None] | None = None,
    ) -> LensPipelineOutput:
        """Generate images. Steps/CFG default to the variant's preset (lens 20/5.0, turbo 4/1.0, base 50/5.0)."""
        if output_type not in OUTPUT_TYPES:
            raise LensrunError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got '{output_type}'")
        if prompt is None and prompt_embeds is None:
            raise LensrunError("give a prompt or prompt_embeds")
        if prompt is None:
            prompt = [""] * prompt_embeds[0].shape[0]
        req = GenerationRequest.build(
            prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
            base_resolution=base_resolution, aspect_ratio=aspect_ratio, steps=num_inference_steps,
            cfg=guidance_scale, n=num_images_per_prompt, seed=seed, noise=noise, variant=self.variant,
            template_date=template_date, cache=cache, need_prompt=prompt_embeds is None,
        )  # fmt: skip
        total = len(req.prompts) * req.n
        if latents is not None and latents.shape[0] != total:
            raise LensrunError(f"latents hold {latents.shape[0]} images but {total} are asked for")
        clock = _PhaseClock(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with clock("encode"), self.encoding_phase(
            req.prompts_to_encode(prompt_embeds is not None, negative_prompt_embeds is not None)
        ):
            pos, neg = self.conditions(req, prompt_embeds, prompt_mask, negative_prompt_embeds, negative_prompt_mask)
        if len(pos) != len(req.prompts):
            raise LensrunError(f"{len(pos)} prompt embeddings for {len(req.prompts)} prompts")

        from tqdm.auto import tqdm

        bar = tqdm(total=total * req.steps, desc="denoising", unit="step", disable=not show_progress)
        results, configs = [], []
        singles = req.images()
        with clock("denoise"), self.phase("denoise"):
            for p in range(len(req.prompts)):
                for k in range(req.n):
                    index = p * req.n + k
                    settings = singles[index].record()
                    if latents is not None:
                        x = latents[index : index + 1].to(self.device, self.dtype)
                    elif generator is not None:
                        x = _randn((1, *self._token_shape(req)), generator, self.device, self.dtype)
                        settings["seed"] = None
                    else:
                        x = self.initial_noise(settings["seed"], req.grid, req.noise)

                    def step(i: int, n: int, _base: int = index * req.steps) -> None:
                        bar.update(1)
                        if on_step is not None:
                            on_step(_base + i, total * req.steps)

                    results.append(self.denoise(x, pos[p], neg[p] if neg is not None else None, req, step, stats=clock.totals))
                    settings.update(
                        model=self.model_name, dtype=str(self.dtype).removeprefix("torch."), quantize=self.precision,
                        vae_tiling=self.plan.vae_tiling,
                    )  # fmt: skip
                    configs.append(settings)
        bar.close()
        if output_type != "latent":
            with clock("decode"), self.phase("decode"):
                results = [decode_tokens(self.vae, x, req.grid) for x in results]
        report = {"plan": self.plan.name, "seconds": {k: v for k, v in clock.totals.items() if not k.startswith("cache")}}
        if self.device.type == "cuda":
            report["peak_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            report["peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        return LensPipelineOutput(
            images=_format(results, output_type), configs=configs, timings=clock.totals, report=report
        )

    def _token_shape(self, req: GenerationRequest) -> tuple[int, int]:
        return req.grid[0] * req.grid[1], self.transformer.config.in_channels


def _format(outputs: list[torch.Tensor], output_type: str):
    """Decoded images in [-1, 1] → the requested type ('latent' keeps packed tokens)."""
    batch = torch.cat(outputs, dim=0)
    if output_type == "latent":
        return batch
    if output_type == "pil":
        return to_pil(batch)
    unit = ((batch + 1) / 2).clamp(0, 1).cpu()
    return unit if output_type == "pt" else unit.permute(0, 2, 3, 1).numpy()


class _PhaseClock:
    """Wall time per phase, summed over images; synchronizes CUDA at phase edges only (never inside the loop)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _randn(shape: tuple, generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Noise drawn where the generator lives (a CPU generator gives the same numbers on every GPU), then moved."""
    where = "cpu" if generator.device.type == "cpu" else device
    return upload(torch.randn(shape, generator=generator, device=where, dtype=dtype), device)


def resolve_sources(model: str | Path, variant: str | None, files: dict | None) -> tuple[Path | None, dict[str, Path]]:
    """(diffusers folder or None, single file per part): a ComfyUI models folder gives every part from its files;
    otherwise the folder is checked, less the parts given as files (an encoder file holds its tokenizer)."""
    from lensrun import single_file

    files = {part: Path(f) for part, f in (files or {}).items() if f is not None}
    unknown = set(files) - {"transformer", "vae", "text_encoder"}
    if unknown:
        raise LensrunError(f"single files replace the transformer, text_encoder or vae; not {sorted(unknown)}")
    comfy = single_file.comfy_models_dir(Path(model))
    if comfy is not None:
        return None, single_file.comfy_parts(comfy, variant, {k: str(v) for k, v in files.items()})
    root = loading.resolve_model(model)
    loading.check_layout(root, provided=set(files) | ({"tokenizer"} if "text_encoder" in files else set()))
    return root, files


def _comfy_text_encoder(root: Path | None, path: Path, layers: tuple[int, ...], dtype: torch.dtype, device):
    """ComfyUI's NVFP4 GPT-OSS file and the tokenizer inside it (config: the folder's, else the published one)."""
    from lensrun import single_file
    from lensrun.configs import FULL_TEXT_ENCODER_CONFIG
    from lensrun.models.text_encoder import LensTextEncoder

    config = loading.component_config(root, "text_encoder", FULL_TEXT_ENCODER_CONFIG)
    return LensTextEncoder.from_comfy_file(path, config, layers, dtype, device), single_file.read_tokenizer(path)


def _assemble(cls, config: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype):
    """A diffusers model from its config and its already-read tensors (no second copy): built on the meta
    device, then each tensor converted where it lies and assigned."""
    with torch.device("meta"):
        model = cls.from_config(config)
    state = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise LensrunError(f"weight '{missing[0]}' is missing from the {cls.__name__} checkpoint")
    model.load_state_dict({k: state[k] for k in expected}, assign=True, strict=True)
    return model.eval()


def _assemble_by_block(cls, config: dict, tensors, precision: str):
    """Like ``_assemble``, from (name, tensor) pairs in module order; with a torchao ``precision`` each DiT block
    is quantized as soon as its tensors are in, so the whole DiT never exists in the load dtype."""
    with torch.device("meta"):
        model = cls.from_config(config)
    part: dict[str, torch.Tensor] = {}
    block = None

    def place() -> None:
        model.load_state_dict(part, assign=True, strict=False)
        part.clear()
        if block is not None:
            acceleration.quantize_block(model.transformer_blocks[block], block, precision)

    for name, tensor in tensors:
        index = int(name.split(".")[1]) if name.startswith("transformer_blocks.") else None
        if part and index != block:
            place()
        block = index
        part[name] = tensor
    place()
    missing = [k for k, t in model.state_dict().items() if t.is_meta]
    if missing:
        raise LensrunError(f"weight '{missing[0]}' is missing from the {cls.__name__} checkpoint")
    return model.eval()


def _init_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


@contextlib.contextmanager
def _quiet_diffusers():
    """Hide diffusers' notices about config keys it ignores (e.g. the VAE's ``force_upcast``)."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        dlog.set_verbosity(level)
