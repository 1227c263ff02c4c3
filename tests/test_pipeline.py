"""Pipeline behaviour on the tiny model: presets, CFG skipping, per-image reproducibility, noise, outputs."""

import numpy as np
import pytest
import torch

from lensrun import LensPipeline, LensrunError
from lensrun.request import infer_variant

SMALL = dict(height=32, width=48)


class CountingTransformer(torch.nn.Module):
    """Wraps the DiT to count forwards and record the text length each one saw."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.img_in = inner.img_in
        self.text_lengths = []

    @property
    def attention_backend(self) -> str:
        return self.inner.attention_backend

    def conditioning(self, timestep):
        return self.inner.conditioning(timestep)

    def forward(self, hidden_states, encoder_hidden_states, *args, **kwargs):
        self.text_lengths.append(encoder_hidden_states[0].shape[1])
        return self.inner(hidden_states, encoder_hidden_states, *args, **kwargs)

    def forward_branches(self, hidden_states, branches, *args, **kwargs):
        self.text_lengths.extend(b[0].shape[1] for b in branches)
        return self.inner.forward_branches(hidden_states, branches, *args, **kwargs)


def _counting(pipe, variant=None):
    counter = CountingTransformer(pipe.transformer)
    clone = LensPipeline(counter, pipe.vae, pipe.scheduler, pipe.text_encoder, pipe.tokenizer, variant=variant)
    return clone, counter


@pytest.mark.parametrize(
    "name, variant",
    [("microsoft/Lens", "lens"), ("microsoft/Lens-Turbo", "turbo"), ("microsoft/Lens-Base", "base"),
     ("YuCollection/Lens-Diffusers", "lens"), ("/models/lens_turbo", "turbo"), ("/data/Lens-Base/", "base"),
     ("/data/baseline-lens", "lens")],
)  # fmt: skip
def test_variant_inferred_from_name(name, variant):
    assert infer_variant(name) == variant


def test_turbo_preset_runs_one_forward_per_step(tiny_pipe):
    pipe, counter = _counting(tiny_pipe, variant="turbo")
    out = pipe("a fox", seed=1, output_type="latent", **SMALL)
    assert out.configs[0]["steps"] == 4 and out.configs[0]["cfg"] == 1.0
    assert len(counter.text_lengths) == 4


def test_lens_preset_uses_cfg_with_empty_negative_as_no_text(tiny_pipe):
    pipe, counter = _counting(tiny_pipe, variant="lens")
    out = pipe("a fox", seed=1, output_type="latent", **SMALL)
    assert out.configs[0]["steps"] == 20 and out.configs[0]["cfg"] == 5.0
    assert len(counter.text_lengths) == 40
    assert counter.text_lengths[1::2] == [0] * 20 and min(counter.text_lengths[0::2]) > 0


def test_explicit_steps_and_cfg_win_over_preset(tiny_pipe):
    pipe, counter = _counting(tiny_pipe, variant="base")
    out = pipe("a fox", seed=1, num_inference_steps=3, guidance_scale=1.0, output_type="latent", **SMALL)
    assert (out.configs[0]["steps"], out.configs[0]["cfg"]) == (3, 1.0)
    assert len(counter.text_lengths) == 3


def test_non_empty_negative_is_encoded(tiny_pipe):
    pipe, counter = _counting(tiny_pipe)
    a = pipe("a fox", negative_prompt="blurry", seed=1, num_inference_steps=2, output_type="latent", **SMALL)
    b = pipe("a fox", seed=1, num_inference_steps=2, output_type="latent", **SMALL)
    assert counter.text_lengths[1] > 0
    assert not torch.equal(a.images, b.images)


def test_each_image_of_a_batch_replays_alone(tiny_pipe):
    kw = dict(num_inference_steps=3, output_type="latent", **SMALL)
    batch = tiny_pipe(["a fox", "a lighthouse"], num_images_per_prompt=2, seed=10, **kw)
    assert [c["seed"] for c in batch.configs] == [10, 11, 12, 13]
    assert [c["prompt"] for c in batch.configs] == ["a fox", "a fox", "a lighthouse", "a lighthouse"]
    alone = tiny_pipe("a lighthouse", seed=13, **kw)
    assert torch.equal(batch.images[3], alone.images[0])
    assert not torch.equal(batch.images[2], batch.images[3])


def test_cpu_noise_is_fixed_by_seed(tiny_pipe):
    a = tiny_pipe.initial_noise(123, (2, 3))
    b = tiny_pipe.initial_noise(123, (2, 3))
    expected = torch.randn((1, 6, 128), generator=torch.Generator("cpu").manual_seed(123))
    assert torch.equal(a, b) and torch.equal(a, expected)


def test_random_seed_is_drawn_and_recorded(tiny_pipe):
    out = tiny_pipe("a fox", seed=-1, num_inference_steps=1, output_type="latent", **SMALL)
    seed = out.configs[0]["seed"]
    assert isinstance(seed, int) and seed >= 0
    again = tiny_pipe("a fox", seed=seed, num_inference_steps=1, output_type="latent", **SMALL)
    assert torch.equal(out.images, again.images)


def test_output_types(tiny_pipe):
    kw = dict(seed=3, num_inference_steps=1, **SMALL)
    pil = tiny_pipe("x", output_type="pil", **kw).images[0]
    arr = tiny_pipe("x", output_type="np", **kw).images
    pt = tiny_pipe("x", output_type="pt", **kw).images
    assert pil.size == (48, 32) and arr.shape == (1, 32, 48, 3) and pt.shape == (1, 3, 32, 48)
    assert np.allclose(arr[0], pt[0].permute(1, 2, 0).numpy())
    # PIL truncates (x+1)·127.5 like the reference, so it is within one level of the float image.
    assert np.abs(np.asarray(pil).astype(np.float32) / 255.0 - arr[0]).max() <= 1 / 255 + 1e-6
    with pytest.raises(LensrunError, match="output_type must be one of"):
        tiny_pipe("x", output_type="jpeg", **kw)


def test_device_noise_option_recorded(tiny_pipe):
    out = tiny_pipe("x", seed=3, num_inference_steps=1, noise="device", output_type="latent", **SMALL)
    assert out.configs[0]["noise"] == "device"


def test_masked_batch_equals_mask_free_rows(tiny_pipe):
    """The DiT's masked path on a padded batch equals the per-row mask-free path (LENS_SPEC §11)."""
    feats, mask = tiny_pipe.encode_prompt(["a fox", "a lighthouse on a cliff at dusk"])
    assert not mask.all()
    x = torch.randn(2, 6, 128)
    t = torch.tensor([0.7, 0.7])
    with torch.no_grad():
        masked = tiny_pipe.transformer(x, feats, mask, t, [(1, 2, 3)]).sample
        for b in range(2):
            n = int(mask[b].sum())
            row = tiny_pipe.transformer(x[b : b + 1], [f[b : b + 1, :n] for f in feats], None, t[:1], [(1, 2, 3)])
            torch.testing.assert_close(row.sample, masked[b : b + 1], atol=1e-5, rtol=1e-5)
