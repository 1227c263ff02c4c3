"""ComfyUI's single-file Lens weights (Comfy-Org/Lens): recognising a file from its keys, and reading it into the
names and values the diffusers-layout load produces (``../shared/COMFY_FORMATS.md``).

Done here: the DiT (bf16, and MXFP8 dequantized exactly: E8M0 block scale × e4m3), the FLUX.2 VAE under its
original BFL names, and the NVFP4 GPT-OSS text encoder with its embedded tokenizer (experts kept packed,
``lensrun.nvfp4``). Every check reads the safetensors header only, so a wrong file is refused before any weight
is read.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from lensrun.errors import LensrunError

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "text_encoders.gpt_oss.transformer.", "text_encoders.")
DIT_MARKERS = ("transformer_blocks.0.attn.norm_added_q.weight", "transformer_blocks.0.img_mlp.w1.weight")
VAE_MARKERS = ("bn.running_mean", "decoder.conv_in.weight")
TEXT_ENCODER_MARKERS = ("layers.0.self_attn.sinks", "layers.0.mlp.experts.gate_up_proj.weight", "tokenizer_json")
MXFP8_BLOCK = 32


def strip(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name (prefix stripped, ``__*__`` markers dropped) → (dtype, shape), from the header alone."""
    path = Path(path)
    if not path.is_file():
        raise LensrunError(f"{path}: no such file")
    if path.suffix != ".safetensors":
        raise LensrunError(f"{path}: lensrun reads .safetensors files only (pickle files can run code when opened)")
    try:
        with safe_open(path, framework="pt") as f:
            out = {}
            for key in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                if key.startswith("__"):
                    continue
                s = f.get_slice(key)
                out[strip(key)] = (s.get_dtype(), tuple(s.get_shape()))
            return out
    except LensrunError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise LensrunError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from None


def kind(path: Path) -> str:
    """'dit', 'vae' or 'text_encoder' from the file's keys (never from its name); anything else is refused."""
    keys = header(path)
    if all(k in keys for k in DIT_MARKERS):
        return "dit"
    if all(k in keys for k in TEXT_ENCODER_MARKERS):
        return "text_encoder"
    layouts = ("encoder.down.0.block.0.conv1.weight", "encoder.down_blocks.0.resnets.0.conv1.weight")
    if all(k in keys for k in VAE_MARKERS) and any(k in keys for k in layouts):
        return "vae"
    raise LensrunError(
        f"{path}: not a Lens DiT, GPT-OSS text encoder or FLUX.2 VAE file (a DiT has {DIT_MARKERS[0]}; an encoder "
        f"{', '.join(TEXT_ENCODER_MARKERS)}; a VAE bn.running_mean and decoder.conv_in.weight)"
    )


