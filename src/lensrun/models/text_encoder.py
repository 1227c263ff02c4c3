"""GPT-OSS-20B as Lens's text encoder: hidden states of selected decoder layers (LENS_SPEC §3–4).

Built from transformers' GPT-OSS attention, norms and rotary embedding; only the MoE block is ours, because its
experts stay MXFP4-packed (~9.5 GiB instead of ~36 GiB) and are dequantized one expert at a time for the matmul.
That needs no Hub kernel download and runs on any CUDA GPU and on the CPU. ``lm_head``, the final norm and the
layers after the last selected one are never built.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssDecoderLayer, GptOssRotaryEmbedding

from lensrun import mxfp4
from lensrun.cuda_graphs import GraphCache, capture
from lensrun.transfers import upload


class PackedExperts(nn.Module):
    """GPT-OSS's 32 experts with packed weights: routing, grouped matmuls and the clamped SwiGLU. Subclasses hold
    the packed tensors under the checkpoint's names and decode them (``decoded``)."""

    def __init__(self, config: GptOssConfig) -> None:
        super().__init__()
        self.num_experts = config.num_local_experts
        self.alpha = 1.702
        self.limit = config.swiglu_limit
        self.chunk = self.num_experts  # experts decoded at once; the memory planner may lower it
        self.fused = mxfp4.fused_kernel_available()  # on CUDA: the Triton kernel reads the packed weights

    def decoded(self, part: str, experts: slice, dtype: torch.dtype) -> torch.Tensor:
        """Weights [e, out, in] of ``part`` ('gate_up_proj' or 'down_proj') for ``experts``, decoded."""
        raise NotImplementedError

    def bias(self, part: str) -> torch.Tensor:
        raise NotImplementedError

    def packed(self, part: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``part``'s packed codes, block scales and per-expert scale (None for MXFP4) for the Triton kernel."""
        raise NotImplementedError

    def _experts_fused(self, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The same SwiGLU-with-clamp through the Triton kernel: no decoded weights, no decode workspace."""
        from lensrun.mxfp4_moe import grouped_matmul

        def matmul(x: torch.Tensor, part: str) -> torch.Tensor:
            codes, scales, scale_2 = self.packed(part)
            return grouped_matmul(x, codes, scales, self.bias(part), offsets, scale_2=scale_2)

        return matmul(self._swiglu(matmul(rows, "gate_up_proj")), "down_proj")

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Route each (token, slot) pair to its expert with grouped matmuls over the experts' sorted rows.

        With ``chunk`` ≥ the expert count there is no loop and no host sync; a smaller chunk decodes that many
        experts at a time (one sync per layer), bounding the decoded weights in memory to the chunk's.
        """
        num_experts = self.num_experts
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        expert_of = flat[order]
        token = order // indices.shape[1]
        counts = flat.new_zeros(num_experts).index_add_(0, flat, torch.ones_like(flat))  # bincount syncs on CUDA
        offsets = counts.cumsum(0).to(torch.int32)
        rows = x[token]
        if self.fused and rows.is_cuda:
            y = self._experts_fused(rows, offsets)
        elif self.chunk >= num_experts:
            y = self._experts(rows, expert_of, offsets, slice(0, num_experts))
        else:
            ends = [0, *offsets.tolist()]
            parts = []
            for e0 in range(0, num_experts, self.chunk):
                e1 = min(e0 + self.chunk, num_experts)
                r0, r1 = ends[e0], ends[e1]
                if r1 > r0:
                    parts.append(self._experts(rows[r0:r1], expert_of[r0:r1], offsets[e0:e1] - r0, slice(e0, e1)))
            y = torch.cat(parts)
        y = y * weights.flatten()[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, y)

    def _swiglu(self, gu: torch.Tensor) -> torch.Tensor:
        """GPT-OSS's clamped SwiGLU on interleaved (gate, up) columns."""
        gate = gu[..., 0::2].clamp(max=self.limit)
        up = gu[..., 1::2].clamp(-self.limit, self.limit)
        return ((up + 1) * (gate * torch.sigmoid(gate * self.alpha))).contiguous()

    def _experts(self, rows: torch.Tensor, expert_of: torch.Tensor, offsets: torch.Tensor, experts: slice) -> torch.Tensor:
        """SwiGLU-with-clamp of sorted ``rows`` through the experts in ``experts`` (decoded here, then dropped)."""
        dtype = rows.dtype
        w_gu = self.decoded("gate_up_proj", experts, dtype)
        gu = torch._grouped_mm(rows, w_gu.transpose(-2, -1), offs=offsets)
        del w_gu
        act = self._swiglu(gu + self.bias("gate_up_proj").to(dtype)[expert_of])
        w_down = self.decoded("down_proj", experts, dtype)
        y = torch._grouped_mm(act, w_down.transpose(-2, -1), offs=offsets)
        return y + self.bias("down_proj").to(dtype)[expert_of]


class Mxfp4Experts(PackedExperts):
    """Experts as GPT-OSS ships them: MXFP4 (checkpoint names ``*_blocks``, ``*_scales``, ``*_bias``)."""

    def __init__(self, config: GptOssConfig, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(config)
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        u8 = dict(dtype=torch.uint8, requires_grad=False)
        self.gate_up_proj_blocks = nn.Parameter(torch.zeros(e, 2 * i, h // 32, 16, **u8), requires_grad=False)
        self.gate_up_proj_scales = nn.Parameter(torch.zeros(e, 2 * i, h // 32, **u8), requires_grad=False)
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(e, 2 * i, dtype=dtype), requires_grad=False)
        self.down_proj_blocks = nn.Parameter(torch.zeros(e, h, i // 32, 16, **u8), requires_grad=False)
        self.down_proj_scales = nn.Parameter(torch.zeros(e, h, i // 32, **u8), requires_grad=False)
        self.down_proj_bias = nn.Parameter(torch.zeros(e, h, dtype=dtype), requires_grad=False)
        self.dequantize = mxfp4.dequantize  # replaced by a compiled (fused) version on CUDA

    def decoded(self, part: str, experts: slice, dtype: torch.dtype) -> torch.Tensor:
        return self.dequantize(getattr(self, f"{part}_blocks")[experts], getattr(self, f"{part}_scales")[experts], dtype)

    def bias(self, part: str) -> torch.Tensor:
        return getattr(self, f"{part}_bias")

    def packed(self, part: str) -> tuple[torch.Tensor, torch.Tensor, None]:
        return getattr(self, f"{part}_blocks"), getattr(self, f"{part}_scales"), None


class Nvfp4Bank(nn.Module):
    """One NVFP4 expert matrix bank under ComfyUI's names: ``weight`` [E, out, in/2] codes, ``weight_scale``
    [E, out, in/16] e4m3 (the file's block layout undone at load), ``weight_scale_2`` [E] fp32, ``bias``."""

    def __init__(self, experts: int, out: int, inp: int, dtype: torch.dtype) -> None:
        super().__init__()
        frozen = dict(requires_grad=False)
        self.weight = nn.Parameter(torch.zeros(experts, out, inp // 2, dtype=torch.uint8), **frozen)
        self.weight_scale = nn.Parameter(torch.zeros(experts, out, inp // 16, dtype=torch.float8_e4m3fn), **frozen)
        self.weight_scale_2 = nn.Parameter(torch.zeros(experts, dtype=torch.float32), **frozen)
        self.bias = nn.Parameter(torch.zeros(experts, out, dtype=dtype), **frozen)


class Nvfp4Experts(PackedExperts):
    """Experts as ComfyUI's ``gpt_oss_20b_nvfp4`` file holds them (re-quantized from OpenAI's MXFP4): kept packed,
    read by the Triton kernel on CUDA, decoded per expert chunk elsewhere."""

    def __init__(self, config: GptOssConfig, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(config)
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = Nvfp4Bank(e, 2 * i, h, dtype)
        self.down_proj = Nvfp4Bank(e, h, i, dtype)

    def decoded(self, part: str, experts: slice, dtype: torch.dtype) -> torch.Tensor:
        from lensrun import nvfp4

        bank = getattr(self, part)
        return nvfp4.dequantize(bank.weight[experts], bank.weight_scale[experts], bank.weight_scale_2[experts], dtype)

    def bias(self, part: str) -> torch.Tensor:
        return getattr(self, part).bias

    def packed(self, part: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bank = getattr(self, part)
        return bank.weight, bank.weight_scale, bank.weight_scale_2


class Mxfp4MoE(nn.Module):
    """Top-k router (softmax over the selected logits) + packed experts (MXFP4, or ComfyUI's NVFP4); returns
    (output, router scores)."""

    def __init__(self, config: GptOssConfig, dtype: torch.dtype, experts: str = "mxfp4") -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, config.num_local_experts, bias=True, dtype=dtype)
        self.experts = {"mxfp4": Mxfp4Experts, "nvfp4": Nvfp4Experts}[experts](config, dtype)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, h = hidden.shape
        x = hidden.reshape(-1, h)
        logits = self.router(x)
        top, idx = torch.topk(logits, self.top_k, dim=-1)
        scores = torch.softmax(top, dim=-1, dtype=top.dtype)
        return self.experts(x, idx, scores).reshape(b, s, h), scores


def gpt_oss_config(raw: dict) -> GptOssConfig:
    """GptOssConfig from a checkpoint's config.json, accepting YaRN parameters under either key name.

    Older configs carry them as ``rope_scaling``; missing them silently gives wrong RoPE (LENS_SPEC §1).
    """
    raw = {k: v for k, v in raw.items() if k not in ("quantization_config", "architectures", "auto_map")}
    rope = raw.get("rope_parameters") or raw.get("rope_scaling")
    if rope is not None:
        rope = dict(rope)
        rope.setdefault("rope_theta", raw.get("rope_theta", 150000.0))
        raw["rope_parameters"] = rope
        raw["rope_scaling"] = rope
    config = GptOssConfig(**raw)
    config._attn_implementation = "eager"
    return config


class LensTextEncoder(nn.Module):
    """Embedding + GPT-OSS decoder layers 0..max(selected); returns the selected layers' outputs."""

    def __init__(
        self, config: GptOssConfig, selected_layers: tuple[int, ...], dtype: torch.dtype = torch.bfloat16, experts: str = "mxfp4"
    ):
        super().__init__()
        if max(selected_layers) >= config.num_hidden_layers:
            raise ValueError(
                f"selected layers {list(selected_layers)} exceed the encoder's {config.num_hidden_layers} layers"
            )
        self.config = config
        self.selected_layers = tuple(selected_layers)
        self.experts_format = experts
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        layers = []
        for i in range(max(selected_layers) + 1):
            layer = GptOssDecoderLayer(config, i)
            layer.mlp = Mxfp4MoE(config, dtype, experts)
            layers.append(layer)
        self.layers = nn.ModuleList(layers)
        self.rotary_emb = GptOssRotaryEmbedding(config)
        self.use_graphs = False  # CUDA graphs per padded length; only while the weights stay put (resident)
        self._graphs: GraphCache[tuple] = GraphCache()  # per (batch, padded length)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def _masks(self, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Additive masks [B, 1, S, S]: causal (+ sliding window) over valid keys, per layer type."""
        s = attention_mask.shape[1]
        pos = torch.arange(s, device=attention_mask.device)
        causal = pos[None, :] <= pos[:, None]
        sliding = causal & (pos[:, None] - pos[None, :] < self.config.sliding_window)
        keys = attention_mask.bool()[:, None, None, :]
        neg = torch.finfo(self.dtype).min
        to_add = lambda allowed: torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill(
            ~allowed, neg
        )
        return {
            "full_attention": to_add(causal[None, None] & keys),
            "sliding_attention": to_add(sliding[None, None] & keys),
        }

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states [B, S, H] after each selected decoder layer (both residual adds, no final norm)."""
        hidden = self.embed_tokens(upload(input_ids, self.embed_tokens.weight.device)).to(self.dtype)
        hidden = upload(hidden, self.rotary_emb.inv_freq.device)
        attention_mask = upload(attention_mask, hidden.device)
        if self.use_graphs and hidden.is_cuda:
            return self._replay(hidden, attention_mask)
        return self._layers(hidden, attention_mask)

    GRAPH_BUCKET = 128  # tokens: prompts are padded up to a multiple, so a handful of graphs serve every length

    def _replay(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """The layers as one CUDA graph per (batch, padded length): the encoder's ~1,500 small kernels launched
        at once instead of one Python call each. Padding at the end changes no valid token's states (causal)."""
        b, s, _ = hidden.shape
        length = -(-s // self.GRAPH_BUCKET) * self.GRAPH_BUCKET

        def build(pool) -> tuple:
            static_hidden = hidden.new_zeros(b, length, hidden.shape[2])
            static_mask = attention_mask.new_zeros(b, length)
            static_hidden[:, :s], static_mask[:, :s] = hidden, attention_mask
            graph, outputs = capture(lambda: self._layers(static_hidden, static_mask), pool)
            return graph, static_hidden, static_mask, outputs

        entry = self._graphs.get((b, length), build)
        if entry is None:
            return self._layers(hidden, attention_mask)
        graph, static_hidden, static_mask, outputs = entry
        static_hidden.zero_()
        static_mask.zero_()
        static_hidden[:, :s].copy_(hidden)
        static_mask[:, :s].copy_(attention_mask)
        graph.replay()
        return [o[:, :s].clone() for o in outputs]

    def reset_graphs(self) -> None:
        """Drop captured graphs: they hold the weights' addresses, which a new memory plan may change."""
        self._graphs.reset()

    def _layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        masks = self._masks(attention_mask)
        position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None].expand(hidden.shape[0], -1)
        pos_emb = self.rotary_emb(hidden, position_ids)
        captured = {}
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, attention_mask=masks[self.config.layer_types[i]], position_embeddings=pos_emb)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
            if i in self.selected_layers:
                captured[i] = hidden
        return [captured[i] for i in self.selected_layers]

    def compile_dequantize(self) -> None:
        """Fuse the MXFP4 decode into one kernel per call (eager runs it as several passes over the weights)."""
        fused = torch.compile(mxfp4.dequantize, dynamic=False, fullgraph=True)
        for layer in self.layers:
            if isinstance(layer.mlp.experts, Mxfp4Experts):
                layer.mlp.experts.dequantize = fused

    def use_fused_experts(self, on: bool) -> None:
        """Triton kernel on the packed weights (default where available) or decode-then-matmul."""
        if on and not mxfp4.fused_kernel_available():
            raise RuntimeError("the fused expert kernel needs Triton and a CUDA GPU")
        for layer in self.layers:
            layer.mlp.experts.fused = on

    def set_decode_chunk(self, experts: int) -> None:
        """Decode at most ``experts`` experts' weights at once (memory planner's knob)."""
        for layer in self.layers:
            layer.mlp.experts.chunk = experts

    @staticmethod
    def _build_meta(config: GptOssConfig, selected_layers: tuple[int, ...], dtype: torch.dtype = torch.bfloat16, experts: str = "mxfp4"):
        with torch.device("meta"):
            return LensTextEncoder(config, selected_layers, dtype, experts)

    @classmethod
    def from_comfy_file(
        cls, path: Path, raw_config: dict, selected_layers: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
    ) -> LensTextEncoder:
        """Load ComfyUI's ``gpt_oss_20b_nvfp4`` file: its names are this module's (no ``model.`` prefix), its
        experts NVFP4 and kept packed (``Nvfp4Experts``)."""
        from lensrun.single_file import read_text_encoder

        config = gpt_oss_config(raw_config)
        model = cls._build_meta(config, selected_layers, dtype, experts="nvfp4")
        expected = model.state_dict()
        tensors = read_text_encoder(Path(path), expected, device)
        return model._assign(tensors, expected, dtype, config, device)

    def _assign(self, tensors: dict, expected: dict, dtype: torch.dtype, config: GptOssConfig, device) -> LensTextEncoder:
        """Load ``tensors`` (module names) in place of the meta weights: packed codes and scales as they are,
        norms in fp32, the rest in ``dtype``."""
        state = {}
        for key, ref in expected.items():
            t = tensors[key]
            if ref.dtype in (torch.uint8, torch.float8_e4m3fn) or key.endswith("weight_scale_2"):
                state[key] = t.to(ref.dtype)
            else:
                state[key] = t.to(torch.float32 if key.endswith("layernorm.weight") else dtype)
        self.load_state_dict(state, assign=True, strict=True)
        self.rotary_emb = GptOssRotaryEmbedding(config).to(device)  # its tables are not in the checkpoint
        return self.eval()

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        selected_layers: tuple[int, ...],
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> LensTextEncoder:
        """Load from a ``text_encoder/`` folder (config.json + safetensors shards), experts kept packed.
        ``tensors``: the folder's tensors already read (``loading.TensorReader``); checked against the model."""
        from lensrun.loading import check_shapes, load_safetensors_folder

        folder = Path(folder)
        config = gpt_oss_config(json.loads((folder / "config.json").read_text()))
        model = cls._build_meta(config, selected_layers, dtype)
        expected = {"model." + k: v for k, v in model.state_dict().items()}
        if tensors is None:
            tensors = load_safetensors_folder(folder, expected, device=device)
        else:
            check_shapes(folder, expected)
        names = {k[len("model.") :]: k for k in expected}
        return model._assign({k: tensors[v] for k, v in names.items()}, model.state_dict(), dtype, config, device)
