"""Attention backends on the CPU: dispatch and layouts (through a stand-in for the FlashAttention-3 module),
the choice ``auto`` makes and why, clear errors for a backend that cannot run, the recipe and replay."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from lensrun import api, attention
from lensrun.errors import LensrunError
from lensrun.metadata import read_config

CPU = torch.device("cpu")
TINY = {"model": "tiny-random", "device": "cpu", "height": 32, "width": 32, "steps": 2}


@pytest.fixture
def fake_fa3(monkeypatch):
    """``fa3_fwd_interface._flash_attn_forward`` with FlashAttention's conventions ([B, L, H, D]; fp8 inputs with
    (batch, head) descales; ``seqused_k``: only the first keys of each row), computed by SDPA; records what it
    was given."""
    calls = []

    def _flash_attn_forward(q, k, v, seqused_k=None, q_descale=None, k_descale=None, v_descale=None, softmax_scale=None):
        calls.append({"dtype": q.dtype, "shape": tuple(q.shape), "descale": None if q_descale is None else tuple(q_descale.shape),
                      "seqused_k": None if seqused_k is None else seqused_k.tolist()})  # fmt: skip
        assert softmax_scale == q.shape[-1] ** -0.5
        if q.dtype == torch.float8_e4m3fn:
            q, k, v = (t.float() * s[:, None, :, None] for t, s in ((q, q_descale), (k, k_descale), (v, v_descale)))
        rows = []
        for b in range(q.shape[0]):
            used = k.shape[1] if seqused_k is None else int(seqused_k[b])
            qb, kb, vb = (t[b : b + 1].transpose(1, 2).float() for t in (q, k[:, :used], v[:, :used]))
            rows.append(F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2))
        return torch.cat(rows), None, None, None

    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", types.SimpleNamespace(_flash_attn_forward=_flash_attn_forward))
    return calls


def test_flash_layout_and_fp8_scales(fake_fa3):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 37, 64) * s for s in (1.0, 3.0, 0.2))  # odd length; heads of different ranges
    reference = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(attention.attend(q, k, v, None, "fa3"), reference, atol=1e-6)
    fp8 = attention.attend(q, k, v, None, "fa3-fp8")
    assert fake_fa3[-1] == {"dtype": torch.float8_e4m3fn, "shape": (1, 37, 4, 64), "descale": (1, 4), "seqused_k": None}
    assert (fp8 - reference).abs().max() < 0.1  # e4m3 keeps 3 mantissa bits; scales from the real values
    mask = torch.ones(1, 1, 37, 37, dtype=torch.bool)
    attention.attend(q, k, v, mask, "fa3")  # a mask always goes through SDPA
    assert len(fake_fa3) == 2


def test_key_counts_leave_padded_keys_out(fake_fa3):
    """Text padded to a fixed length: FlashAttention's ``seqused_k`` attends to the first keys only, which is
    attention over the unpadded sequence; SDPA refuses counts (it takes exact lengths)."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 40, 64) for _ in range(3))
    counts = torch.tensor([31, 40], dtype=torch.int32)
    out = attention.attend(q, k, v, counts, "fa3")
    for b, used in enumerate(counts.tolist()):
        exact = F.scaled_dot_product_attention(q[b : b + 1], k[b : b + 1, :, :used], v[b : b + 1, :, :used])
        assert torch.allclose(out[b : b + 1], exact, atol=1e-6)
    with pytest.raises(ValueError, match="FlashAttention"):
        attention.attend(q, k, v, counts, "sdpa")


def test_fp8_scales_use_each_heads_range():
    x = torch.randn(2, 50, 3, 64) * torch.tensor([1e-3, 1.0, 300.0]).view(1, 1, 3, 1)
    values, scale = attention.to_fp8(x)
    assert scale.shape == (2, 3) and values.dtype == torch.float8_e4m3fn
    assert torch.allclose(values.float().abs().amax(dim=(1, 3)), torch.full((2, 3), 448.0))
    assert ((values.float() * scale[:, None, :, None] - x).abs() / x.abs().amax()).max() < 0.07


def test_auto_on_the_cpu_is_sdpa_and_says_why():
    assert attention.resolve("auto", "bf16", CPU)[0] == "sdpa"
    with pytest.raises(LensrunError, match="fa3-fwd kernels|Hopper"):
        attention.resolve("fa3", "bf16", CPU)
    with pytest.raises(LensrunError, match="not one of auto, sdpa, fa3, fa3-fp8, sage"):
        attention.resolve("flash9", "bf16", CPU)


