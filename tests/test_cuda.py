"""GPU-only paths (pinned copies, side streams, CUDA OOM). Skipped without CUDA; run them on the GPU machine with
``pytest tests/test_cuda.py``."""

import gc

import pytest
import torch

from lensrun.engine import Task
from lensrun.memory import Plan

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SMALL = dict(height=64, width=96, num_inference_steps=3, output_type="latent")


def _engine(pipe):
    from lensrun.engine import Engine
    from lensrun.request import EngineOptions

    return Engine(pipe, EngineOptions(model="tiny-random", compile=False))


@pytest.fixture(scope="module")
def gpu_pipe():
    from lensrun import LensPipeline

    return LensPipeline.tiny_random(device="cuda")


@pytest.mark.parametrize("placement", ["resident", "phased", "offload", "stream"])
def test_every_placement_gives_the_resident_image(gpu_pipe, placement):
    gpu_pipe.apply_plan(Plan())
    expected = gpu_pipe("a red kite over dunes", seed=11, **SMALL).images
    gpu_pipe.prompt_cache._memory.clear()
    try:
        gpu_pipe.apply_plan(Plan(placement=placement, encoder_chunk=2, vae_tiling=True, embedding_on_cpu=True))
        out = gpu_pipe("a red kite over dunes", seed=11, **SMALL)
        assert out.report["plan"].startswith(placement)
        on_gpu = [b.attn.img_qkv.weight.is_cuda for b in gpu_pipe.transformer.transformer_blocks]
        if placement in ("phased", "offload"):  # the DiT's weights are back in CPU memory after the run
            assert not any(on_gpu)
        if placement == "stream":  # at most the window of the encoder's 4 layers was ever on the GPU
            layers = [next(layer.parameters()).is_cuda for layer in gpu_pipe.text_encoder.layers]
            assert sum(layers) <= 2 and gpu_pipe.placer.streamers["text_encoder"].peak_window == 2
    finally:
        gpu_pipe.apply_plan(Plan())
    torch.testing.assert_close(out.images, expected, rtol=1e-4, atol=1e-4)
    assert gpu_pipe.transformer.transformer_blocks[0].attn.img_qkv.weight.device.type == "cuda"


def test_real_cuda_oom_recovers_and_returns_memory(gpu_pipe):
    """A genuine allocator failure (not an injected exception) under the first plan; the second one finishes."""
    gpu_pipe.apply_plan(Plan())
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    free, _ = torch.cuda.mem_get_info()
    inner = gpu_pipe.transformer.forward_branches
    state = {"failed": False}

    def greedy(*args, **kwargs):
        if not state["failed"]:
            state["failed"] = True
            _hog = torch.empty(free + 2**30, dtype=torch.uint8, device="cuda")  # more than the card has free
        return inner(*args, **kwargs)

    gpu_pipe.transformer.forward_branches = greedy
    engine = _engine(gpu_pipe)
    try:
        task = Task(engine.request(prompt="x", seed=1, height=64, width=96, steps=3))
        [result] = engine.run([task], plans=[Plan(), Plan(encoder_chunk=8)])
    finally:
        del gpu_pipe.transformer.forward_branches
        gpu_pipe.apply_plan(Plan())
    assert result.report["plan"] == "resident+bf16+enc-chunk8"
    assert "out of memory" in result.report["fallbacks"][0].lower()
    rec = result.report["recoveries"][0]
    assert abs(rec["allocated_after_cleanup_gib"] - rec["allocated_before_gib"]) < 0.01
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= base + 2**20


