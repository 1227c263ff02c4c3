"""The one place where lensrun decides how a generation uses GPU memory.

For a VRAM budget and an image size it predicts the peak of every plan — placement × DiT precision × encoder
decode chunk × VAE tiling — from the components' real sizes (computed from the configs, no weights needed) and
an activation model measured on the GPU, then picks the fastest plan whose predicted peak fits with a margin.
The pipeline asks this module; nothing else in lensrun branches on memory.

Activation model (measured 2026-11-25, H200, full-size random weights, `benchmarks/calibrate_memory.py`,
raw JSON in docs/measurements/): DiT forward, batch 1, mask-free: 0.19 GiB at 4216 tokens, 0.38 GiB at 8348
(≈ 46 KiB/token); encoder: 4.0 GiB above its weights at any prompt length (one layer's 32 experts dequantized
at once, plus the decode's index temporaries ≈ 10× the layer's packed experts); VAE decode: 2.38 GiB at 1024²,
4.78 GiB at 1088×1936 (≈ 2.3 KiB/pixel), tiled: 2.38 GiB at any size. With lensrun's GroupNorm in the decoder
(``decoding.group_norm``; benchmarks/decode.py, 2026-11-29, H200): 1.74 GiB at 1024², 3.26 GiB at 1088×1936; the
planner takes the larger per-pixel rate (1024²'s). Tiled, the decoder runs 1024² tiles (the VAE's sample_size),
which is why the tiled cap measured before equalled the full 1024² decode (2.386 against 2.38 GiB); it is now that
decode's 1.74 GiB (derived so, not re-measured tiled).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from lensrun.acceleration import quantizable
from lensrun.errors import LensrunError
from lensrun.mxfp4 import fused_kernel_available
from lensrun.request import PLACEMENTS, PRECISIONS

GIB = 2**30
DIT_BYTES_PER_TOKEN = 0.384 * GIB / 8348
ENCODER_DECODE_FACTOR = 10.0  # extra bytes per packed-expert byte of one layer while it is decoded
ENCODER_FIXED = 0.05 * GIB  # attention scores, hidden states, captured features (≤ 512 tokens)
# With the Triton kernel on the packed experts (lensrun.mxfp4_moe) nothing is decoded: measured 0.20–0.32 GiB
# above the weights at 128–512 tokens, CUDA graph pool included (2026-11-26, H200, benchmarks/encoder.py).
ENCODER_FUSED_EXTRA = 0.30 * GIB
VAE_BYTES_PER_PIXEL = 1.737 * GIB / 1048576
VAE_TILED_CAP = 1.737 * GIB
SAFETY = 1.08  # allocator fragmentation and what the model above does not see
# Relative DiT speed per precision, measured with the compiled path on the H100 (bf16 1.0; fp8 dynamic 1.39×
# slower at 1024²); weight-only modes are dequantized per matmul and slower still (LENS_SPEC §12).
PRECISION_SLOWDOWN = {"bf16": 1.0, "fp8": 1.39, "fp8-weight": 1.36, "int8-weight": 1.5, "int4-weight": 1.8}
HOST_TO_DEVICE = 20e9  # bytes/s from pinned memory, conservative for PCIe 4 cards (55 GB/s measured on H100)
DIT_TFLOPS = 400e12  # achieved by the compiled bf16 path (docs/performance.md)
CHUNKS = (32, 8, 2)  # experts decoded at once in the encoder


@dataclass(frozen=True)
class ComponentSizes:
    """Bytes of each component's weights as they sit on the GPU."""

    dit: dict[str, int]  # per precision
    encoder_body: int  # everything but the embedding table
    encoder_embedding: int
    encoder_layer_experts: int  # packed experts of one layer
    encoder_experts: int  # number of experts per layer
    vae: int
    dit_blocks: int
    dit_width: int
    dit_outside_blocks: int  # bf16 bytes of everything but the blocks (embedders, norm_out, proj_out)
    encoder_layers: int

    @classmethod
    def from_configs(
        cls, transformer: dict, text_encoder: dict, vae: dict, dtype_bytes: int = 2, experts: str = "mxfp4"
    ) -> ComponentSizes:
        from lensrun import configs as rc
        from lensrun.models.transformer_lens import LensTransformer2DModel

        with torch.device("meta"):
            model = LensTransformer2DModel(**transformer)
        quantizable_bytes = sum(m.weight.numel() for n, m in model.named_modules() if quantizable(m, n))
        other = (sum(p.numel() for p in model.parameters()) - quantizable_bytes) * dtype_bytes
        outside = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("transformer_blocks.")) * dtype_bytes
        dit = {
            "bf16": other + quantizable_bytes * dtype_bytes,
            "fp8": other + quantizable_bytes,
            "fp8-weight": other + quantizable_bytes,
            "int8-weight": other + quantizable_bytes,
            "int4-weight": other + quantizable_bytes // 2 + quantizable_bytes // 64,
        }
        body = emb = layer_experts = 0
        for key, t in _encoder_meta(text_encoder, experts).items():
            if key.endswith(("lm_head.weight", "model.norm.weight")):
                continue
            size = t.numel() * t.element_size()
            if key.endswith("embed_tokens.weight"):
                emb += size
            else:
                body += size
            if "layers.0.mlp.experts." in key and t.dtype in (torch.uint8, torch.float8_e4m3fn):
                layer_experts += size
        vae_bytes = sum(t.numel() * dtype_bytes for k, t in rc.vae_meta_state(vae).items() if t.dtype.is_floating_point)
        return cls(
            dit=dit, encoder_body=body, encoder_embedding=emb, encoder_layer_experts=layer_experts,
            encoder_experts=text_encoder["num_local_experts"], vae=vae_bytes,
            dit_blocks=transformer["num_layers"], dit_width=transformer["inner_dim"], dit_outside_blocks=outside,
            encoder_layers=text_encoder["num_hidden_layers"],
        )  # fmt: skip

    @classmethod
    def lens(cls) -> ComponentSizes:
        """The published Lens shapes (all three variants share them)."""
        from lensrun import configs as rc

        return cls.from_configs(rc.FULL_TRANSFORMER_CONFIG, rc.FULL_TEXT_ENCODER_CONFIG, rc.FULL_VAE_CONFIG)