def test_auto_takes_fa3_only_when_its_check_passes(fake_fa3, monkeypatch, tmp_path):
    monkeypatch.setenv("LENSRUN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(attention, "supported", lambda backend, device: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    errors = {"fa3": 5e-4, "fa3-fp8": 2e-2}
    monkeypatch.setattr(attention, "measure_error", lambda backend, device: errors[backend])
    assert attention.resolve("auto", "bf16", CPU)[0] == "fa3"
    assert attention.resolve("auto", "fp8", CPU)[0] == "fa3-fp8"
    errors["fa3"] = 1.0  # cached: the verdict stands until the GPU, torch or kernel changes
    assert attention.resolve("auto", "bf16", CPU)[0] == "fa3"
    (tmp_path / "attention-checks.json").unlink()
    backend, why = attention.resolve("auto", "bf16", CPU)
    assert backend == "sdpa" and "differs from fp32 by 1.0e+00" in why
    backend, why = attention.resolve("auto", "bf16", CPU, torch.float32)  # fp32 runs (tiny models, CPU)
    assert backend == "sdpa" and "bf16/fp16" in why
    with pytest.raises(LensrunError, match="computes in bf16 or fp16; this run's dtype is float32"):
        attention.resolve("fa3", "bf16", CPU, torch.float32)


def test_the_backend_is_set_on_every_block_and_recorded(tmp_path):
    path = api.generate("a fox", out=tmp_path, attention="sdpa", **TINY)[0]
    assert read_config(path)["attention"] == "sdpa"
    from lensrun import LensPipeline
    from lensrun.models.transformer_lens import LensTransformer2DModel

    pipe = LensPipeline.tiny_random()
    assert isinstance(pipe.transformer, LensTransformer2DModel)
    pipe.transformer.set_attention_backend("fa3")
    assert {b.attn.backend for b in pipe.transformer.transformer_blocks} == {"fa3"}
    for diffusers_name, ours in (("native", "sdpa"), ("_flash_3", "fa3"), ("_native_cudnn", "sdpa")):
        pipe.transformer.set_attention_backend(diffusers_name)
        assert pipe.transformer.attention_backend == ours
    pipe.transformer.set_attention_backend("fa3-fp8")
    pipe.transformer.reset_attention_backend()
    assert {b.attn.backend for b in pipe.transformer.transformer_blocks} == {"sdpa"}
    with pytest.raises(LensrunError, match="'flash' is not one of sdpa, fa3, fa3-fp8, sage \\(or diffusers' native"):
        pipe.transformer.set_attention_backend("flash")  # FlashAttention-2: not a lensrun backend
    assert pipe.transformer.attention_backend == "sdpa"


@pytest.mark.parametrize("recorded", ["fa3", "flash-attn-9"])  # not on this machine; unknown to this lensrun
def test_replay_of_an_image_whose_kernel_cannot_run_here_uses_sdpa_and_says_so(recorded, tmp_path, monkeypatch):
    from lensrun.metadata import save_png

    monkeypatch.setattr(attention, "supported", lambda backend, device: backend == "sdpa")  # e.g. no Hopper GPU

    path = api.generate("a fox", out=tmp_path, **TINY)[0]
    config = read_config(path)
    from PIL import Image

    save_png(Image.open(path), tmp_path / "in.png", {**config, "attention": recorded})
    said = []
    replayed = api.replay(tmp_path / "in.png", out=tmp_path / "r", notify=said.append)
    assert any(f"{recorded} attention kernel, which cannot run here; using sdpa" in m for m in said)
    assert read_config(replayed)["attention"] == "sdpa"


def test_padded_text_with_key_counts_gives_the_exact_length_image(fake_fa3):
    """With a FlashAttention backend the pipeline pads the text to a multiple of ``TEXT_BUCKET`` and passes the
    count of keys that count: the image of the exact-length path (SDPA), and one shape for many prompt lengths."""
    from lensrun import LensPipeline
    from lensrun.pipeline import TEXT_BUCKET

    pipe = LensPipeline.tiny_random(device="cpu")
    kwargs = {"seed": 3, "height": 32, "width": 48, "num_inference_steps": 2, "output_type": "pt"}
    exact = pipe("a lighthouse", negative_prompt="fog", **kwargs).images
    assert not fake_fa3  # sdpa: exact lengths, FlashAttention never called
    pipe.transformer.set_attention_backend("fa3")
    padded = pipe("a lighthouse", negative_prompt="fog", **kwargs).images
    image_tokens = (32 // 16) * (48 // 16)
    lengths = {c["shape"][1] - image_tokens for c in fake_fa3}
    assert lengths == {TEXT_BUCKET}  # both prompts padded to one bucket
    assert {c["seqused_k"][0] for c in fake_fa3} == {image_tokens + n for n in _text_lengths(pipe, "a lighthouse", "fog")}
    assert torch.allclose(padded, exact, atol=1e-5)


def _text_lengths(pipe, *prompts: str) -> set[int]:
    return {pipe.encode_one(p)[0].shape[1] for p in prompts}


def test_only_flash_attention_on_one_device_pads_text():
    from lensrun import LensPipeline

    pipe = LensPipeline.tiny_random(device="cpu")
    features = [torch.randn(1, 9, 8) for _ in range(2)]
    assert pipe.bucket_text(features, 6) == (features, None)  # sdpa
    pipe.transformer.set_attention_backend("sage")
    assert pipe.bucket_text(features, 6) == (features, None)  # takes no key counts
    pipe.transformer.set_attention_backend("fa3")
    padded, counts = pipe.bucket_text(features, 6)
    assert [f.shape for f in padded] == [torch.Size([1, 64, 8])] * 2 and counts.tolist() == [15]
    assert torch.equal(padded[0][:, :9], features[0]) and not padded[0][:, 9:].any()
    empty = [f[:, :0] for f in features]
    assert pipe.bucket_text(empty, 6) == (empty, None)  # the empty negative prompt keeps its own shape


def test_sage_is_dispatched_on_lensrun_layout_and_only_when_asked(monkeypatch):
    """SageAttention takes [B, H, L, D] ("HND"); ``auto`` never picks it (not measured on the GPUs it is made
    for); asked without the package or on the CPU, the error names what is missing."""
    calls = []

    def sageattn(q, k, v, tensor_layout, is_causal):
        calls.append((tuple(q.shape), tensor_layout, is_causal))
        return F.scaled_dot_product_attention(q, k, v)

    q, k, v = (torch.randn(1, 2, 9, 64) for _ in range(3))
    monkeypatch.setitem(sys.modules, "sageattention", None)  # not installed (importing it raises ImportError)
    with pytest.raises(LensrunError, match=r"sageattention: pip install 'lensrun\[sage\]'"):
        attention.resolve("sage", "bf16", CPU)
    monkeypatch.setitem(sys.modules, "sageattention", types.SimpleNamespace(sageattn=sageattn))
    assert torch.allclose(attention.attend(q, k, v, None, "sage"), F.scaled_dot_product_attention(q, k, v))
    assert calls == [((1, 2, 9, 64), "HND", False)]
    with pytest.raises(LensrunError, match="Ampere"):
        attention.resolve("sage", "bf16", CPU)
    assert attention.resolve("auto", "bf16", CPU)[0] == "sdpa"


def test_a_replayed_cfg_step_gives_the_loops_image_with_each_branchs_key_count(fake_fa3, monkeypatch):
    """The step graph runs its CFG step through ``forward_branches`` (block by block, both branches): the
    replayed image is the Python loop's, each branch attending over its own keys (an empty negative prompt: the
    image's keys alone, no count). On the CPU the CUDA graph is stood in for by running the captured step on its
    static buffers."""
    from lensrun import LensPipeline, step_graph

    class Replayed:
        def __init__(self, fn):
            self.replay = fn

    monkeypatch.setattr(step_graph, "capture", lambda fn, pool: (Replayed(fn), fn()))
    pipe = LensPipeline.tiny_random(device="cpu")
    pipe.transformer.set_attention_backend("fa3")
    kwargs = {"seed": 3, "height": 32, "width": 48, "num_inference_steps": 2, "output_type": "pt"}
    image_tokens = (32 // 16) * (48 // 16)
    cond_keys = image_tokens + min(_text_lengths(pipe, "a lighthouse"))
    for negative in ("", "fog"):
        pipe.step_graphs.reset()
        pipe.graph_steps = True
        loop = pipe("a lighthouse", negative_prompt=negative, **kwargs).images  # first sighting: the loop
        fake_fa3.clear()
        replayed = pipe("a lighthouse", negative_prompt=negative, **kwargs).images  # captured, replayed
        assert len(pipe.step_graphs.graphs) == 1
        uncond_keys = [image_tokens + min(_text_lengths(pipe, negative))] if negative else None
        assert {c["shape"][0] for c in fake_fa3} == {1}
        assert [c["seqused_k"] for c in fake_fa3[-2:]] == [[cond_keys], uncond_keys]
        assert torch.allclose(replayed, loop, atol=1e-5)
