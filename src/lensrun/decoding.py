"""Latent tokens → pixels through the FLUX.2 VAE (LENS_SPEC §6)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKLFlux2
from PIL import Image


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
