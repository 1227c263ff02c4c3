"""lensrun's GroupNorm for the VAE decoder (``decoding.group_norm``): torch's math, its own reductions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLFlux2

from lensrun import LensPipeline
from lensrun.decoding import group_norm


def _inputs(shape, dtype, offset: float, channels_last: bool = False):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(shape[1], generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(shape[1], generator=g, dtype=torch.float64).to(dtype)
    return x, weight, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64, 9, 7), (2, 64, 9, 7), (3, 32, 11), (1, 32, 4, 5, 6)])
@pytest.mark.parametrize("offset", [0.0, 300.0])  # a large mean: what a one-pass E[x²] − mean² would lose
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_is_as_close_to_exact_as_torchs(dtype, shape, offset, affine):
    x, weight, bias = _inputs(shape, dtype, offset)
    weight, bias = (weight, bias) if affine else (None, None)
    exact = F.group_norm(x.double(), 16, *(None if t is None else t.double() for t in (weight, bias)), 1e-6)
    ours = group_norm(x, 16, weight, bias, 1e-6)
    theirs = F.group_norm(x, 16, weight, bias, 1e-6)
    assert ours.dtype == dtype and ours.shape == x.shape
    ours_err, theirs_err = ((y.double() - exact).abs().max().item() for y in (ours, theirs))
    assert ours_err <= 2 * theirs_err + 1e-6, (ours_err, theirs_err)


def test_channels_last_keeps_its_layout_or_falls_back():
    x, weight, bias = _inputs((1, 64, 8, 8), torch.float32, 1.0, channels_last=True)
    out = group_norm(x, 32, weight, bias, 1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, F.group_norm(x, 32, weight, bias, 1e-6), atol=2e-5, rtol=1e-5)
    x2, _, _ = _inputs((2, 64, 8, 8), torch.float32, 1.0, channels_last=True)  # [1, 2·C, …] is no view of it
    torch.testing.assert_close(group_norm(x2, 32, weight, bias, 1e-6), F.group_norm(x2, 32, weight, bias, 1e-6))


def test_the_pipeline_hooks_its_decoder_and_keeps_torchs_cpu_image():
    """On a CPU the hook keeps torch's kernel: the image is bit-identical to the plain VAE's (multi-process
    tests compare PNGs exactly); on a GPU it runs ``group_norm`` (tests/test_cuda.py)."""
    pipe = LensPipeline.tiny_random()
    norms = [m for m in pipe.vae.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all("forward" in vars(m) for m in norms)
    plain = AutoencoderKLFlux2.from_config(pipe.vae.config).eval()
    plain.load_state_dict(pipe.vae.state_dict())
    z = torch.randn(1, pipe.vae.config.latent_channels, 6, 10, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert torch.equal(pipe.vae.decode(z).sample, plain.decode(z).sample)
