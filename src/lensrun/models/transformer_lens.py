"""The Lens dual-stream MMDiT, with the checkpoint's exact parameter names (LENS_SPEC §2).

Plain PyTorch on top of diffusers' ModelMixin/ConfigMixin so that ``from_pretrained(..., subfolder="transformer")``
loads the published weights. Two attention paths share one set of weights:

* masked: padded text keys get a boolean mask in every block (upstream semantics);
* mask-free: the caller passes text cut to its valid tokens and no mask, so flash/cuDNN kernels apply.
  Both give the same image output (LENS_SPEC §11). With FlashAttention the text may instead be padded to a fixed
  length with the count of valid keys (``key_counts``): the same output, and fewer shapes to compile and capture.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous, RMSNorm
from torch import nn

from lensrun.attention import FLASH, attend, backend_name, flash, is_counts, to_fp8

ROPE_THETA = 10000.0


def _axis_freqs(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Angles [L, dim/2] for one RoPE axis: position × 10000^(−2k/dim)."""
    k = torch.arange(dim // 2, dtype=torch.float64, device=positions.device)
    omega = ROPE_THETA ** (-2.0 * k / dim)
    return (positions.to(torch.float64)[:, None] * omega[None, :]).to(torch.float32)


def lens_rope(
    grid: tuple[int, int], text_len: int, axes_dims: tuple[int, int, int], device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [N + S, head_dim/2] for the image grid followed by ``text_len`` text tokens.

    Image token (r, c): frame position 0, row r − ceil(H/2), column c − ceil(W/2).
    Text token j: position max(H//2, W//2) + j on all three axes.
    """
    h, w = grid
    d_frame, d_row, d_col = axes_dims
    rows = torch.arange(h, device=device) - math.ceil(h / 2)
    cols = torch.arange(w, device=device) - math.ceil(w / 2)
    rr = rows[:, None].expand(h, w).reshape(-1)
    cc = cols[None, :].expand(h, w).reshape(-1)
    img = torch.cat(
        [_axis_freqs(torch.zeros_like(rr), d_frame), _axis_freqs(rr, d_row), _axis_freqs(cc, d_col)], dim=-1
    )
    txt_pos = max(h // 2, w // 2) + torch.arange(text_len, device=device)
    txt = torch.cat([_axis_freqs(txt_pos, d) for d in axes_dims], dim=-1)
    angles = torch.cat([img, txt], dim=0)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2m], x[2m+1]) of x [B, H, L, D] in fp32; cos/sin are [L, D/2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class SwiGLU(nn.Module):
    """Gated MLP without biases: w2(SiLU(w1 x) · w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LensJointAttention(nn.Module):
    """Joint attention over [image; text] with per-stream QKV, QK RMSNorm and output projections."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.img_qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.txt_qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.norm_q = RMSNorm(head_dim, eps=eps)
        self.norm_k = RMSNorm(head_dim, eps=eps)
        self.norm_added_q = RMSNorm(head_dim, eps=eps)
        self.norm_added_k = RMSNorm(head_dim, eps=eps)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim)])
        self.to_add_out = nn.Linear(heads * head_dim, dim)
        # a lensrun.parallel.Sequence while this rank holds a slice of the image tokens (Ulysses); not a module
        self.sequence = None
        self.backend = "sdpa"  # lensrun.attention backend name
        self.fused_inputs = True  # FlashAttention on a GPU: norms, RoPE and layout in one kernel (joint_qkv)

    def _qkv(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, length, _ = projected.shape
        q, k, v = projected.view(b, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def joint_inputs(
        self, img_qkv: torch.Tensor, txt_qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The QKV projections [B, N, 3·H·D] and [B, S, 3·H·D] → q, k, v [B, H, N + S, D]: per-head RMSNorm of
        q and k, the [image; text] concatenation, RoPE (what ``lensrun.joint_qkv`` does in one pass)."""
        q_i, k_i, v_i = self._qkv(img_qkv)
        q_t, k_t, v_t = self._qkv(txt_qkv)
        q = torch.cat([self.norm_q(q_i), self.norm_added_q(q_t)], dim=2)
        k = torch.cat([self.norm_k(k_i), self.norm_added_k(k_t)], dim=2)
        v = torch.cat([v_i, v_t], dim=2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _project(self, out: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention output [B, N + S, H·D] → (image, text) through their output projections."""
        return self.to_out[0](out[:, :n]), self.to_add_out(out[:, n:])

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``keys``: which keys count — None (all), a bool mask, or counts of leading keys (``attention.attend``)."""
        n = x.shape[1]
        if self._fuses(x, keys):
            return self._fused(x, c, cos, sin, keys)
        q, k, v = self.joint_inputs(self.img_qkv(x), self.txt_qkv(c), cos, sin)
        if self.sequence is not None:
            return self._sequence_parallel(q, k, v, n)
        return self._project(attend(q, k, v, keys, self.backend).transpose(1, 2).flatten(2), n)

    def _fuses(self, x: torch.Tensor, keys: torch.Tensor | None) -> bool:
        """Whether this call takes ``_fused``: FlashAttention without a mask or a token split, on a GPU, with
        norm weights in the activations' half-precision dtype (the kernel rounds as the eager path does)."""
        return (
            self.fused_inputs
            and self.backend in FLASH
            and (keys is None or is_counts(keys))
            and self.sequence is None
            and x.is_cuda
            and self.norm_q.weight.dtype == x.dtype
            and self.head_dim & (self.head_dim - 1) == 0  # a Triton tile's sides are powers of two
        )

    def _fused(
        self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, counts: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The eager path's attention with q/k norms, RoPE, the [image; text] concatenation and (fa3-fp8) q/k's
        quantization in one Triton pass (``lensrun.joint_qkv``), straight into FlashAttention's layout."""
        from lensrun.joint_qkv import joint_qkv

        n, fp8 = x.shape[1], self.backend == "fa3-fp8"
        weights = (self.norm_q.weight, self.norm_k.weight, self.norm_added_q.weight, self.norm_added_k.weight)
        qk, v, descale, v_amax = joint_qkv(
            self.img_qkv(x), self.txt_qkv(c), weights, (cos, sin), self.norm_q.eps, self.heads, fp8
        )
        if fp8:
            v8, v_scale = to_fp8(v, v_amax)
            out = flash(qk[0], qk[1], v8, (descale[0], descale[1], v_scale), x.dtype, counts)
        else:
            out = flash(qk[0], qk[1], v, counts=counts)
        return self._project(out.flatten(2), n)

    def _sequence_parallel(self, q, k, v, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ulysses: this rank's ``n`` image tokens of every head become every image token of its share of the
        heads (one all-to-all each for q, k, v), the text (held whole by every rank) keeps those heads; attention
        runs over the whole sequence, and one all-to-all and one all-gather bring the outputs back."""
        sp = self.sequence
        q, k, v = (torch.cat([sp.scatter_heads(t[:, :, :n]), sp.my_heads(t[:, :, n:])], dim=2) for t in (q, k, v))
        out = attend(q, k, v, None, self.backend)
        image = n * sp.world
        out_x = sp.gather_heads(out[:, :, :image]).transpose(1, 2).flatten(2)
        out_c = sp.all_heads(out[:, :, image:]).transpose(1, 2).flatten(2)
        return self.to_out[0](out_x), self.to_add_out(out_c)


class LensTransformerBlock(nn.Module):
    """One dual-stream block: modulated RMSNorm → joint attention → gated SwiGLU, for image and text."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.img_norm1 = RMSNorm(dim, eps=eps)
        self.img_norm2 = RMSNorm(dim, eps=eps)
        self.txt_norm1 = RMSNorm(dim, eps=eps)
        self.txt_norm2 = RMSNorm(dim, eps=eps)
        self.attn = LensJointAttention(dim, heads, head_dim, eps=eps)
        self.img_mlp = SwiGLU(dim, mlp_hidden)
        self.txt_mlp = SwiGLU(dim, mlp_hidden)

    def modulation(self, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, text) shift/scale/gate vectors [B, 1, 6·D]; depend on the timestep only, so they can be
        computed for every step at once before the loop."""
        return self.img_mod(temb)[:, None], self.txt_mod(temb)[:, None]

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        mod: tuple[torch.Tensor, torch.Tensor],
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = mod[0].chunk(6, dim=-1)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = mod[1].chunk(6, dim=-1)
        xa = self.img_norm1(x) * (1 + i_scale1) + i_shift1
        ca = self.txt_norm1(c) * (1 + t_scale1) + t_shift1
        attn_x, attn_c = self.attn(xa, ca, cos, sin, keys)
        x = x + i_gate1 * attn_x
        c = c + t_gate1 * attn_c
        x = x + i_gate2 * self.img_mlp(self.img_norm2(x) * (1 + i_scale2) + i_shift2)
        c = c + t_gate2 * self.txt_mlp(self.txt_norm2(c) * (1 + t_scale2) + t_shift2)
        if x.dtype == torch.float16:
            x, c = x.clamp(-65504, 65504), c.clamp(-65504, 65504)
        return x, c


class CompiledGate:
    """Which threads call compiled blocks: every thread once ``open``; before that only one inside ``warming()``."""

    def __init__(self, open: bool) -> None:
        self.open = open
        self._local = threading.local()

    def route(self, compiled, eager):
        return lambda *args, **kwargs: (compiled if self.compiled_here() else eager)(*args, **kwargs)

    def compiled_here(self) -> bool:
        return self.open or getattr(self._local, "warming", False)

    @contextlib.contextmanager
    def warming(self):
        self._local.warming = True
        try:
            yield
        finally:
            self._local.warming = False


@dataclass
class StepConditioning:
    """Everything a forward needs from the timestep: its embedding and each block's modulation."""

    temb: torch.Tensor
    mods: list[tuple[torch.Tensor, torch.Tensor]]

    def select(self, index: int) -> StepConditioning:
        """Row ``index`` of a conditioning computed for several timesteps at once."""
        pick = lambda t: t[index : index + 1]
        return StepConditioning(pick(self.temb), [(pick(a), pick(b)) for a, b in self.mods])


class FirstBlockCache:
    """Opt-in step cache (First-Block-Cache): when block 0's output residual barely changes between steps,
    reuse the previous step's residual of blocks 1… instead of running them. One instance per CFG branch."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.prev_first: torch.Tensor | None = None
        self.rest_residual: torch.Tensor | None = None
        self.skipped = 0
        self.computed = 0

    def can_skip(self, first: torch.Tensor) -> bool:
        """Relative mean change of block 0's output since the last fully computed step < threshold."""
        if self.prev_first is None or self.rest_residual is None or self.prev_first.shape != first.shape:
            return False
        change = (first.float() - self.prev_first.float()).abs().mean() / self.prev_first.float().abs().mean()
        return bool(change < self.threshold)

    def skip(self, first: torch.Tensor) -> torch.Tensor:
        self.skipped += 1
        return first + self.rest_residual

    def store(self, first: torch.Tensor, last: torch.Tensor) -> None:
        self.computed += 1
        self.prev_first = first
        self.rest_residual = last - first


class LensTimeEmbedding(nn.Module):
    """256-channel sinusoid of t (scale 1000, cos first) → MLP; keys ``time_text_embed.timestep_embedder.*``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)
        self.timestep_embedder = TimestepEmbedding(256, dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(self.time_proj(timestep).to(dtype))


class LensTransformer2DModel(ModelMixin, ConfigMixin):
    """Lens MMDiT. Input/output are packed latent tokens [B, H·W, 128] (H, W = latent grid of 2×2 patches)."""

    _supports_gradient_checkpointing = False
    _no_split_modules = ["LensTransformerBlock"]
    _repeated_blocks = ["LensTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 128,
        out_channels: int = 32,
        num_layers: int = 48,
        attention_head_dim: int = 64,
        num_attention_heads: int = 24,
        inner_dim: int = 1536,
        enc_hidden_dim: int = 2880,
        axes_dims_rope: tuple[int, int, int] = (8, 28, 28),
        gate_mlp: bool = True,
        rms_norm: bool = True,
        multi_layer_encoder_feature: bool = True,
        selected_layer_index: tuple[int, ...] = (5, 11, 17, 23),
    ) -> None:
        super().__init__()
        if not (gate_mlp and rms_norm and multi_layer_encoder_feature):
            raise ValueError("Lens checkpoints use gate_mlp, rms_norm and multi_layer_encoder_feature = true")
        if sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(f"axes_dims_rope {list(axes_dims_rope)} must sum to attention_head_dim {attention_head_dim}")
        dim = inner_dim
        n_feat = len(selected_layer_index)
        self.time_text_embed = LensTimeEmbedding(dim)
        self.txt_norm = nn.ModuleList([RMSNorm(enc_hidden_dim, eps=1e-5) for _ in range(n_feat)])
        self.txt_in = nn.Linear(n_feat * enc_hidden_dim, dim)
        self.img_in = nn.Linear(in_channels, dim)
        mlp_hidden = int(dim / 3 * 8)
        self.transformer_blocks = nn.ModuleList(
            [
                LensTransformerBlock(dim, num_attention_heads, attention_head_dim, mlp_hidden)
                for _ in range(num_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.compiled_gate: CompiledGate | None = None  # set by compile_blocks
        self.sequence = None  # a lensrun.parallel.Sequence: the latents given are this rank's slice

    def set_attention_backend(self, name: str) -> None:
        """Every block's joint attention through ``name``: a ``lensrun.attention`` backend, or diffusers'
        dispatcher name for the same kernel (``native``, ``_native_cudnn``, ``_flash_3``); as diffusers' call."""
        name = backend_name(name)
        for block in self.transformer_blocks:
            block.attn.backend = name

    def reset_attention_backend(self) -> None:
        """Back to torch's SDPA (diffusers' call of the same name)."""
        self.set_attention_backend("sdpa")

    def set_fused_attention_inputs(self, on: bool) -> None:
        """Whether FlashAttention's inputs come from ``lensrun.joint_qkv``'s one pass (the default) or from
        ``LensJointAttention.joint_inputs`` compiled by Inductor (benchmarks compare the two)."""
        for block in self.transformer_blocks:
            block.attn.fused_inputs = on

    @property
    def attention_backend(self) -> str:
        return self.transformer_blocks[0].attn.backend

    def split_sequence(self, group) -> None:
        """Hold a slice of the image tokens on this rank (``group``), or the whole sequence again (None)."""
        self.sequence = group
        self._rope_cache.clear()
        for block in self.transformer_blocks:
            block.attn.sequence = group

    def conditioning(self, timestep: torch.Tensor) -> StepConditioning:
        """Timestep embedding and every block's modulation for sigmas ``timestep`` [B]."""
        temb = self.time_text_embed(timestep, self.img_in.weight.dtype)
        mods = []
        for block in self.transformer_blocks:  # computed once for all steps: streamed blocks visit the GPU once
            mods.append(block.modulation(temb))
        return StepConditioning(temb, mods)

    def rope(self, grid: tuple[int, int], text_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables, cached per (grid, text length, device): they never change between steps. Under sequence
        parallelism: this rank's image rows, then every text row."""
        key = (grid, text_len, str(device))
        if key not in self._rope_cache:
            if len(self._rope_cache) > 16:
                self._rope_cache.clear()
            tables = lens_rope(grid, text_len, tuple(self.config.axes_dims_rope), device=device)
            if self.sequence is not None:
                tables = tuple(self.sequence.local_rows(t, grid[0] * grid[1]) for t in tables)
            self._rope_cache[key] = tables
        return self._rope_cache[key]

    def compile_blocks(self, open: bool = True, **options) -> CompiledGate:
        """Regional compilation: one compiled graph serves all blocks (they share code and shapes).

        Token counts are compiled as symbolic sizes from the first call (``_symbolic_tokens``): otherwise a prompt
        of a new length, or a new resolution, recompiles once more (seconds in bf16, over a minute in fp8).
        ``open=False``: the compiled blocks are used only by a thread inside ``gate.warming()`` until
        ``gate.open`` is set, so other threads keep running eagerly while one compiles."""
        gate = CompiledGate(open)
        for block in self.transformer_blocks:
            block.compile(**options)
            compiled, eager = block._compiled_call_impl, block._call_impl
            block._compiled_call_impl = gate.route(compiled, eager)
        self.compiled_gate = gate
        return gate

    def _symbolic_tokens(self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Mark the image and text token dimensions of block 0's inputs as varying, for a compiled block's first
        compilation (later blocks get tensors of the same sizes; a text length of 0 still gets its own graph)."""
        if self.compiled_gate is not None:
            for t, dim in ((x, 1), (c, 1), (cos, 0), (sin, 0)):
                torch._dynamo.maybe_mark_dynamic(t, dim)

    def _block(self, i: int, x, c, cond: StepConditioning, cos, sin, keys) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transformer_blocks[i](x, c, cond.mods[i], cos, sin, keys)

    def forward_branches(
        self,
        hidden_states: torch.Tensor,
        branches: list[list[torch.Tensor]],
        timestep: torch.Tensor,
        img_shapes: list[tuple[int, int, int]],
        step_conditioning: StepConditioning | None = None,
        key_counts: list[torch.Tensor | None] | None = None,
    ) -> list[torch.Tensor]:
        """Mask-free velocities for several text conditions of the same latents, block by block: each block's
        weights are used for every branch before the next block's (weights that travel per block, as under a
        streaming plan, travel once per step). Same arithmetic as one ``forward`` per branch; ``key_counts``: a
        branch's ``forward`` argument of that name."""
        _, gh, gw = (int(v) for v in img_shapes[0])
        cond = step_conditioning if step_conditioning is not None else self.conditioning(timestep)
        dtype = self.img_in.weight.dtype
        x0 = self.img_in(hidden_states.to(dtype))
        states = [(x0, self.embed_text(features)) for features in branches]
        ropes = [self.rope((gh, gw), c.shape[1], x0.device) for _, c in states]
        for (x, c), (cos, sin) in zip(states, ropes, strict=True):
            self._symbolic_tokens(x, c, cos, sin)
        counts = key_counts or [None] * len(branches)
        for i, block in enumerate(self.transformer_blocks):
            states = [
                block(x, c, cond.mods[i], cos, sin, keys)
                for (x, c), (cos, sin), keys in zip(states, ropes, counts, strict=True)
            ]
        return [self.proj_out(self.norm_out(x, cond.temb)) for x, _ in states]

    def embed_text(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Per-layer RMSNorm (fp32 variance), concat in layer order, project to the model width."""
        normed = [norm(f) for norm, f in zip(self.txt_norm, features, strict=True)]
        return self.txt_in(torch.cat(normed, dim=-1).to(self.txt_in.weight.dtype))

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: list[torch.Tensor],
        encoder_hidden_states_mask: torch.Tensor | None,
        timestep: torch.Tensor,
        img_shapes: list[tuple[int, int, int]] | tuple[int, int, int],
        return_dict: bool = True,
        step_conditioning: StepConditioning | None = None,
        block_cache: FirstBlockCache | None = None,
        key_counts: torch.Tensor | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Velocity for packed latents. ``timestep`` is sigma in [0, 1].

        ``encoder_hidden_states_mask`` [B, S] (bool, True = valid) masks padded text keys in every block;
        pass None when every text token is valid (the fast path). ``step_conditioning`` (from
        ``conditioning``) skips recomputing the modulation; ``block_cache`` may skip blocks 1… (opt-in).
        ``key_counts`` [B] int32 (FlashAttention backends): the text is padded to a fixed length and only the
        first ``key_counts`` keys (image + valid text) count — the unpadded result, with fewer distinct shapes.
        """
        shape = img_shapes[0] if isinstance(img_shapes[0], (list, tuple)) else img_shapes
        _, gh, gw = (int(v) for v in shape)
        n = hidden_states.shape[1]
        if gh * gw != n * (self.sequence.world if self.sequence is not None else 1):
            raise ValueError(f"img_shapes {gh}x{gw} does not match {n} latent tokens")
        dtype = self.img_in.weight.dtype
        x = self.img_in(hidden_states.to(dtype))
        c = self.embed_text(encoder_hidden_states)
        cond = step_conditioning if step_conditioning is not None else self.conditioning(timestep)
        cos, sin = self.rope((gh, gw), c.shape[1], x.device)
        keys = key_counts
        if encoder_hidden_states_mask is not None:
            valid = torch.cat(
                [torch.ones(x.shape[0], n, dtype=torch.bool, device=x.device), encoder_hidden_states_mask.bool()],
                dim=1,
            )
            keys = valid[:, None, None, :]
        self._symbolic_tokens(x, c, cos, sin)
        x, c = self._block(0, x, c, cond, cos, sin, keys)
        if block_cache is not None and block_cache.can_skip(x):
            x = block_cache.skip(x)
        else:
            first = x
            for i in range(1, len(self.transformer_blocks)):
                x, c = self._block(i, x, c, cond, cos, sin, keys)
            if block_cache is not None:
                block_cache.store(first, x)
        out = self.proj_out(self.norm_out(x, cond.temb))
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)
