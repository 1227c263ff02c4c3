"""Memory planner predictions and choices, plan execution on the CPU, and OOM recovery."""

import gc
import weakref

import numpy as np
import pytest
import torch

from lensrun import LensrunError, memory
from lensrun.cli import main
from lensrun.engine import Task
from lensrun.memory import GIB, Plan
from lensrun.placement import HostedWeights, StreamedModule

SMALL = dict(height=32, width=48, num_inference_steps=2, output_type="latent")


def test_sizes_from_configs_match_the_published_model():
    sizes = memory.ComponentSizes.lens()
    assert sizes.dit["bf16"] == 4_104_225_152 * 2
    # Block linears (QKV, outputs, MLPs) become 1 byte; modulation and the rest stay bf16.
    quantized = 48 * (2 * 1536 * 4608 + 2 * 1536 * 1536 + 6 * 1536 * 4096)
    assert sizes.dit["fp8"] == sizes.dit["bf16"] - quantized
    assert sizes.encoder_embedding == 201088 * 2880 * 2
    # 24 layers of packed experts: blocks + scales, 4.25 bits per weight.
    experts = 32 * (5760 * 2880 + 2880 * 2880) * 17 // 32
    assert sizes.encoder_layer_experts == experts
    assert 10.5 * GIB < sizes.encoder_body < 10.8 * GIB


@pytest.mark.parametrize(
    "vram, size, check",
    [
        (24, (1088, 1936), lambda p: p.precision == "bf16" and p.placement == "resident"),
        (16, (1088, 1936), lambda p: p.placement in ("resident", "phased")),
        (12, (1024, 1024), lambda p: p.placement in ("resident", "phased")),
        (80, (1024, 1024), lambda p: p == Plan()),
    ],
)
def test_issue_cells_choose_plans_without_per_step_offload(vram, size, check):
    plan, preds = memory.choose(vram * GIB, *size)
    chosen = next(p for p in preds if p.chosen)
    assert check(plan), plan
    assert chosen.peak_bytes * memory.SAFETY <= vram * GIB
    # Nothing that fits is predicted faster than the choice.
    assert all(p.seconds >= chosen.seconds - 0.01 for p in preds if p.fits)



def test_a_quantized_precision_asked_for_is_never_traded_for_bf16():
    """--quantize fp8 restricts every plan to fp8 (resident only), even where a bf16 phased plan is as fast
    (the tiny model: every plan takes ~0 s) or where fp8 does not fit (then: the error, not bf16)."""
    from lensrun import configs

    tiny = memory.ComponentSizes.from_configs(configs.TINY_TRANSFORMER_CONFIG, configs.TINY_TEXT_ENCODER_CONFIG, configs.TINY_VAE_CONFIG)
    for sizes in (tiny, memory.ComponentSizes.lens()):
        preds = memory.plan_table(80 * GIB, 1024, 1024, sizes=sizes, precisions=("fp8",))
        assert preds and {(p.plan.placement, p.plan.precision) for p in preds} == {("resident", "fp8")}
    with pytest.raises(LensrunError, match="no plan fits"):
        memory.choose(8 * GIB, 1024, 1024, precisions=("fp8",))

def test_too_small_budget_says_what_is_needed():
    with pytest.raises(LensrunError, match=r"no plan fits 1.0 GiB for 1024x1024: the leanest .* needs \d+\.\d GiB"):
        memory.choose(1 * GIB, 1024, 1024)


def test_bigger_images_never_predict_less_memory():
    sizes = memory.ComponentSizes.lens()
    for plan in memory.candidate_plans():
        small = memory.predict(plan, sizes, 1024, 1024)
        big = memory.predict(plan, sizes, 1440, 1440)
        assert big.peak_bytes >= small.peak_bytes and big.seconds >= small.seconds


