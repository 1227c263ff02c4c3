"""The fast paths compute the same function as the reference path (CPU, fp32); caches are exact and keyed."""

import warnings

import pytest
import torch

from lensrun import LensrunError, acceleration
from lensrun.prompt_cache import PromptCache
from lensrun.request import GenerationRequest

SMALL = dict(height=32, width=48)


def _request(**kw):
    return GenerationRequest.build(prompt="x", **{"height": 32, "width": 48, "steps": 6, "cfg": 4.0, "seed": 1, **kw})


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_fast_denoise_equals_reference(tiny_pipe, negative):
    req = _request()
    cond = tiny_pipe.encode_one("a lighthouse on a cliff")
    uncond = tiny_pipe.encode_one(negative) if negative else [f[:, :0] for f in cond]
    noise = tiny_pipe.initial_noise(1, req.grid)
    fast = tiny_pipe.denoise(noise, cond, uncond, req)
    ref = tiny_pipe.denoise_reference(noise, cond, uncond, req)
    assert (fast - ref).abs().max() <= 1e-4


def test_compiled_blocks_equal_eager(tiny_checkpoint):
    from lensrun import LensPipeline

    eager = LensPipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32, device="cpu")
    compiled = LensPipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32, device="cpu").optimize(compile=True)
    kw = dict(seed=2, num_inference_steps=2, output_type="latent", **SMALL)
    a = eager("a red fox", **kw).images
    b = compiled("a red fox", **kw).images
    assert compiled.compiled and (a - b).abs().max() <= 1e-4


def test_compiled_blocks_compile_once_for_every_prompt_length_and_resolution(tiny_checkpoint):
    """Token counts are symbolic from the first compilation: new prompt lengths and grids reuse its graph; only an
    empty text (the unconditional branch) gets a second one."""
    from torch._dynamo.testing import CompileCounter

    from lensrun import LensPipeline

    pipe = LensPipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32, device="cpu")
    counter = CompileCounter()
    pipe.transformer.compile_blocks(backend=counter)
    eager = LensPipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32, device="cpu")
    cases = [("a fox", 32, 48, 4.0), ("a red fox in the snow at dawn, wide shot", 32, 48, 4.0), ("a fox", 64, 32, 1.0)]
    for prompt, h, w, cfg in cases:
        kw = dict(seed=3, num_inference_steps=2, guidance_scale=cfg, output_type="latent", height=h, width=w)
        got, want = pipe(prompt, **kw).images, eager(prompt, **kw).images
        assert (got - want).abs().max() <= 1e-5
    assert counter.frame_count == 2


def test_prompt_cache_memory_and_disk(tiny_pipe, tmp_path):
    cache = PromptCache("enc-A", tmp_path)
    key = cache.key("a fox", "2026-05-23", 512, torch.float32)
    assert cache.get(key, torch.device("cpu")) is None
    features = tiny_pipe.encode_one("a fox")
    cache.put(key, features)
    cache.flush()  # the file is written on a side thread
    reloaded = PromptCache("enc-A", tmp_path).get(key, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(features, reloaded, strict=True))
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    # Anything that changes the features changes the key.
    assert key != cache.key("a fox", "2026-05-24", 512, torch.float32)
    assert key != PromptCache("enc-B").key("a fox", "2026-05-23", 512, torch.float32)
    assert key != cache.key("a fox", "2026-05-23", 512, torch.bfloat16)


def test_pipeline_encodes_a_repeated_prompt_once(tiny_pipe):
    calls = []
    encoder = tiny_pipe.text_encoder
    handle = encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        prompt = "a prompt used only by this test"
        tiny_pipe(prompt, seed=1, num_inference_steps=1, output_type="latent", **SMALL)
        tiny_pipe([prompt, prompt], seed=2, num_inference_steps=1, output_type="latent", **SMALL)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_step_cache_skips_blocks_and_reports(tiny_pipe):
    kw = dict(seed=4, num_inference_steps=12, output_type="latent", **SMALL)
    full = tiny_pipe("a fox", **kw)
    cached = tiny_pipe("a fox", cache=0.5, **kw)
    assert cached.timings["cache_skipped"] > 0
    assert cached.timings["cache_skipped"] + cached.timings["cache_computed"] == 24
    assert cached.configs[0]["cache"] == 0.5 and full.configs[0]["cache"] is None
    assert torch.isfinite(cached.images).all()
    assert not torch.equal(full.images, cached.images)


