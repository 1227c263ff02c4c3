"""``lensrun convert MODEL --out DIR``: between a diffusers-layout Lens folder and ComfyUI's single files.

A diffusers folder in (``to_comfy``) writes ``DIR/diffusion_models/lens[_turbo|_base]_{bf16|mxfp8}.safetensors``, ``DIR/vae/flux2-vae.safetensors``
(original BFL names, 1×1 attention convolutions) and ``DIR/text_encoders/gpt_oss_20b_nvfp4.safetensors``
(OpenAI's MXFP4 experts decoded and re-quantized to NVFP4 as ComfyUI's file is: per-expert fp32 scale
amax/(6·448), e4m3 scale per 16 inputs in the cuBLAS block layout, codes high nibble first; the tokenizer inside),
in the layouts of ``../shared/COMFY_FORMATS.md`` — so ComfyUI and lensrun can share one copy (``--model DIR``).
A ComfyUI models folder in (``to_diffusers``) writes the diffusers layout back: the DiT in bf16 (MXFP8 decoded
exactly), the VAE under diffusers names, the encoder's NVFP4 experts decoded and re-quantized to MXFP4 (the
folder format GPT-OSS ships; lossy, as every re-quantization), the tokenizer from the file, the published
scheduler and configs. Each file or folder is written under a temporary name and renamed; what is already
there and complete is kept, so an interrupted conversion resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lensrun import single_file
from lensrun.errors import LensrunError
from lensrun.request import infer_variant

DIT_PREFIX = "model.diffusion_model."
FORMATS = ("bf16", "mxfp8")


PARTS = ("transformer", "text_encoder", "vae")


def convert(model: str, out: str | Path, dit: str = "bf16", device: str = "cpu", notify=None) -> list[Path]:
    """The other layout of ``model``: a ComfyUI models folder becomes a diffusers folder, anything else
    (a diffusers folder, a Hub repo id) ComfyUI's files. Returns what was written."""
    comfy = single_file.comfy_models_dir(Path(model))
    if comfy is not None:
        files = single_file.comfy_parts(comfy, None, dict.fromkeys(PARTS))
        return [to_diffusers(files, out, device=device, notify=notify)]
    return list(to_comfy(model, out, dit, device, notify).values())


def to_comfy(model: str, out: str | Path, dit: str = "bf16", device: str = "cpu", notify=None) -> dict[str, Path]:
    """Convert ``model`` (a diffusers folder or Hub repo id) into ComfyUI files under ``out``; returns them."""
    from lensrun.pipeline import resolve_sources

    if dit not in FORMATS:
        raise LensrunError(f"--dit-format '{dit}' is not one of {', '.join(FORMATS)}")
    say = notify or (lambda message: None)
    root, files = resolve_sources(model, None, {})
    if root is None or files:
        raise LensrunError(f"{model}: convert reads a diffusers-layout folder (model_index.json, transformer/, …)")
    stem = {"lens": "lens", "turbo": "lens_turbo", "base": "lens_base"}[infer_variant(str(model))]
    out = Path(out)
    targets = {
        "transformer": (out / "diffusion_models" / f"{stem}_{dit}.safetensors", lambda: _dit(root, device, dit)),
        "vae": (out / "vae" / "flux2-vae.safetensors", lambda: _vae(root)),
        "text_encoder": (out / "text_encoders" / "gpt_oss_20b_nvfp4.safetensors", lambda: _text_encoder(root, device)),
    }
    for part, (path, tensors) in targets.items():
        if _complete(path, part):
            say(f"{path}: already converted")
            continue
        say(f"writing {path} …")
        _save_atomic(tensors(), path)
    return {part: path for part, (path, _) in targets.items()}


def _complete(path: Path, part: str) -> bool:
    try:
        return path.is_file() and single_file.kind(path) == single_file.KIND_OF_PART[part]
    except LensrunError:  # truncated or foreign: written again
        return False


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Through a partial file, on disk (fsync) before the rename: a crash leaves the old file or none. (Files of
    gigabytes: ``save_file`` streams them, where ``metadata.write_atomic`` would need them as bytes first.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, partial)
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


@contextlib.contextmanager
def _tensors(folder: Path, device: str) -> Iterator[dict[str, Callable[[], torch.Tensor]]]:
    """Every tensor name of a folder's safetensors shards → a loader that reads it when called (the shards stay
    open meanwhile), so a conversion holds its inputs one tensor at a time."""
    with contextlib.ExitStack() as stack:
        loaders = {}
        for file in sorted(folder.glob("*.safetensors")):
            f = stack.enter_context(safe_open(file, framework="pt", device=device))
            for key in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                loaders[key] = functools.partial(f.get_tensor, key)
        yield loaders