def test_fused_experts_match_decoded_experts_at_full_size():
    """The Triton kernel path of a full-size GPT-OSS expert layer equals decode-then-matmul (bf16)."""
    from lensrun import mxfp4
    from lensrun.configs import FULL_TEXT_ENCODER_CONFIG
    from lensrun.models.text_encoder import Mxfp4Experts, gpt_oss_config

    config = gpt_oss_config(FULL_TEXT_ENCODER_CONFIG)
    experts = Mxfp4Experts(config).cuda()
    e, n2, h = experts.gate_up_proj_blocks.shape[0], experts.gate_up_proj_blocks.shape[1], config.hidden_size
    gb, gs = mxfp4.quantize(torch.randn(e, n2, h, device="cuda") * h**-0.5)
    db, ds = mxfp4.quantize(torch.randn(e, h, config.intermediate_size, device="cuda") * h**-0.5)
    for p, v in ((experts.gate_up_proj_blocks, gb), (experts.gate_up_proj_scales, gs), (experts.down_proj_blocks, db),
                 (experts.down_proj_scales, ds)):  # fmt: skip
        p.data.copy_(v)
    experts.gate_up_proj_bias.data.normal_()
    experts.down_proj_bias.data.normal_()
    x = torch.randn(300, h, device="cuda", dtype=torch.bfloat16)
    idx = torch.randint(0, e, (300, 4), device="cuda")
    w = torch.softmax(torch.randn(300, 4, device="cuda"), -1).to(torch.bfloat16)
    experts.fused = False
    ref = experts(x, idx, w)
    experts.fused = True
    out = experts(x, idx, w)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


def test_a_capture_keeps_the_allocators_cached_blocks_and_replays_the_call():
    """torch.cuda.graph() would empty the cache first: the 256 MiB block freed below would be given back."""
    from lensrun.cuda_graphs import capture

    x = torch.randn(512, 512, device="cuda")
    spare = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    del spare  # cached, unused
    reserved = torch.cuda.memory_reserved()
    graph, out = capture(lambda: x @ x, torch.cuda.graph_pool_handle())
    assert torch.cuda.memory_reserved() >= reserved
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, x @ x)


def test_a_capture_that_needs_the_cached_blocks_empties_the_cache_and_succeeds():
    """During a capture the allocator cannot free cached blocks: the warm-up's own 256 MiB output, cached on the
    side stream, leaves no room under the limit for the graph's copy until the cache is emptied."""
    from lensrun.cuda_graphs import capture

    torch.cuda.empty_cache()
    mib = 2**20
    total = torch.cuda.get_device_properties(0).total_memory
    x = torch.randn(16 * mib, device="cuda")  # 64 MiB
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 448 * mib) / total)
    try:
        graph, out = capture(lambda: x.repeat(4), torch.cuda.graph_pool_handle())  # 256 MiB
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(out, x.repeat(4))


def test_a_failed_capture_reports_the_calls_error_and_leaves_the_stream_usable():
    from lensrun.cuda_graphs import GraphCache, capture

    x = torch.ones(8, device="cuda")
    cache = GraphCache(sightings=1)
    assert cache.get("k", lambda pool: capture(lambda: x.sum().item(), pool)) is None  # .item() syncs: not capturable
    assert cache.failed is not None and "previous error during capture" not in cache.failed  # fn's, not capture_end's
    assert (x * 2).sum().item() == 16
    assert cache.get("k", lambda pool: capture(lambda: x * 2, pool)) is None  # no more tries until reset