# ------------------------------------------------------------------------------------------------------ MXFP8
@functools.lru_cache(maxsize=8)
def _swizzle_index(rows: int, cols: int, padded_cols: int, device: str) -> torch.Tensor:
    r = torch.arange(rows, device=device).view(-1, 1)
    c = torch.arange(cols, device=device).view(1, -1)
    return (((r // 128) * (padded_cols // 4) + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4).reshape(-1)


def unswizzle(stored: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The logical [..., rows, cols] block-scale matrices from their swizzled storage [..., roundup(rows,128),
    roundup(cols,4)] (cuBLAS block layout): logical (r, c) sits at flat index
    ((r//128)·nC + c//4)·512 + (r%32)·16 + ((r%128)//32)·4 + c%4, nC = padded cols / 4."""
    *lead, _, padded_cols = stored.shape
    index = _swizzle_index(rows, cols, padded_cols, str(stored.device))
    return stored.reshape(*lead, -1)[..., index].view(*lead, rows, cols)


def dequantize_mxfp8(weight: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """W[r, c] = e4m3(W[r, c]) · 2^(E[r, c//32] − 127) in fp32 (E = 0 gives 0, as ComfyUI maps it), cropped to
    ``shape`` (rows and columns may be padded to multiples of 32 in the file)."""
    rows, cols = shape
    padded = weight.shape[1]
    exponents = unswizzle(scale.view(torch.uint8), weight.shape[0], padded // MXFP8_BLOCK).to(torch.int32)
    factors = torch.where(exponents == 0, 0.0, torch.exp2((exponents - 127).float()))
    w = weight.float().view(weight.shape[0], padded // MXFP8_BLOCK, MXFP8_BLOCK) * factors.unsqueeze(-1)
    return w.view(weight.shape[0], padded)[:rows, :cols]


def _quant_format(raw: torch.Tensor, key: str, path: Path) -> str:
    try:
        return json.loads(bytes(raw.view(torch.uint8).tolist()).decode("utf-8"))["format"]
    except (ValueError, KeyError, TypeError) as err:
        raise LensrunError(f"{path}: '{key}' is not a readable ComfyUI quantization record: {err}") from None


def check_dit(path: Path, expected: dict[str, torch.Tensor]) -> set[str]:
    """Every name and shape of the DiT file against the model's ``expected`` ones (header only, before any weight
    is read); returns the layers stored quantized (ComfyUI's ``comfy_quant`` records)."""
    path = Path(path)
    keys = header(path)
    if kind(path) != "dit":
        raise LensrunError(f"{path}: that file holds another component, not the DiT")
    quantized = {k[: -len(".comfy_quant")] for k in keys if k.endswith(".comfy_quant")}
    for name, ref in expected.items():
        if name not in keys:
            raise LensrunError(f"{path}: weight '{name}' is missing (is this a Lens DiT file?)")
        shape = keys[name][1]
        prefix = name.rsplit(".", 1)[0]
        if prefix in quantized and name.endswith(".weight"):
            if prefix + ".weight_scale" not in keys:
                raise LensrunError(f"{path}: '{prefix}.weight_scale' is missing for the quantized '{name}'")
            too_small = shape[0] < ref.shape[0] or shape[1] < ref.shape[1]
            if len(shape) != 2 or too_small or shape[1] % MXFP8_BLOCK:
                raise LensrunError(f"{path}: quantized weight '{name}' has shape {list(shape)}; the model needs {list(ref.shape)}")
        elif shape != tuple(ref.shape):
            raise LensrunError(f"{path}: weight '{name}' has shape {list(shape)} but the model expects {list(ref.shape)}")
    return quantized


def dit_tensors(
    path: Path, expected: dict[str, torch.Tensor], quantized: set[str], device: torch.device | str, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """The DiT's tensors one by one in ``expected``'s (module) order under their diffusers names, in ``dtype``:
    MXFP8 weights dequantized exactly one tensor at a time (e4m3 × 2^k is exact in bf16), so no more than one
    fp32 copy ever exists; a caller may quantize each block as it completes."""
    path = Path(path)
    with safe_open(path, framework="pt", device=str(device)) as f:
        names = {strip(k): k for k in f.keys()}  # noqa: SIM118 - a safetensors handle, not a dict
        for name, ref in expected.items():
            prefix = name.rsplit(".", 1)[0]
            tensor = f.get_tensor(names[name])
            if prefix in quantized and name.endswith(".weight"):
                fmt = _quant_format(f.get_tensor(names[prefix + ".comfy_quant"]), prefix + ".comfy_quant", path)
                if fmt != "mxfp8":
                    raise LensrunError(f"{path}: '{prefix}' is quantized as '{fmt}'; lensrun reads mxfp8 DiT weights")
                tensor = dequantize_mxfp8(tensor, f.get_tensor(names[prefix + ".weight_scale"]), tuple(ref.shape))
            yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor


# -------------------------------------------------------------------------------------------------------- VAE
def _vae_rules(up_blocks: int) -> list[tuple[re.Pattern, object]]:
    flip = lambda m, what: f"decoder.up_blocks.{up_blocks - 1 - int(m[1])}.{what}"
    rules = [
        (r"^encoder\.quant_conv\.", "quant_conv."),
        (r"^decoder\.post_quant_conv\.", "post_quant_conv."),
        (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
        (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
        (r"^encoder\.down\.(\d+)\.downsample\.conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv."),
        (r"^decoder\.up\.(\d+)\.block\.(\d+)\.", lambda m: flip(m, f"resnets.{m[2]}.")),
        (r"^decoder\.up\.(\d+)\.upsample\.conv\.", lambda m: flip(m, "upsamplers.0.conv.")),
        (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
        (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
        (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
        (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2."),
        (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
    ]
    return [(re.compile(pattern), repl) for pattern, repl in rules]


def vae_name(bfl: str, up_blocks: int) -> str:
    """The diffusers ``AutoencoderKLFlux2`` name of a FLUX.2 VAE tensor in BFL naming."""
    name = bfl
    for pattern, repl in _vae_rules(up_blocks):
        name = pattern.sub(repl, name)
    return name


def read_vae(path: Path, expected: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The VAE's tensors under diffusers names (BFL names mapped; 1×1 attention convs squeezed to linears)."""
    path = Path(path)
    keys = header(path)
    if kind(path) != "vae":
        raise LensrunError(f"{path}: that file holds another component, not the VAE")
    up_blocks = 1 + max(int(m[1]) for k in keys if (m := re.match(r"decoder\.(?:up|up_blocks)\.(\d+)\.", k)))
    mapping = {vae_name(k, up_blocks) if "encoder.down.0.block.0.conv1.weight" in keys else k: k for k in keys}
    for name, ref in expected.items():
        if name == "bn.num_batches_tracked":
            continue
        if name not in mapping:
            raise LensrunError(f"{path}: weight '{name}' (or its BFL name) is missing (is this a FLUX.2 VAE file?)")
        shape = keys[mapping[name]][1]
        if shape != tuple(ref.shape) and shape != (*ref.shape, 1, 1):
            raise LensrunError(f"{path}: weight '{mapping[name]}' has shape {list(shape)}; the model expects {list(ref.shape)}")
    out = {}
    with safe_open(path, framework="pt", device=str(device)) as f:
        names = {strip(k): k for k in f.keys()}  # noqa: SIM118 - a safetensors handle, not a dict
        for name, ref in expected.items():
            if name == "bn.num_batches_tracked" and name not in mapping:
                out[name] = torch.zeros((), dtype=torch.long, device=device)
                continue
            out[name] = f.get_tensor(names[mapping[name]]).reshape(ref.shape)
    return out


# ------------------------------------------------------------------------------------------------ text encoder
def read_text_encoder(path: Path, expected: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The encoder's tensors under its module names (the file has no ``model.`` prefix; NVFP4 experts as stored),
    names, shapes and dtypes checked first; ``lm_head``, the final norm and the tokenizer are not tensors read."""
    path = Path(path)
    check_text_encoder(path, expected)
    out = {}
    with safe_open(path, framework="pt", device=str(device)) as f:
        names = {strip(k): k for k in f.keys()}  # noqa: SIM118 - a safetensors handle, not a dict
        for name, ref in expected.items():
            t = f.get_tensor(names[name])
            if name.endswith(".weight_scale"):  # once, at load: decoding then reads plain [E, out, in/16] scales
                t = unswizzle(t.view(torch.uint8), ref.shape[1], ref.shape[2]).view(torch.float8_e4m3fn)
            out[name] = t
    return out


def check_text_encoder(path: Path, expected: dict[str, torch.Tensor]) -> None:
    """Names, shapes (block scales in their stored block layout) and dtypes of the encoder file, header only."""
    keys = header(path)
    if kind(path) != "text_encoder":
        raise LensrunError(f"{path}: that file holds another component, not the text encoder")
    for name, ref in expected.items():
        if name not in keys:
            raise LensrunError(f"{path}: weight '{name}' is missing (is this ComfyUI's gpt_oss_20b_nvfp4 file?)")
        if name.endswith(".weight_scale"):  # stored in the block layout: the module keeps the logical scales
            from lensrun.nvfp4 import scale_shape

            rows, cols = ref.shape[1], ref.shape[2] * 16
            ref = torch.empty(ref.shape[0], *scale_shape(rows, cols), dtype=ref.dtype, device="meta")
        if keys[name][1] != tuple(ref.shape):
            raise LensrunError(f"{path}: weight '{name}' has shape {list(keys[name][1])}; the model expects {list(ref.shape)}")
        packed = ref.dtype in (torch.uint8, torch.float8_e4m3fn)
        if packed and keys[name][0] not in ("U8", "F8_E4M3"):
            raise LensrunError(f"{path}: weight '{name}' is {keys[name][0]}; NVFP4 experts are U8 codes and F8_E4M3 scales")


def read_tokenizer(path: Path):
    """The o200k_harmony tokenizer stored in the encoder file (``tokenizer_json``: the tokenizer.json bytes)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from lensrun.prompting import PAD_TOKEN

    with safe_open(Path(path), framework="pt") as f:
        names = {strip(k): k for k in f.keys()}  # noqa: SIM118 - a safetensors handle, not a dict
        raw = bytes(f.get_tensor(names["tokenizer_json"]).view(torch.uint8).tolist())
    try:
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as err:  # noqa: BLE001 - tokenizers raises its own exception types
        raise LensrunError(f"{path}: 'tokenizer_json' is not a readable tokenizer: {err}") from None
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD_TOKEN, eos_token="<|return|>")


# ----------------------------------------------------------------------------------------- a ComfyUI models folder
COMFY_DIRS = {"transformer": "diffusion_models", "text_encoder": "text_encoders", "vae": "vae"}
KIND_OF_PART = {"transformer": "dit", "text_encoder": "text_encoder", "vae": "vae"}


def comfy_models_dir(path: Path) -> Path | None:
    """The ComfyUI models folder at ``path`` (or its ``models/``), or None when ``path`` is something else."""
    path = Path(path).expanduser()
    for folder in (path, path / "models"):  # vae/ alone says nothing: diffusers folders have one too
        comfy = any((folder / d).is_dir() for d in ("diffusion_models", "text_encoders"))
        if comfy and not (folder / "model_index.json").exists():
            return folder
    return None


def comfy_parts(folder: Path, variant: str | None, given: dict[str, str | None]) -> dict[str, Path]:
    """Each Lens file of a ComfyUI models folder, recognised by its keys; ``given`` files win. For the DiT the
    variant picks Lens or Turbo by name (default Lens) and bf16 is preferred to mxfp8 (exact, and Hopper/Ada
    dequantize mxfp8 anyway); any other ambiguity is an error that lists the candidates."""
    found: dict[str, Path] = {}
    for part, sub in COMFY_DIRS.items():
        if given.get(part):
            found[part] = Path(given[part])
            continue
        files = sorted((folder / sub).glob("*.safetensors")) if (folder / sub).is_dir() else []
        matches = []
        for f in files:
            try:
                if kind(f) == KIND_OF_PART[part]:
                    matches.append(f)
            except LensrunError:
                continue  # other models' files live here too
        if part == "transformer":
            turbo = variant == "turbo"
            matches = [f for f in matches if ("turbo" in f.name.lower()) == turbo] or matches
            matches = [f for f in matches if "mxfp8" not in f.name.lower()] or matches
        if not matches:
            what = {"transformer": "DiT", "text_encoder": "GPT-OSS text encoder", "vae": "FLUX.2 VAE"}[part]
            raise LensrunError(f"{folder / sub}: no Lens {what} file found (name one with --{part.replace('_', '-')} FILE)")
        if len(matches) > 1:
            names = ", ".join(f.name for f in matches)
            raise LensrunError(f"{folder / sub}: several candidates ({names}); choose one with --{part.replace('_', '-')} FILE")
        found[part] = matches[0]
    return found
