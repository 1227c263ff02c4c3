"""Flow-matching schedule, classifier-free guidance with norm rescale, and the Euler update (LENS_SPEC §5)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from diffusers import FlowMatchEulerDiscreteScheduler

# Lens's empirical shift: a line in the image token count per step count, fitted at 10 and 200 steps.
_MU_A1, _MU_B1 = 8.73809524e-05, 1.89833333
_MU_A2, _MU_B2 = 0.00016927, 0.45666666


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """Time-shift mu for ``image_seq_len`` latent tokens and ``num_steps`` steps."""
    if image_seq_len > 4300:
        return _MU_A2 * image_seq_len + _MU_B2
    m200 = _MU_A2 * image_seq_len + _MU_B2
    m10 = _MU_A1 * image_seq_len + _MU_B1
    a = (m200 - m10) / 190.0
    b = m200 - 200.0 * a
    return a * num_steps + b


def lens_sigmas(
    scheduler: FlowMatchEulerDiscreteScheduler, image_seq_len: int, num_steps: int
) -> tuple[torch.Tensor, float]:
    """Shifted sigmas (float32, terminal 0 appended) and the mu used, via the checkpoint's scheduler config."""
    mu = empirical_mu(image_seq_len, num_steps)
    base = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    scheduler.set_timesteps(sigmas=base.tolist(), mu=mu, device="cpu")
    return scheduler.sigmas.to(torch.float32).clone(), mu


def guided_velocity(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """CFG, then rescale each token's combined velocity to the L2 norm of the conditional one."""
    comb = uncond + guidance_scale * (cond - uncond)
    cond_norm = torch.linalg.vector_norm(cond, dim=-1, keepdim=True)
    comb_norm = torch.linalg.vector_norm(comb, dim=-1, keepdim=True)
    scale = torch.where(comb_norm > 0, cond_norm / comb_norm.clamp_min(1e-12), torch.ones_like(comb_norm))
    return comb * scale


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """x ← x + (σ_next − σ)·v in fp32, back to the latents' dtype."""
    return (latents.float() + (sigma_next - sigma) * velocity.float()).to(latents.dtype)