def _encoder_meta(config: dict, experts: str) -> dict[str, torch.Tensor]:
    """The encoder's tensors as they sit in memory (meta): the GPT-OSS checkpoint's for MXFP4 (bf16 rest), the
    NVFP4 module's for ComfyUI's file (u8 codes, e4m3 scales, fp32 per-expert scales)."""
    from lensrun import configs

    if experts == "mxfp4":
        state = configs.text_encoder_meta_state(config)
    else:
        from lensrun.models.text_encoder import LensTextEncoder, gpt_oss_config

        cfg = gpt_oss_config(config)
        state = LensTextEncoder._build_meta(cfg, (cfg.num_hidden_layers - 1,), torch.bfloat16, experts).state_dict()
    wide = (torch.float32, torch.float16, torch.bfloat16)
    return {k: v.to(torch.bfloat16) if v.dtype in wide and not k.endswith("weight_scale_2") else v for k, v in state.items()}


@dataclass(frozen=True)
class Plan:
    """How one generation runs. ``encoder_chunk``: experts decoded at once; ``vae_tiling``: tiled decode."""

    placement: str = "resident"
    precision: str = "bf16"
    encoder_chunk: int = 32
    vae_tiling: bool = False
    embedding_on_cpu: bool = False
    stream_window: int = 2  # blocks / layers on the GPU at once under "stream"

    @property
    def name(self) -> str:
        parts = [self.placement, self.precision]
        if self.encoder_chunk < 32:
            parts.append(f"enc-chunk{self.encoder_chunk}")
        if self.vae_tiling:
            parts.append("vae-tiled")
        if self.embedding_on_cpu:
            parts.append("emb-cpu")
        return "+".join(parts)


