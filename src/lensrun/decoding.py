"""Latent tokens → pixels through the FLUX.2 VAE (LENS_SPEC §6)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers import AutoencoderKLFlux2
from PIL import Image


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """``F.group_norm`` for the VAE decoder, same math: statistics from two reductions over the whole tensor
    (the mean accumulated in fp32, the variance by torch's Welford reduction, no fp32 copy of x), the
    normalization as an inference batch norm over [1, B·C, H, W]. Why: torch's GroupNorm statistics kernel gives
    each (sample, group) one thread block, 32 blocks for the decoder's 32 groups on a GPU of 132 SMs: 44.6 of
    the 85 ms of an eager 1024² decode on an H200 (benchmarks/decode.py, 2026-11-29)."""
    b, c = x.shape[:2]
    if x.dim() < 3 or not (b == 1 or x.is_contiguous()):  # [1, B·C, …] must be a view of x
        return F.group_norm(x, groups, weight, bias, eps)
    per_group = x.unflatten(1, (groups, c // groups))
    dims = tuple(range(2, per_group.dim()))
    mean = per_group.mean(dims, dtype=torch.float32)
    var = per_group.var(dims, correction=0).float()  # half inputs: rounded once to their dtype (≤ 2⁻⁹ relative)

    def per_channel(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(c // groups, dim=1).flatten()

    def repeated(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.float().repeat(b)

    flat = x.reshape(1, b * c, *x.shape[2:])
    out = F.batch_norm(flat, per_channel(mean), per_channel(var), repeated(weight), repeated(bias), False, 0.0, eps)
    return out.view_as(x)


def use_fast_group_norm(module: torch.nn.Module) -> None:
    """Route every ``nn.GroupNorm`` under ``module`` through :func:`group_norm` on a GPU (a hook from outside the
    diffusers model: its code and checkpoint names stay as they are). On a CPU torch's kernel stays: it is not
    slow there, and its result does not depend on the thread count (a parallel reduction's does), which keeps
    images bit-identical between processes that run with different thread counts."""
    for m in module.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.forward = lambda x, m=m: (group_norm if x.is_cuda else F.group_norm)(x, m.num_groups, m.weight,
                                                                                    m.bias, m.eps)


def denormalize_tokens(vae: AutoencoderKLFlux2, latents: torch.Tensor) -> torch.Tensor:
    """Undo the VAE's BatchNorm in token space: each 128-channel token × std + mean.

    Token channel c·4 + p1·2 + p2 is exactly the patchified channel the BatchNorm statistics index.
    """
    mean = vae.bn.running_mean.to(latents.device, torch.float32)
    std = torch.sqrt(vae.bn.running_var.to(latents.device, torch.float32) + vae.config.batch_norm_eps)
    return latents.float() * std + mean


def unpack_tokens(latents: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, H·W, 128] tokens → [B, 32, 2H, 2W] VAE latents (2×2 sub-pixels)."""
    b, _, ch = latents.shape
    h, w = grid
    x = latents.reshape(b, h, w, ch // 4, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, ch // 4, 2 * h, 2 * w)


@torch.inference_mode()
def decode_tokens(vae: AutoencoderKLFlux2, latents: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Decode packed tokens to images in [-1, 1] (unclamped), [B, 3, 16H, 16W] float32."""
    z = unpack_tokens(denormalize_tokens(vae, latents), grid).to(vae.dtype)
    return vae.decode(z, return_dict=False)[0].float()


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images → [B, H, W, 3] uint8 where they are, truncating like the reference ((x+1)·127.5 then
    uint8): a quarter of the float32 bytes to copy off the GPU."""
    return ((images.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1)


def pixels_to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[B, H, W, 3] uint8 CPU pixels → PIL images."""
    return [Image.fromarray(np.ascontiguousarray(a)) for a in pixels.numpy()]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] images → 8-bit PIL."""
    return pixels_to_pil(to_pixels(images).cpu())
