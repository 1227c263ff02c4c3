"""Random-weight Lens checkpoints in the real diffusers layout, tiny (tests, ``--model tiny-random``) or full size
(benchmarks: weights' values change neither memory nor time).

Weights are scaled like trained ones (std 1/√fan_in, norm weights 1) so activations and attention are realistic;
encoder experts are packed to MXFP4 exactly as GPT-OSS ships them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from lensrun import mxfp4
from lensrun.configs import (
    FULL_TEXT_ENCODER_CONFIG,
    FULL_TRANSFORMER_CONFIG,
    FULL_VAE_CONFIG,
    LENS_SCHEDULER_CONFIG,
    MODEL_INDEX,
    TINY_TEXT_ENCODER_CONFIG,
    TINY_TRANSFORMER_CONFIG,
    TINY_VAE_CONFIG,
    text_encoder_meta_state,
    transformer_meta_state,
    vae_meta_state,
)  # fmt: skip
from lensrun.prompting import ASSISTANT_THINKING, HARMONY_SPECIAL_TOKENS, PAD_TOKEN, SYSTEM_PROMPT

_TOKENIZER_CORPUS = [
    SYSTEM_PROMPT, ASSISTANT_THINKING,
    "You are ChatGPT, a large language model trained by OpenAI. Knowledge cutoff: 2024-06 Current date: 2026-05-23",
    "Reasoning: medium # Valid channels: analysis, commentary, final. Channel must be included for every message.",
    "system developer user assistant Instructions a photo of a red fox cat dog reading a book under a paper lantern "
    "in an autumn forest, mountain lake at sunrise, cinematic portrait, watercolor, studio light, city at night",
]  # fmt: skip


def tiny_tokenizer():
    """A small byte-level BPE with the Harmony control tokens; deterministic, built in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_TEXT_ENCODER_CONFIG["vocab_size"] - len(HARMONY_SPECIAL_TOKENS),
        special_tokens=list(HARMONY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TOKENIZER_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token="<|return|>")


def _init_tensor(key: str, shape: torch.Size, dtype: torch.dtype, gen: torch.Generator, device: str) -> torch.Tensor:
    """One tensor by its role: norms 1, biases small, matrices std 1/√fan_in, BN stats plausible."""
    leaf = key.rsplit(".", 1)[-1]
    if "num_batches_tracked" in key:
        return torch.zeros(shape, dtype=torch.long)
    if "running_var" in key:
        return (torch.rand(shape, generator=gen, device=device) + 0.5).to(dtype)
    if "running_mean" in key:
        return (0.1 * torch.randn(shape, generator=gen, device=device)).to(dtype)
    if leaf == "weight" and len(shape) == 1:
        return torch.ones(shape, dtype=dtype, device=device)
    if len(shape) == 1 or leaf == "sinks":
        return (0.02 * torch.randn(shape, generator=gen, device=device)).to(dtype)
    fan_in = math.prod(shape[1:])
    return (torch.randn(shape, generator=gen, device=device) / math.sqrt(fan_in)).to(dtype)


def random_state(
    meta: dict[str, torch.Tensor], seed: int, dtype: torch.dtype, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Random values for every tensor of a meta state dict; packed MXFP4 experts for ``*_blocks``/``*_scales``."""
    gen = torch.Generator(device).manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, ref in meta.items():
        if key.endswith("_scales"):
            continue
        if key.endswith("_blocks"):
            e, rows, groups, _ = ref.shape
            w = torch.randn((e, rows, groups * 32), generator=gen, device=device) / math.sqrt(groups * 32)
            blocks, scales = mxfp4.quantize(w)
            out[key] = blocks
            out[key[: -len("_blocks")] + "_scales"] = scales
            continue
        out[key] = _init_tensor(key, ref.shape, dtype if ref.dtype.is_floating_point else ref.dtype, gen, device)
    return out


def _save_sharded(tensors: dict[str, torch.Tensor], folder: Path, stem: str, max_shard_bytes: int) -> None:
    """Write safetensors shards + index like transformers/diffusers do (one file if it fits)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if len(shards) == 1:
        save_file({k: v.contiguous().cpu() for k, v in shards[0].items()}, folder / f"{stem}.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous().cpu() for k, v in shard.items()}, folder / name)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=1))


def write_checkpoint(
    root: str | Path,
    size: str = "tiny",
    seed: int = 0,
    device: str = "cpu",
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write a random Lens checkpoint (``size`` 'tiny' or 'full') in the diffusers layout under ``root``."""
    root = Path(root)
    tiny = size == "tiny"
    t_cfg = TINY_TRANSFORMER_CONFIG if tiny else FULL_TRANSFORMER_CONFIG
    te_cfg = TINY_TEXT_ENCODER_CONFIG if tiny else FULL_TEXT_ENCODER_CONFIG
    vae_cfg = TINY_VAE_CONFIG if tiny else FULL_VAE_CONFIG
    root.mkdir(parents=True, exist_ok=True)
    parts = [
        ("transformer", transformer_meta_state(t_cfg), torch.float32, "diffusion_pytorch_model",
         {"_class_name": "LensTransformer2DModel", **t_cfg}),
        ("text_encoder", text_encoder_meta_state(te_cfg), torch.bfloat16, "model", te_cfg),
        ("vae", vae_meta_state(vae_cfg), torch.float32, "diffusion_pytorch_model", vae_cfg),
    ]  # fmt: skip
    for offset, (name, meta, dtype, stem, cfg) in enumerate(parts):
        folder = root / name
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(cfg, indent=1))
        _save_sharded(random_state(meta, seed + offset, dtype, device), folder, stem, max_shard_bytes)
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(LENS_SCHEDULER_CONFIG, indent=1))
    # The o200k_harmony vocabulary cannot be shipped here; the small tokenizer's ids index the same embedding.
    tiny_tokenizer().save_pretrained(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=1))  # last: marks a complete folder
    return root


def ensure_checkpoint(root: str | Path, size: str = "full", seed: int = 0, device: str = "cpu") -> bool:
    """Write the random checkpoint unless a complete one is already there (benchmarks reuse it between runs);
    True when it was written now."""
    if (Path(root) / "model_index.json").exists():
        return False
    write_checkpoint(root, size=size, seed=seed, device=device)
    return True