@dataclass
class Prediction:
    plan: Plan
    peak_bytes: float
    phases: dict[str, float]
    seconds: float
    fits: bool = False
    chosen: bool = False
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict:
        return {
            "plan": self.plan.name, **asdict(self.plan), "predicted_peak_gib": self.peak_bytes / GIB,
            "phases_gib": {k: v / GIB for k, v in self.phases.items()}, "predicted_s": self.seconds,
            "fits": self.fits, "chosen": self.chosen,
        }  # fmt: skip


def _dit_flops(tokens: int, text: int, blocks: int, width: int) -> float:
    macs = width * 3 * width + width * width + 3 * width * int(width / 3 * 8)
    s = tokens + text
    return blocks * (2 * macs * s + 4 * s * s * width)


def fused_experts_default() -> bool:
    """Whether the GPU being planned for runs the encoder's experts through the Triton kernel: yes where Triton
    is installed, and when planning from a machine without CUDA (CUDA builds of torch ship Triton)."""
    return fused_kernel_available() or not torch.cuda.is_available()


def predict(
    plan: Plan,
    sizes: ComponentSizes,
    height: int,
    width: int,
    steps: int = 20,
    cfg: bool = True,
    text_tokens: int = 128,
    fused_experts: bool = True,
    graphs: bool = False,
) -> Prediction:
    """Peak VRAM per phase and an estimate of the time for one image under ``plan``. ``graphs``: the pipeline
    is compiled, so a resident plan replays the encoder and each step as CUDA graphs whose memory pools stay
    allocated through the later phases."""
    tokens = (height // 16) * (width // 16)
    pixels = height * width
    dit = sizes.dit[plan.precision]
    emb = 0 if plan.embedding_on_cpu else sizes.encoder_embedding
    encoder = sizes.encoder_body + emb
    if fused_experts:
        enc_extra = ENCODER_FIXED + ENCODER_FUSED_EXTRA
    else:
        enc_extra = ENCODER_FIXED + ENCODER_DECODE_FACTOR * sizes.encoder_layer_experts * plan.encoder_chunk / sizes.encoder_experts
    features = 4 * text_tokens * 2880 * 2 * 2
    dit_extra = DIT_BYTES_PER_TOKEN * (tokens + text_tokens) + features
    vae_extra = min(VAE_BYTES_PER_PIXEL * pixels, VAE_TILED_CAP) if plan.vae_tiling else VAE_BYTES_PER_PIXEL * pixels
    if plan.placement == "resident":
        weights = encoder + dit + sizes.vae
        phases = {"encode": weights + enc_extra, "denoise": weights + dit_extra, "decode": weights + vae_extra}
        if graphs:  # the encoder's pool, then the step's (one forward per CFG branch), kept after their phase
            step_pool = dit_extra * (2 if cfg else 1)
            phases["denoise"] += enc_extra + step_pool
            phases["decode"] += enc_extra + step_pool
    elif plan.placement == "stream":  # a window of blocks / layers on the GPU; small parts resident
        layer = sizes.encoder_body / sizes.encoder_layers
        block = (dit - sizes.dit_outside_blocks) / sizes.dit_blocks
        resident = emb + sizes.dit_outside_blocks + sizes.vae
        phases = {
            "encode": resident + plan.stream_window * layer + enc_extra,
            "denoise": resident + plan.stream_window * block + dit_extra,
            "decode": resident + vae_extra,
        }
    else:  # phased / offload: one component on the GPU at a time
        phases = {"encode": encoder + enc_extra, "denoise": dit + dit_extra, "decode": sizes.vae + vae_extra}
    forwards = steps * (2 if cfg else 1)
    compute = forwards * _dit_flops(tokens, text_tokens, sizes.dit_blocks, sizes.dit_width) / DIT_TFLOPS
    seconds = compute * PRECISION_SLOWDOWN[plan.precision]
    if plan.placement == "stream":  # each step copies all blocks once (CFG branches share them); copies overlap
        per_step = max(seconds / steps, (dit - sizes.dit_outside_blocks) / HOST_TO_DEVICE)
        seconds = steps * per_step + sizes.encoder_body / HOST_TO_DEVICE
    elif plan.placement != "resident":
        moved = encoder + dit + sizes.vae
        seconds += moved / HOST_TO_DEVICE * (1.0 if plan.placement == "phased" else 2.0)
    if plan.encoder_chunk < 32:
        seconds += 0.002 * 24 * (32 // plan.encoder_chunk)
    if plan.vae_tiling and VAE_BYTES_PER_PIXEL * pixels > VAE_TILED_CAP:
        seconds += 0.05
    return Prediction(plan, max(phases.values()), phases, seconds)


def candidate_plans(precisions: tuple[str, ...] = PRECISIONS, fused_experts: bool = True) -> list[Plan]:
    """Quantized DiTs are planned resident only: their torchao tensors are not moved between phases (so a
    quantized precision asked for alone never yields a bf16 plan elsewhere). Decode chunks matter only where
    experts are decoded (no Triton kernel)."""
    plans = []
    for placement in PLACEMENTS:
        for precision in precisions if placement == "resident" else [p for p in precisions if p == "bf16"]:
            for chunk in CHUNKS[:1] if fused_experts else CHUNKS:
                for tiling in (False, True):
                    for emb_cpu in (False, True):
                        plans.append(Plan(placement, precision, chunk, tiling, emb_cpu))
    return plans


def parse_budget(vram: str | float | int | None) -> float | None:
    """'24GB', '24GiB', '24', 24 → bytes (GB and GiB both read as GiB, as cards are sold)."""
    if vram is None:
        return None
    if isinstance(vram, (int, float)):
        value = float(vram)
    else:
        text = vram.strip().lower().removesuffix("ib").removesuffix("b").removesuffix("g")
        try:
            value = float(text)
        except ValueError:
            raise LensrunError(f"cannot read VRAM budget '{vram}': give GiB, e.g. 24 or 24GB") from None
    if not math.isfinite(value) or value <= 0:
        raise LensrunError(f"VRAM budget must be a positive number of GiB, got {vram}")
    return value * GIB


def available_budget(device: torch.device) -> float:
    """Free memory now plus what this process already holds (its weights can be re-placed)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, _ = torch.cuda.mem_get_info(index)
    return free + torch.cuda.memory_reserved(index)


def plan_table(
    budget: float,
    height: int,
    width: int,
    steps: int = 20,
    cfg: bool = True,
    sizes: ComponentSizes | None = None,
    precisions: tuple[str, ...] = PRECISIONS,
    allowed: dict | None = None,
    fused_experts: bool | None = None,
    graphs: bool = False,
) -> list[Prediction]:
    """Every candidate plan (restricted by ``allowed`` overrides) with its prediction; the chosen one marked.

    Choice: fits (peak × margin ≤ budget), then fastest, then bf16 over quantized, then the simplest.
    """
    sizes = sizes or ComponentSizes.lens()
    fused = fused_experts_default() if fused_experts is None else fused_experts
    allowed = {k: v for k, v in (allowed or {}).items() if v is not None}
    preds = []
    for plan in candidate_plans(precisions, fused):
        if any(getattr(plan, k) != v for k, v in allowed.items()):
            continue
        p = predict(plan, sizes, height, width, steps, cfg, fused_experts=fused, graphs=graphs)
        p.fits = p.peak_bytes * SAFETY <= budget
        preds.append(p)
    fitting = [p for p in preds if p.fits]
    if fitting:
        best = min(
            fitting,
            key=lambda p: (
                round(p.seconds, 2), p.plan.precision != "bf16", -p.plan.encoder_chunk, p.plan.vae_tiling,
                p.plan.embedding_on_cpu,
            ),
        )  # fmt: skip
        best.chosen = True
    return preds


def choose(budget: float, height: int, width: int, **kwargs) -> tuple[Plan, list[Prediction]]:
    """The chosen plan, or a LensrunError that says how much memory the leanest plan needs."""
    preds = plan_table(budget, height, width, **kwargs)
    chosen = [p for p in preds if p.chosen]
    if not chosen:
        if not preds:
            raise LensrunError("no plan matches the given --placement/--quantize overrides")
        lean = min(preds, key=lambda p: p.peak_bytes)
        raise LensrunError(
            f"no plan fits {budget / GIB:.1f} GiB for {width}x{height}: the leanest ({lean.plan.name}) needs "
            f"{lean.peak_bytes * SAFETY / GIB:.1f} GiB"
        )
    return chosen[0].plan, preds


def fallbacks(plan: Plan, preds: list[Prediction]) -> list[Plan]:
    """Plans to retry with after an OOM under ``plan``: the fitting ones with a lower predicted peak."""
    current = next(p for p in preds if p.plan == plan)
    leaner = [p for p in preds if p.peak_bytes < current.peak_bytes]
    return [p.plan for p in sorted(leaner, key=lambda p: (p.seconds, p.peak_bytes))]


def summary(preds: list[Prediction]) -> list[Prediction]:
    """One row per (placement, precision): the chosen plan, else the fastest fitting, else the leanest."""
    groups: dict[tuple[str, str], list[Prediction]] = {}
    for p in preds:
        groups.setdefault((p.plan.placement, p.plan.precision), []).append(p)
    rows = []
    for group in groups.values():
        fitting = [p for p in group if p.fits]
        chosen = [p for p in group if p.chosen]
        rows.append(chosen[0] if chosen else min(fitting, key=lambda p: p.seconds) if fitting else min(group, key=lambda p: p.peak_bytes))
    return rows


def format_table(preds: list[Prediction], budget: float) -> str:
    """The plan table `lensrun plan` prints."""
    rows = summary(preds)
    fastest = min(p.seconds for p in preds)
    lines = [
        f"budget {budget / GIB:.1f} GiB (plans must fit with a {int((SAFETY - 1) * 100)}% margin)",
        f"{'':2s}{'plan':50s} {'peak GiB':>8s} {'encode':>7s} {'denoise':>7s} {'decode':>7s} {'est. s':>7s} {'speed':>6s} fits",
    ]
    for p in sorted(rows, key=lambda p: (not p.fits, p.seconds)):
        ph = {k: v / GIB for k, v in p.phases.items()}
        lines.append(
            f"{'=>' if p.chosen else '  '}{p.plan.name:50s} {p.peak_bytes / GIB:8.2f} {ph['encode']:7.2f} {ph['denoise']:7.2f} "
            f"{ph['decode']:7.2f} {p.seconds:7.2f} {fastest / p.seconds:5.2f}x {'yes' if p.fits else 'no'}"
        )
    lines += [
        "",
        "Legend: => the plan `lensrun generate` would use. Placement: resident (all weights on the GPU),",
        "  phased (one component on the GPU per phase), offload (the same, unpinned), stream (DiT blocks and",
        "  encoder layers copied in as they run). vae-tiled: tiled VAE decode; emb-cpu: the encoder's embedding",
        "  table in CPU memory; enc-chunkN: N experts decoded at once. Peaks per phase in GiB. est. s: predicted",
        f"  seconds for one image at ~{DIT_TFLOPS / 1e12:.0f} TFLOP/s (compiled bf16 on an H100/H200; slower GPUs",
        "  take longer); speed: relative to the fastest plan listed.",
    ]
    return "\n".join(lines)