def _record(fmt: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def _dit(root: Path, device: str, fmt: str) -> dict[str, torch.Tensor]:
    """Bare diffusers names under ``model.diffusion_model.``; MXFP8: every block linear but the modulation."""
    from lensrun.acceleration import quantizable_name

    out = {}
    with _tensors(root / "transformer", device) as tensors:
        for key, load in tensors.items():
            t, layer = load(), key.rsplit(".", 1)[0]
            if fmt == "mxfp8" and key.endswith(".weight") and t.dim() == 2 and quantizable_name(layer):
                out[DIT_PREFIX + key], out[DIT_PREFIX + layer + ".weight_scale"] = quantize_mxfp8(t)
                out[DIT_PREFIX + layer + ".comfy_quant"] = _record("mxfp8")
            else:
                out[DIT_PREFIX + key] = t.to(torch.bfloat16)
    return out


def quantize_mxfp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's MXFP8 of a [R, C] weight: e4m3 values padded to multiples of 32, and per 32 inputs the E8M0
    exponent clamp(ceil(log2(amax/448)) + 127, 0, 254), swizzled."""
    rows, cols = w.shape
    pr, pc = -(-rows // 32) * 32, -(-cols // 32) * 32
    padded = torch.zeros(pr, pc, device=w.device)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(pr, pc // 32, 32)
    exponents = (torch.ceil(torch.log2(blocks.abs().amax(-1).clamp_min(2.0**-126) / 448.0)) + 127).clamp(0, 254)
    values = (blocks / torch.exp2(exponents - 127).unsqueeze(-1)).view(pr, pc).to(torch.float8_e4m3fn)
    return values, swizzle(exponents.to(torch.uint8))


def swizzle(logical: torch.Tensor) -> torch.Tensor:
    """[R, C] block scales padded to [roundup(R, 128), roundup(C, 4)] in the cuBLAS block layout (the inverse of
    ``single_file.unswizzle``)."""
    rows, cols = logical.shape
    padded = torch.zeros(-(-rows // 128) * 128, -(-cols // 4) * 4, dtype=logical.dtype, device=logical.device)
    padded[:rows, :cols] = logical
    r, c = padded.shape
    blocks = padded.view(r // 128, 128, c // 4, 4).permute(0, 2, 1, 3)
    return blocks.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(-1, 32, 16).flatten().view(r, c)


def _vae(root: Path) -> dict[str, torch.Tensor]:
    with _tensors(root / "vae", "cpu") as loaders:
        tensors = {key: load() for key, load in loaders.items() if key != "bn.num_batches_tracked"}
    up = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("decoder.up_blocks."))
    out = {}
    for key, t in tensors.items():
        if ".attentions.0.to_" in key and key.endswith("weight"):
            t = t[:, :, None, None]  # BFL's attention projections are 1×1 convolutions
        out[bfl_name(key, up)] = t
    return out


def bfl_name(name: str, up_blocks: int) -> str:
    """The original FLUX.2 (BFL) name of a diffusers ``AutoencoderKLFlux2`` tensor (``single_file.vae_name``'s
    inverse; decoder up blocks are numbered the other way round)."""
    rules = [
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"^quant_conv\.", "encoder.quant_conv."), (r"^post_quant_conv\.", "decoder.post_quant_conv."),
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
    ]  # fmt: skip
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0\.conv)\.(.*)$", name)
    if m:
        k = up_blocks - 1 - int(m[1])
        name = f"decoder.up.{k}.block.{m[3]}.{m[4]}" if m[3] is not None else f"decoder.up.{k}.upsample.conv.{m[4]}"
    return name


def _text_encoder(root: Path, device: str) -> dict[str, torch.Tensor]:
    """No ``model.`` prefix, no lm_head; experts as NVFP4 banks (codes, swizzled e4m3 scales, fp32 per-expert
    scales, a comfy_quant record); the tokenizer.json bytes as ``tokenizer_json``."""
    from lensrun import mxfp4, nvfp4

    out: dict[str, torch.Tensor] = {}
    with _tensors(root / "text_encoder", device) as loaders:
        for key, load in loaders.items():
            if key == "lm_head.weight" or key.endswith("_scales"):
                continue
            name = key.removeprefix("model.")
            m = re.match(r"(layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)_(blocks|bias)$", name)
            if m is None:
                out[name] = load().to(torch.bfloat16).cpu()
            elif m[3] == "bias":
                out[f"{m[1]}.{m[2]}.bias"] = load().to(torch.bfloat16).cpu()
            else:
                weight = mxfp4.dequantize(load(), loaders[key.replace("_blocks", "_scales")](), torch.float32)
                codes, scales, scale_2 = nvfp4.quantize(weight)
                bank = f"{m[1]}.{m[2]}"
                out[bank + ".weight"], out[bank + ".weight_scale_2"] = codes.cpu(), scale_2.cpu()
                stored = torch.stack([swizzle(s.view(torch.uint8)) for s in scales]).view(torch.float8_e4m3fn)
                out[bank + ".weight_scale"], out[bank + ".comfy_quant"] = stored.cpu(), _record("nvfp4")
    out["tokenizer_json"] = torch.tensor(list((root / "tokenizer" / "tokenizer.json").read_bytes()), dtype=torch.uint8)
    return out


def to_diffusers(
    files: dict[str, Path], out: str | Path, configs_from: Path | None = None, device: str = "cpu", notify=None
) -> Path:
    """ComfyUI's three files (``files``: transformer, text_encoder, vae) as a diffusers-layout folder ``out``;
    configs from ``configs_from`` (a diffusers folder) or the published Lens ones. ``model_index.json`` is written
    last: it marks a complete folder."""
    from lensrun import configs
    from lensrun.configs import LENS_SCHEDULER_CONFIG, MODEL_INDEX
    from lensrun.loading import component_config

    say = notify or (lambda message: None)
    t_cfg = component_config(configs_from, "transformer", configs.FULL_TRANSFORMER_CONFIG)
    v_cfg = component_config(configs_from, "vae", configs.FULL_VAE_CONFIG)
    te_cfg = component_config(configs_from, "text_encoder", configs.FULL_TEXT_ENCODER_CONFIG)
    parts = {
        "transformer": lambda d: _dit_folder(files["transformer"], t_cfg, d, device),
        "vae": lambda d: _vae_folder(files["vae"], v_cfg, d),
        "text_encoder": lambda d: _encoder_folder(files["text_encoder"], te_cfg, d, device),
        "tokenizer": lambda d: single_file.read_tokenizer(files["text_encoder"]).save_pretrained(d),
        "scheduler": lambda d: (d / "scheduler_config.json").write_text(json.dumps(LENS_SCHEDULER_CONFIG, indent=1)),
    }
    out = Path(out)
    for name, write in parts.items():
        target = out / name
        if target.is_dir():
            say(f"{target}: already converted")
            continue
        say(f"writing {target} …")
        partial = out / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        write(partial)
        os.replace(partial, target)
    from lensrun.metadata import write_atomic

    write_atomic(out / "model_index.json", lambda f: f.write(json.dumps(MODEL_INDEX, indent=1).encode()))
    return out


def _dit_folder(path: Path, cfg: dict, folder: Path, device: str) -> None:
    from lensrun.configs import transformer_meta_state

    meta = transformer_meta_state({k: v for k, v in cfg.items() if not k.startswith("_")})
    quantized = single_file.check_dit(path, meta)
    tensors = dict(single_file.dit_tensors(path, meta, quantized, device, torch.bfloat16))
    _write_part(folder, "diffusion_pytorch_model", tensors, {"_class_name": "LensTransformer2DModel", **cfg})


def _vae_folder(path: Path, cfg: dict, folder: Path) -> None:
    from lensrun.configs import vae_meta_state

    _write_part(folder, "diffusion_pytorch_model", single_file.read_vae(path, vae_meta_state(cfg)), {"_class_name": "AutoencoderKLFlux2", **cfg})


def _encoder_folder(path: Path, cfg: dict, folder: Path, device: str) -> None:
    """GPT-OSS's own names (``model.`` prefix) with MXFP4 experts: each NVFP4 bank decoded, then re-quantized."""
    from lensrun import mxfp4, nvfp4
    from lensrun.models.text_encoder import LensTextEncoder, gpt_oss_config

    config = gpt_oss_config(cfg)
    expected = LensTextEncoder._build_meta(config, (config.num_hidden_layers - 1,), experts="nvfp4").state_dict()
    tensors = single_file.read_text_encoder(path, expected, device)
    out = {}
    for key, t in tensors.items():
        m = re.match(r"(layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)\.(weight|weight_scale|weight_scale_2|bias)$", key)
        if m is None:
            out["model." + key] = t.to(torch.bfloat16)
        elif m[3] == "bias":
            out[f"model.{m[1]}.{m[2]}_bias"] = t.to(torch.bfloat16)
        elif m[3] == "weight":
            bank = f"{m[1]}.{m[2]}"
            weight = nvfp4.dequantize(t, tensors[bank + ".weight_scale"], tensors[bank + ".weight_scale_2"], torch.float32)
            out[f"model.{bank}_blocks"], out[f"model.{bank}_scales"] = mxfp4.quantize(weight)
    _write_part(folder, "model", out, cfg)


def _write_part(folder: Path, stem: str, tensors: dict[str, torch.Tensor], config: dict) -> None:
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, folder / f"{stem}.safetensors")
    (folder / "config.json").write_text(json.dumps(config, indent=1))