def test_graphed_encoder_equals_eager_and_reuses_one_graph_per_bucket(gpu_pipe):
    encoder = gpu_pipe.text_encoder
    gpu_pipe.apply_plan(Plan())
    ids = [torch.randint(0, encoder.config.vocab_size, (1, n)) for n in (7, 100, 128, 130)]
    masks = [torch.ones(1, i.shape[1], dtype=torch.long) for i in ids]
    eager = [encoder(i, m) for i, m in zip(ids, masks)]
    encoder.use_graphs = True
    try:
        for n in (0, 3):  # first sighting of each padded length (128, 256): eager, nothing captured
            encoder(ids[n], masks[n])
        assert not encoder._graphs
        graphed = [encoder(i, m) for i, m in zip(ids, masks)]
        again = encoder(ids[1], masks[1])  # replayed, not recaptured
        assert sorted(encoder._graphs.entries) == [(1, 128), (1, 256)]
    finally:
        gpu_pipe.apply_plan(Plan(placement="phased"))
        assert not encoder.use_graphs and not encoder._graphs  # a phased plan moves weights: no graphs
        gpu_pipe.apply_plan(Plan())
    for e, g in zip(eager, graphed):
        for a, b in zip(e, g):
            assert a.shape == b.shape
            torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-3)
    for a, b in zip(graphed[1], again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cfg", [5.0, 1.0])
def test_graphed_denoising_equals_the_python_loop(gpu_pipe, cfg):
    """The shape's second image is captured, later ones replay and refill it; all give the loop's latents."""
    gpu_pipe.apply_plan(Plan())
    run = lambda seed: gpu_pipe("a paper boat on a canal", seed=seed, guidance_scale=cfg, **SMALL).images
    eager = [run(1), run(2)]
    gpu_pipe.graph_steps = True
    try:
        loop_image = run(3)  # first sighting of the shape: the Python loop, nothing captured
        assert not gpu_pipe.step_graphs.graphs
        captured_image = run(3)  # second: captured, then replayed
        assert len(gpu_pipe.step_graphs.graphs) == 1
        torch.testing.assert_close(captured_image, loop_image, rtol=1e-4, atol=1e-4)
        graphed = [run(1), run(2)]  # replays of that graph with other inputs
        assert len(gpu_pipe.step_graphs.graphs) == 1
    finally:
        gpu_pipe.apply_plan(Plan(placement="phased"))
        assert not gpu_pipe.graph_steps and not gpu_pipe.step_graphs.graphs
        gpu_pipe.apply_plan(Plan())
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(graphed[0], graphed[1])


def test_server_plans_each_request_for_the_gpu(gpu_pipe, tmp_path):
    """The server's CUDA branch: a budget, a plan per request (CUDA graph pools counted when compiled)."""
    import base64
    import io
    import json

    from PIL import Image

    TestClient = pytest.importorskip("fastapi.testclient", reason="the serve extra (fastapi) is not installed").TestClient

    from lensrun.engine import Engine
    from lensrun.request import EngineOptions
    from lensrun.server import create_app

    gpu_pipe.apply_plan(Plan())
    engine = Engine(gpu_pipe, EngineOptions(model="tiny-random", vram="8GB", compile=False))
    with TestClient(create_app(engine, tmp_path)) as client:
        r = client.post("/v1/images/generations",
                        json={"prompt": "a kite", "size": "96x64", "response_format": "b64_json", "steps": 2, "seed": 1})  # fmt: skip
    gpu_pipe.apply_plan(Plan())
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert image.size == (96, 64)
    assert json.loads(image.text["lensrun-report"])["plan"].startswith("stream+bf16")


def test_engine_compiled_stream_plan_matches_resident(gpu_pipe):
    """Compiled before placement: a stream plan wraps the compiled blocks from outside and gives the resident
    image; the wrappers are gone once the plan is released."""
    from lensrun.engine import Engine
    from lensrun.placement import StreamedModule
    from lensrun.request import EngineOptions

    engine = Engine(gpu_pipe, EngineOptions(model="tiny-random", compile=True))
    request = engine.request(prompt="a lantern on a pier", seed=3, height=64, width=96, steps=3)
    try:
        [resident] = engine.run([Task(request)], plans=[Plan()])
        [streamed] = engine.run([Task(request)], plans=[Plan(placement="stream", stream_window=2)])
        assert streamed.report["plan"].startswith("stream") and streamed.report["compiled"]
    finally:
        gpu_pipe.apply_plan(Plan())
    assert not any(isinstance(b, StreamedModule) for b in gpu_pipe.transformer.transformer_blocks)
    import numpy as np

    a, b = np.asarray(resident.image, dtype=np.int16), np.asarray(streamed.image, dtype=np.int16)
    assert np.abs(a - b).max() <= 2


def test_background_compilation_on_cuda_switches_between_runs():
    """A real compilation on its side thread while a run goes eagerly on the GPU; the run after it is compiled
    and gives the eager image (within bf16 kernel differences)."""
    import numpy as np

    from lensrun import LensPipeline
    from lensrun.engine import Engine
    from lensrun.request import EngineOptions

    engine = Engine(LensPipeline.tiny_random(device="cuda"), EngineOptions(model="tiny-random", compile=True))
    request = engine.request(prompt="a lantern on a pier", seed=3, height=64, width=96, steps=3)
    engine.compile_ahead([request])
    [eager] = engine.run([Task(request)])
    assert engine.compiling is not None or engine.pipe.compiled
    if engine.compiling is not None:
        assert engine.compiling.wait(300) and engine.compiling.error is None
    [compiled] = engine.run([Task(request)])
    assert compiled.report["compiled"] and engine.pipe.compiled
    a, b = np.asarray(eager.image, dtype=np.int16), np.asarray(compiled.image, dtype=np.int16)
    assert np.abs(a - b).max() <= 2


def test_auto_attention_through_the_engine_is_recorded():
    from lensrun import LensPipeline, attention
    from lensrun.engine import Engine
    from lensrun.request import EngineOptions

    pipe = LensPipeline.tiny_random(device="cuda", dtype=torch.bfloat16)  # FlashAttention-3 computes in bf16
    engine = Engine(pipe, EngineOptions(model="tiny-random", compile=False))
    [result] = engine.run([Task(engine.request(prompt="a kite", seed=1, height=64, width=64, steps=2))])
    expected, _ = attention.resolve("auto", "bf16", torch.device("cuda"), engine.pipe.dtype)
    assert result.config["attention"] == expected == engine.pipe.transformer.attention_backend


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cfg_parallel_over_nccl_gives_the_one_gpu_image(tmp_path):
    import numpy as np
    from PIL import Image

    from lensrun import api

    options = {"model": "tiny-random", "height": 64, "width": 96, "steps": 3, "seed": 5, "compile": False}
    one = api.generate("a heron", out=tmp_path / "one", **options)
    two = api.generate("a heron", out=tmp_path / "two", gpus=2, **options)
    assert np.array_equal(np.asarray(Image.open(one[0])), np.asarray(Image.open(two[0])))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_an_asked_sequence_split_over_nccl_stays_close_to_the_one_gpu_image(tmp_path, png_psnr):
    """``--split sequence`` on two GPUs (Turbo-like, CFG 1), compiled: the exchanges inside the compiled blocks
    over NCCL; bf16 GEMMs over fewer rows may round differently, the issue's floor is 40 dB."""
    from lensrun import api

    options = {"model": "tiny-random", "height": 64, "width": 96, "steps": 3, "seed": 5, "cfg": 1.0, "compile": True}
    one = api.generate("a heron", out=tmp_path / "one", **options)
    two = api.generate("a heron", out=tmp_path / "two", gpus=2, split="sequence", **options)
    assert png_psnr(one[0], two[0]) >= 40


def test_the_gpu_thread_never_waits_for_the_gpu_in_a_warm_run():
    """Encoding new prompts, denoising, decoding: no synchronizing copy or call on the thread that feeds the GPU
    (torch's sync debug mode raises on one); the writer thread finishes each image from its CUDA event."""
    import numpy as np

    from lensrun import LensPipeline
    from lensrun.engine import Engine
    from lensrun.request import EngineOptions

    engine = Engine(LensPipeline.tiny_random(device="cuda", dtype=torch.bfloat16), EngineOptions(model="tiny-random", compile=False))
    requests = [engine.request(prompt=f"a kite number {i}", seed=i, height=64, width=64, steps=2) for i in range(3)]
    [alone] = engine.run([Task(requests[1])])  # warm: kernels, allocator, attention choice
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = engine.run([Task(r) for r in [requests[0], requests[2], requests[1]]], wait=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    engine.writer().submit(lambda: None).result()  # the writer is done with every image
    assert all(r.ok for r in results) and np.array_equal(np.asarray(results[2].image), np.asarray(alone.image))
    assert all(set(r.report["seconds"]) == {"encode", "denoise", "decode"} for r in results)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_replicas_on_two_gpus_in_two_threads_give_the_one_gpu_images():
    """A server's replicas: one engine per GPU, each driven from its own thread (whose current device is
    cuda:0 unless the engine sets its own)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from lensrun import LensPipeline
    from lensrun.engine import Engine
    from lensrun.request import EngineOptions

    engines = [
        Engine(LensPipeline.tiny_random(device=f"cuda:{i}", dtype=torch.bfloat16), EngineOptions(model="tiny-random", compile=False))
        for i in range(2)
    ]  # fmt: skip
    requests = [engines[0].request(prompt=f"a tram number {i}", seed=i, height=64, width=96, steps=3) for i in range(4)]
    [alone] = engines[0].run([Task(requests[3])])
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda e: e.run([Task(r) for r in requests]), engines))
    for results in runs:
        assert all(r.ok for r in results)
        assert np.array_equal(np.asarray(results[3].image), np.asarray(alone.image))


@pytest.mark.parametrize("backend", ["fa3", "fa3-fp8"])
def test_the_one_pass_inputs_give_the_unfused_image_compiled_and_replayed(backend):
    """FlashAttention fed by ``lensrun.joint_qkv`` inside the compiled blocks, through the Python step loop and
    a replayed step graph, against the same backend fed by Inductor's kernels (same weights, seed, prompt)."""
    from lensrun import LensPipeline, attention

    if not (attention.installed(backend) and attention.supported(backend, torch.device("cuda"))):
        pytest.skip("needs FlashAttention-3 on a Hopper GPU")
    images = {}
    for fused in (False, True):
        torch._dynamo.reset()
        pipe = LensPipeline.tiny_random(device="cuda", dtype=torch.bfloat16)
        pipe.transformer.set_attention_backend(backend)
        pipe.transformer.set_fused_attention_inputs(fused)
        pipe.optimize(compile=True)
        runs = [pipe("a red kite over dunes", seed=4, height=64, width=96, num_inference_steps=3, output_type="pt")
                for _ in range(3)]  # fmt: skip
        assert len(pipe.step_graphs.graphs) == 1  # the second run captured, the third replayed
        assert torch.equal(runs[1].images, runs[2].images)
        images[fused] = runs[2].images
    mse = float(((images[True] - images[False]) ** 2).mean())
    assert mse == 0 or 10 * torch.log10(torch.tensor(1 / mse)) >= (40 if backend == "fa3" else 30)


def test_the_decoder_runs_lensruns_group_norm_on_the_gpu(gpu_pipe, monkeypatch):
    """On a GPU the pipeline's VAE decoder goes through ``decoding.group_norm`` (torch's kernel is the slow part
    of an eager decode there) and decodes what torch's GroupNorm decodes, up to bf16 roundings."""
    from lensrun import decoding

    calls = []
    real = decoding.group_norm
    monkeypatch.setattr(decoding, "group_norm", lambda *a: calls.append(a[0].shape) or real(*a))
    z = torch.randn(1, gpu_pipe.vae.config.latent_channels, 8, 12, device="cuda", dtype=gpu_pipe.vae.dtype)
    with torch.inference_mode():
        ours = gpu_pipe.vae.decode(z).sample.float()
    assert len(calls) == sum(isinstance(m, torch.nn.GroupNorm) for m in gpu_pipe.vae.decoder.modules())
    monkeypatch.setattr(decoding, "group_norm", torch.nn.functional.group_norm)
    with torch.inference_mode():
        torchs = gpu_pipe.vae.decode(z).sample.float()
    torch.testing.assert_close(ours, torchs, atol=3e-2, rtol=3e-2)


def test_an_images_reported_peak_counts_its_encoding(gpu_pipe, monkeypatch):
    """A phased plan's peak is often the encoder's (GPT-OSS on the GPU alone); the engine resets the peak per
    size group, and the report must still count the encoding the image needed."""
    import contextlib
    import time

    inner = gpu_pipe.encoding_phase

    @contextlib.contextmanager
    def heavy_encoding(prompts):
        with inner(prompts):
            weight = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")  # stands in for the encoder
            yield
            del weight

    monkeypatch.setattr(gpu_pipe, "encoding_phase", heavy_encoding)
    gpu_pipe.prompt_cache._memory.clear()
    engine = _engine(gpu_pipe)
    request = engine.request(prompt=f"a heron in fog {time.time()}", seed=5, height=64, width=96, steps=2)  # not cached
    try:
        [result] = engine.run([Task(request)], plans=[Plan(placement="phased")])
    finally:
        gpu_pipe.apply_plan(Plan())
    assert result.error is None and result.report["plan"].startswith("phased")
    assert result.report["peak_allocated_gib"] >= 0.5