@pytest.mark.parametrize("kw, message", [(dict(variant="turbo"), "Turbo has no steps"), (dict(cache=1.5), "in \\(0, 1\\)")])
def test_step_cache_refused(kw, message):
    with pytest.raises(LensrunError, match=message):
        GenerationRequest.build(prompt="x", cache=kw.pop("cache", 0.05), **kw)


def test_precision_checks_and_filter(tiny_pipe):
    assert acceleration.normalize_precision("float8_weight_only") == "fp8-weight"
    with pytest.raises(LensrunError, match="unknown DiT precision 'fp4'"):
        acceleration.normalize_precision("fp4")
    with pytest.raises(LensrunError, match="(needs a CUDA GPU|needs torchao)"):
        acceleration.check_precision("fp8", torch.device("cpu"))
    assert acceleration.check_precision("bf16", torch.device("cpu")) == "bf16"
    chosen = [n for n, m in tiny_pipe.transformer.named_modules() if acceleration.quantizable(m, n)]
    assert "transformer_blocks.0.attn.img_qkv" in chosen and "transformer_blocks.1.img_mlp.w2" in chosen
    assert not any("_mod" in n or not n.startswith("transformer_blocks.") for n in chosen)
    assert len(chosen) == 2 * 10


def test_a_step_graph_that_cannot_be_captured_falls_back_to_the_loop(tiny_pipe, monkeypatch):
    """If capture fails (an op that syncs, a kernel that refuses capture), the image still comes out, from the
    Python loop, with a warning; later images skip the graph attempt."""
    small = dict(height=32, width=48, num_inference_steps=2, output_type="latent")
    expected = tiny_pipe("a lantern", seed=4, **small).images

    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    attempts = []
    monkeypatch.setattr(tiny_pipe.step_graphs, "_capture", lambda *a: attempts.append(1) or refuse())
    monkeypatch.setattr(tiny_pipe, "graph_steps", True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a shape seen for the first time runs the loop, silently, no capture
        first = tiny_pipe("a lantern", seed=4, **small).images
    assert attempts == [] and tiny_pipe.graph_steps
    with pytest.warns(UserWarning, match="could not be captured as a CUDA graph .*operation not permitted"):
        second = tiny_pipe("a lantern", seed=4, **small).images
    assert attempts == [1] and torch.equal(first, expected) and torch.equal(second, expected)
    assert tiny_pipe.graph_steps is False and tiny_pipe.step_graphs.failed.startswith("RuntimeError")
    tiny_pipe.step_graphs.reset()


def test_quantizing_leaves_the_compiler_settings_alone():
    """torchao's configs retune Inductor process-wide by default (coordinate-descent tuning: 235 s of a cold fp8
    warm-up on an H200, 78 s even with warm caches); lensrun's quantization must not change how anything
    compiles."""
    pytest.importorskip("torchao")
    import torch._inductor.config as inductor

    from lensrun import LensPipeline

    names = ("coordinate_descent_tuning", "coordinate_descent_check_all_directions", "force_fuse_int_mm_with_mul")
    before = {name: getattr(inductor, name) for name in names}
    pipe = LensPipeline.tiny_random(device="cpu")
    acceleration.quantize_transformer(pipe.transformer, "int8-weight")
    weight = pipe.transformer.transformer_blocks[1].attn.img_qkv.weight
    assert type(weight) not in (torch.Tensor, torch.nn.Parameter)  # quantized
    assert {name: getattr(inductor, name) for name in names} == before


@pytest.mark.parametrize("users", [None, "mine"])
def test_the_compile_cache_is_lensruns_unless_the_user_chose_one(tmp_path, users):
    """Inductor writes its default into TORCHINDUCTOR_CACHE_DIR when it first looks; if that happened before
    lensrun was imported, lensrun must still keep compiled code in its own cache folder (where its warm-cache
    markers are), and a folder the user chose stays theirs."""
    import os
    import subprocess
    import sys

    code = (
        "from torch._inductor.runtime.cache_dir_utils import cache_dir; cache_dir(); "
        "from lensrun.acceleration import compile_cache_dir; print(compile_cache_dir()); print(compile_cache_dir())"
    )
    env = {**os.environ, "LENSRUN_CACHE_DIR": str(tmp_path / "lensrun")}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    if users:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / users)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    expected = tmp_path / users if users else tmp_path / "lensrun" / "inductor"
    assert out == [str(expected)] * 2
