"""Prompt → token ids for the GPT-OSS encoder: the Harmony chat template with a pinned date (LENS_SPEC §3, §11).

The template is rendered here rather than through the tokenizer's Jinja file, because the Hub template inserts
today's date and the same prompt must encode identically on any day. The prompt is tokenized on its own with
special-token matching off, so control tokens typed inside a prompt (``<|end|>`` …) stay plain text.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

SYSTEM_PROMPT = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of "
    "the objects and background."
)
ASSISTANT_THINKING = "Need to generate one image according to the description."
DEFAULT_TEMPLATE_DATE = "2026-05-23"
MAX_SEQUENCE_LENGTH = 512
PAD_TOKEN = "<|endoftext|>"
HARMONY_SPECIAL_TOKENS = (
    "<|startoftext|>",
    "<|endoftext|>",
    "<|return|>",
    "<|constrain|>",
    "<|channel|>",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|call|>",
)


def template_parts(date: str = DEFAULT_TEMPLATE_DATE) -> tuple[str, str]:
    """(prefix up to and including ``<|start|>user<|message|>``, assistant scaffold after the prompt)."""
    prefix = (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        f"Knowledge cutoff: 2024-06\nCurrent date: {date}\n\nReasoning: medium\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
        f"<|start|>developer<|message|># Instructions\n\n{SYSTEM_PROMPT}\n\n<|end|>"
        "<|start|>user<|message|>"
    )
    suffix = (
        f"<|end|><|start|>assistant<|channel|>analysis<|message|>{ASSISTANT_THINKING}<|end|>"
        "<|start|>assistant<|channel|>final<|message|>"
    )
    return prefix, suffix


def render_prompt(prompt: str, date: str = DEFAULT_TEMPLATE_DATE) -> str:
    """The full Harmony string the encoder reads for ``prompt``."""
    prefix, suffix = template_parts(date)
    return prefix + prompt + suffix


@dataclass
class TokenizedPrompts:
    """Right-padded ids and mask for the whole rendering; ``offset`` = prefix tokens dropped from the features."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    offset: int
    dropped: list[int]


def _ids(tokenizer, text: str, literal: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=literal)["input_ids"]


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else ``<|endoftext|>`` (as the reference pipeline sets it)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.convert_tokens_to_ids(PAD_TOKEN)


def tokenize_prompts(
    tokenizer,
    prompts: list[str],
    date: str = DEFAULT_TEMPLATE_DATE,
    max_length: int = MAX_SEQUENCE_LENGTH,
) -> TokenizedPrompts:
    """Tokenize rendered prompts (cut at ``max_length`` tokens, with a warning saying how much was cut)."""
    prefix, suffix = template_parts(date)
    prefix_ids, suffix_ids = _ids(tokenizer, prefix), _ids(tokenizer, suffix)
    rows, dropped = [], []
    for i, prompt in enumerate(prompts):
        full = prefix_ids + _ids(tokenizer, prompt, literal=True) + suffix_ids
        cut = max(0, len(full) - max_length)
        if cut:
            warnings.warn(
                f"prompt {i + 1} is {len(full)} tokens with the template; the encoder reads at most {max_length}, "
                f"so the last {cut} tokens were cut (the template uses {len(prefix_ids) + len(suffix_ids)})",
                stacklevel=2,
            )
        rows.append(full[:max_length])
        dropped.append(cut)
    length = max(len(r) for r in rows)
    pad = pad_token_id(tokenizer)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return TokenizedPrompts(ids, mask, len(prefix_ids), dropped)
