"""The reference implementation's golden vectors (tests/golden/README.md) must be reproduced to ≤1e-4 in fp32."""

import json

import pytest
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file

from lensrun import LensPipeline, LensTransformer2DModel
from lensrun.decoding import decode_tokens
from lensrun.prompting import render_prompt, template_parts
from lensrun.sampling import lens_sigmas

TOL = 1e-4


@pytest.fixture(scope="module")
def transformer(golden):
    return LensTransformer2DModel.from_pretrained(golden / "transformer").eval()


@pytest.fixture(scope="module")
def vae(golden):
    return AutoencoderKLFlux2.from_pretrained(golden / "vae").eval()


def _grid(golden):
    _, h, w = json.loads((golden / "transformer_io.json").read_text())["img_shapes"][0]
    return h, w


@torch.no_grad()
def test_transformer_masked_path(golden, transformer):
    d = load_file(golden / "transformer_io.safetensors")
    feats = [d["features_0"], d["features_1"]]
    out = transformer(d["latents"], feats, d["mask"].bool(), d["timestep"], [(1, *_grid(golden))]).sample
    assert (out - d["expected"]).abs().max() <= TOL


@torch.no_grad()
def test_transformer_mask_free_path_equals_masked(golden, transformer):
    d = load_file(golden / "transformer_io.safetensors")
    valid = json.loads((golden / "transformer_io.json").read_text())["valid_text_tokens_row0"]
    shapes = [(1, *_grid(golden))]
    row0 = transformer(d["latents"][:1], [d[f"features_{i}"][:1, :valid] for i in range(2)], None, d["timestep"][:1], shapes)
    assert (row0.sample - d["expected_row0_truncated"]).abs().max() <= TOL
    assert (row0.sample - d["expected"][:1]).abs().max() <= TOL
    # The empty negative (all-false mask) is a forward with zero text tokens.
    row1 = transformer(d["latents"][1:], [d[f"features_{i}"][1:, :0] for i in range(2)], None, d["timestep"][1:], shapes)
    assert (row1.sample - d["expected"][1:]).abs().max() <= TOL


def test_vae_decode(golden, vae):
    d = load_file(golden / "vae_io.safetensors")
    out = decode_tokens(vae, d["packed_latents"], _grid(golden))
    assert out.shape == d["expected_image"].shape
    assert (out - d["expected_image"]).abs().max() <= TOL


def test_schedule(golden):
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(golden / "scheduler")
    cases = json.loads((golden / "schedule.json").read_text())
    assert len(cases) >= 4
    for case in cases:
        sigmas, mu = lens_sigmas(scheduler, case["image_seq_len"], case["steps"])
        assert mu == pytest.approx(case["mu"], abs=1e-9)
        assert torch.allclose(sigmas, torch.tensor(case["sigmas"]), atol=1e-6)
        assert torch.allclose(scheduler.timesteps, torch.tensor(case["timesteps"]), atol=1e-3)


def test_pipeline_denoise_and_decode(golden, transformer, vae):
    d = load_file(golden / "pipeline_io.safetensors")
    cfg = json.loads((golden / "pipeline_io.json").read_text())
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(golden / "scheduler")
    pipe = LensPipeline(transformer, vae, scheduler)
    out = pipe(
        prompt_embeds=[d["prompt_embeds_0"], d["prompt_embeds_1"]],
        prompt_mask=d["prompt_mask"].bool(),
        negative_prompt_embeds=[d["negative_embeds_0"], d["negative_embeds_1"]],
        negative_prompt_mask=d["negative_mask"].bool(),
        latents=d["noise"],
        height=cfg["height"],
        width=cfg["width"],
        num_inference_steps=cfg["num_inference_steps"],
        guidance_scale=cfg["guidance_scale"],
        output_type="latent",
    )
    image = decode_tokens(vae, out.images, (cfg["height"] // 16, cfg["width"] // 16))
    assert (image - d["expected_image"]).abs().max() <= TOL


def test_template_rendering_and_offset(golden):
    spec = json.loads((golden / "template.json").read_text())
    prefix, _ = template_parts(spec["pinned_date"])
    for case in spec["cases"]:
        assert render_prompt(case["prompt"], spec["pinned_date"]) == case["rendered"]
        ids = case["input_ids"]
        # The prefix ends at the third <|message|> (system, developer, user): that is the 97-token offset.
        message = 200008
        third = [i for i, t in enumerate(ids) if t == message][2]
        assert third + 1 == spec["txt_offset"] == 97
        assert ids[:97] == spec["cases"][0]["input_ids"][:97]
    assert prefix.endswith("<|start|>user<|message|>")
    assert prefix.count("<|message|>") == 3