@pytest.mark.parametrize("text, gib", [("24GB", 24), ("24GiB", 24), ("12.5", 12.5), (8, 8)])
def test_parse_budget(text, gib):
    assert memory.parse_budget(text) == gib * GIB


def test_bad_budget():
    with pytest.raises(LensrunError, match="cannot read VRAM budget 'lots'"):
        memory.parse_budget("lots")


def test_plan_command_needs_no_gpu(capsys):
    assert main(["plan", "--vram", "24GB", "--base-resolution", "1440", "--aspect-ratio", "16:9"]) == 0
    out = capsys.readouterr().out
    assert "1936x1088, 20 steps" in out
    chosen = [line for line in out.splitlines() if line.startswith("=>")]
    assert len(chosen) == 1 and "resident+bf16" in chosen[0]


def test_encoder_decode_chunk_changes_nothing(tiny_pipe):
    full, _ = tiny_pipe.encode_prompt(["a fox in the snow"])
    tiny_pipe.text_encoder.set_decode_chunk(1)
    try:
        chunked, _ = tiny_pipe.encode_prompt(["a fox in the snow"])
    finally:
        tiny_pipe.text_encoder.set_decode_chunk(32)
    for a, b in zip(full, chunked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_hosted_weights_swap_storage_not_values():
    layer = torch.nn.Linear(4, 3)
    before = layer.weight.detach().clone()
    hosted = HostedWeights(layer, torch.device("cpu"), pinned=False)
    hosted.load()
    assert hosted.on_device and torch.equal(layer.weight, before)
    hosted.unload()
    assert torch.equal(layer.weight, before)
    hosted.load()
    host_ptr = hosted.host[0].data_ptr()
    hosted.release()  # a replaced plan leaves the weights in CPU memory, never all on the GPU at once
    assert layer.weight.data_ptr() == host_ptr and hosted.tensors == [] and not hosted.on_device


def test_plan_settings_are_applied(tiny_pipe):
    try:
        tiny_pipe.apply_plan(Plan(vae_tiling=True, encoder_chunk=2, embedding_on_cpu=True))
        assert tiny_pipe.vae.use_tiling
        assert tiny_pipe.text_encoder.layers[0].mlp.experts.chunk == 2
        out = tiny_pipe("x", seed=1, **SMALL)
        assert out.report["plan"] == "resident+bf16+enc-chunk2+vae-tiled+emb-cpu"
    finally:
        tiny_pipe.apply_plan(Plan())
    assert not tiny_pipe.vae.use_tiling


def test_oom_recovers_with_next_plan_and_frees_the_failed_step(tiny_pipe, monkeypatch):
    expected = tiny_pipe("a fox", seed=3, **{**SMALL, "output_type": "pil"}).images
    inner = tiny_pipe.transformer.forward_branches
    state = {"failed": False}
    doomed = []

    def flaky(*args, **kwargs):
        if not state["failed"]:
            state["failed"] = True
            big = torch.empty(4 * 2**20)  # a tensor the failed step holds when it dies
            doomed.append(weakref.ref(big))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return inner(*args, **kwargs)

    monkeypatch.setattr(tiny_pipe.transformer, "forward_branches", flaky)
    messages = []
    plans = [Plan(), Plan(encoder_chunk=8)]
    engine = _engine(tiny_pipe)
    task = Task(engine.request(prompt="a fox", seed=3, height=32, width=48, steps=SMALL["num_inference_steps"]))
    [result] = engine.run([task], plans=plans, notify=messages.append)
    tiny_pipe.apply_plan(Plan())
    assert np.array_equal(np.asarray(result.image), np.asarray(expected[0]))
    assert result.report["plan"] == "resident+bf16+enc-chunk8"
    assert result.report["fallbacks"][0].startswith("resident+bf16: CUDA out of memory")
    assert [m for m in messages if "out of memory" in m] == [
        "out of memory under plan resident+bf16; retrying with resident+bf16+enc-chunk8"
    ]
    gc.collect()
    assert doomed[0]() is None


def test_oom_under_every_plan_is_a_clear_error(tiny_pipe, monkeypatch):
    def always(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(tiny_pipe.transformer, "forward_branches", always)
    engine = _engine(tiny_pipe)
    with pytest.raises(LensrunError, match="out of memory under every plan tried"):
        engine.run([Task(engine.request(prompt="a fox", seed=3, height=32, width=48, steps=SMALL["num_inference_steps"]))], plans=[Plan()])
    tiny_pipe.apply_plan(Plan())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--vram", "8GB"], "--vram and --placement apply to CUDA GPUs"),
        (["--placement", "phased"], "--vram and --placement apply to CUDA GPUs"),
        (["--quantize", "fp8"], "(needs torchao|needs a CUDA GPU)"),
        (["--quant_transformer", "float8_weight_only"], "(needs torchao|needs a CUDA GPU)"),
        (["--offload", "--placement", "resident"], "--offload conflicts with --placement resident"),
        (["--cache", "0.05", "--variant", "turbo"], "Turbo has no steps to spare"),
    ],
)
def test_memory_options_refused_on_cpu(tmp_path, capsys, extra, message):
    argv = ["generate", "--prompt", "x", "--model", "tiny-random", "--device", "cpu", "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "o").exists()


def _engine(pipe):
    from lensrun.engine import Engine
    from lensrun.request import EngineOptions

    return Engine(pipe, EngineOptions(model="tiny-random", device="cpu"))


def test_branches_forward_equals_separate_forwards(tiny_pipe):
    cond = tiny_pipe.encode_one("a lighthouse")
    uncond = [f[:, :0] for f in cond]
    x = torch.randn(1, 6, 128)
    t = torch.tensor([0.6])
    with torch.no_grad():
        a, b = tiny_pipe.transformer.forward_branches(x, [cond, uncond], t, [(1, 2, 3)])
        ref_a = tiny_pipe.transformer(x, cond, None, t, [(1, 2, 3)]).sample
        ref_b = tiny_pipe.transformer(x, uncond, None, t, [(1, 2, 3)]).sample
    assert torch.equal(a, ref_a) and torch.equal(b, ref_b)


def test_stream_plan_runs_blocks_through_a_window(tiny_pipe):
    """Under "stream" each block's weights visit the device inside its window; the image is unchanged."""
    prompt = "a prompt only the streaming test encodes"
    expected = tiny_pipe(prompt, seed=5, **SMALL).images
    tiny_pipe.prompt_cache._memory.clear()
    try:
        tiny_pipe.apply_plan(Plan(placement="stream", stream_window=2))
        blocks, layers = tiny_pipe.placer.streamers["transformer"], tiny_pipe.placer.streamers["text_encoder"]
        out = tiny_pipe(prompt, seed=5, **SMALL)
        assert out.report["plan"].startswith("stream+bf16")
        assert blocks.peak_window == 2 and len(blocks.hosted) == 2
        # The encoder has 4 layers: never more than the window of 2 on the device.
        assert layers.peak_window == 2 and len(layers.hosted) == 4
        assert sum(h.on_device for h in layers.hosted) <= 2
        # Nothing prefetched for a next pass outlives its phase: the decode phase gets the memory.
        assert not any(h.on_device for h in layers.hosted + blocks.hosted)
    finally:
        tiny_pipe.apply_plan(Plan())
    assert not any(isinstance(b, StreamedModule) for b in tiny_pipe.transformer.transformer_blocks)
    assert torch.equal(out.images, expected)


def test_eight_gib_chooses_streaming_with_prediction_under_budget():
    plan, preds = memory.choose(8 * GIB, 1024, 1024)
    assert plan.placement == "stream" and plan.precision == "bf16"
    chosen = next(p for p in preds if p.chosen)
    assert chosen.peak_bytes * memory.SAFETY <= 8 * GIB


def test_plan_choice_is_explained():
    """The engine plans for the most demanding request of a run (largest size, most steps, any CFG)."""
    from lensrun.engine import plans_for
    from lensrun.request import EngineOptions, GenerationRequest

    sizes, cuda = memory.ComponentSizes.lens(), torch.device("cuda")
    small = GenerationRequest.build(prompt="x", variant="turbo")
    large = GenerationRequest.build(prompt="x", base_resolution=1440, aspect_ratio="16:9")
    plans, why = plans_for(cuda, [small, large], EngineOptions(vram="24GB"), sizes, compiled=False)
    assert plans[0].name == "resident+bf16+emb-cpu" and len(plans) == 3
    assert why.startswith("plan resident+bf16+emb-cpu: predicted peak 21.9 GiB of a 24.0 GiB budget (--vram)")
    assert "on out-of-memory: " + plans[1].name in why
    assert plans_for(cuda, [small], EngineOptions(vram="80"), sizes, compiled=False)[0][0] == Plan()


def test_cached_prompts_skip_the_encode_phase(tiny_pipe, monkeypatch):
    """A phased plan brings the encoder in only for prompts the cache lacks."""
    entered = []
    phase = tiny_pipe.phase
    monkeypatch.setattr(tiny_pipe, "phase", lambda name: entered.append(name) or phase(name))
    tiny_pipe("a prompt seen twice", negative_prompt="blurry", seed=1, **SMALL)
    assert entered.count("encode") == 1
    tiny_pipe("a prompt seen twice", negative_prompt="blurry", seed=2, **SMALL)
    assert entered.count("encode") == 1 and entered.count("denoise") == 2
    tiny_pipe("a prompt seen twice", negative_prompt="a new negative", seed=2, **SMALL)
    assert entered.count("encode") == 2


def test_decoded_experts_need_decode_chunks_where_the_fused_kernel_does_not():
    """Without the Triton kernel a layer's experts are decoded to bf16 (≈ 4 GiB at once); the planner then
    bounds that with decode chunks. With the kernel there is no decode workspace and no chunk plans."""
    sizes = memory.ComponentSizes.lens()
    fused = memory.predict(Plan(), sizes, 1088, 1936, fused_experts=True).phases["encode"]
    decoded = memory.predict(Plan(), sizes, 1088, 1936, fused_experts=False).phases["encode"]
    assert 3.5 * GIB < decoded - fused < 4.5 * GIB
    plan, _ = memory.choose(24 * GIB, 1088, 1936, fused_experts=False)
    assert plan.name == "resident+bf16+enc-chunk8+emb-cpu"
    assert {p.encoder_chunk for p in memory.candidate_plans(fused_experts=True)} == {32}


def test_compiled_pipelines_plan_for_their_cuda_graph_pools():
    """Graph pools stay allocated after their phase: at 24 GiB, 1440² 16:9 compiled keeps the embedding table in
    CPU memory to make room, and the prediction still fits the budget."""
    sizes = memory.ComponentSizes.lens()
    eager = memory.predict(Plan(vae_tiling=True), sizes, 1088, 1936)
    graphed = memory.predict(Plan(vae_tiling=True), sizes, 1088, 1936, graphs=True)
    assert graphed.phases["encode"] == eager.phases["encode"]
    assert 0.5 * GIB < graphed.phases["decode"] - eager.phases["decode"] < 1.5 * GIB
    plan, preds = memory.choose(24 * GIB, 1088, 1936, graphs=True)
    assert plan.placement == "resident" and plan.precision == "bf16" and plan.embedding_on_cpu
    assert next(p for p in preds if p.chosen).peak_bytes * memory.SAFETY <= 24 * GIB
    assert memory.predict(Plan(placement="phased"), sizes, 1088, 1936, graphs=True).peak_bytes == memory.predict(
        Plan(placement="phased"), sizes, 1088, 1936
    ).peak_bytes
