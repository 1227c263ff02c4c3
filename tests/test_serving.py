"""The server's worker under load, on the tiny model: queued jobs of one kind share an engine run and still get
exactly their own images; a request never waits for a compilation (it runs eagerly meanwhile)."""

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from lensrun import LensPipeline, background_compile
from lensrun.engine import Cancelled, Engine, Task
from lensrun.request import EngineOptions
from lensrun.server import Job, Worker


@pytest.fixture(scope="module")
def pipe():
    return LensPipeline.tiny_random(device="cpu")


def _wait(job: Job, seconds: float = 60) -> None:
    assert job.done.wait(seconds), f"job {job.id} did not finish: {job.status}"
    assert job.status == "succeeded", job.error


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_queued_jobs_of_one_kind_share_a_run_and_keep_their_own_images(pipe, tmp_path):
    engine = Engine(pipe, EngineOptions(model="tiny-random", device="cpu"))
    runs: list[list[tuple[int, int, int]]] = []
    original = engine.run

    def recording(tasks, **kwargs):
        runs.append([(t.request.height, t.request.width, t.request.seed) for t in tasks])
        return original(tasks, **kwargs)

    engine.run = recording
    worker = Worker(engine, tmp_path / "files")
    same = [engine.request(prompt=f"fox {i}", height=32, width=48, steps=2, seed=10 + i, n=1 + i % 2) for i in range(3)]
    other = engine.request(prompt="a lake", height=48, width=32, steps=2, seed=7)
    with worker.ready:  # the worker cannot take a job until every job is queued
        jobs = [Job(same[0], "url"), Job(other, "url"), Job(same[1], "url"), Job(same[2], "url")]
        for job in jobs:
            worker.submit(job)
    for job in jobs:
        _wait(job)
    worker.shutdown()
    # One run for the three jobs of one kind (4 images, FIFO among them; the second job's n=2 takes seeds 11
    # and 12), then the other job.
    assert runs == [[(32, 48, 10), (32, 48, 11), (32, 48, 12), (32, 48, 12)], [(48, 32, 7)]]
    assert [len(job.files) for job in jobs] == [1, 1, 2, 1]
    assert all(job.step == job.total == 2 * job.request.n for job in jobs)  # progress counted per job
    engine.run = original
    for job in jobs:
        alone = [Task(single, path=tmp_path / "alone" / f"{job.id}-{i}.png") for i, single in enumerate(job.request.images())]
        engine.run(alone)
        for task, file_id in zip(alone, job.files, strict=True):
            assert np.array_equal(_pixels(task.path), _pixels(tmp_path / "files" / f"{file_id}.png"))


def test_a_request_is_not_held_behind_a_compilation(pipe, tmp_path, monkeypatch):
    """While the blocks compile on the side thread, requests of new shapes run eagerly and finish; the next
    run after the compilation is compiled."""
    real_compile, release, started = torch.compile, threading.Event(), threading.Event()
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager"))
    real_warm = background_compile.warm_up

    def slow_warm_up(*args):
        started.set()
        assert release.wait(60)
        real_warm(*args)

    monkeypatch.setattr(background_compile, "warm_up", slow_warm_up)
    fresh = LensPipeline.tiny_random(device="cpu")
    engine = Engine(fresh, EngineOptions(model="tiny-random", device="cpu", compile=True))
    worker = Worker(engine, tmp_path)
    engine.compile_ahead([engine.request(prompt="warm-up", height=32, width=32, steps=2)])
    assert started.wait(30) and engine.compiling is not None
    first = [Job(engine.request(prompt="p", height=h, width=w, steps=2), "url") for h, w in ((32, 48), (64, 32))]
    for job in first:
        worker.submit(job)
    for job in first:
        _wait(job)  # done although the compilation has not finished
    assert not engine.compiling.ready() and not fresh.compiled
    assert all(job.report["compiled"] is False for job in first)
    release.set()
    assert engine.compiling.wait(60) and engine.compiling.error is None
    later = Job(engine.request(prompt="p", height=48, width=48, steps=2), "url")
    worker.submit(later)
    _wait(later)
    worker.shutdown()
    assert later.report["compiled"] is True and fresh.compiled


def test_a_failed_background_compilation_leaves_the_server_eager(pipe, tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(background_compile, "warm_up", broken)
    fresh = LensPipeline.tiny_random(device="cpu")
    engine = Engine(fresh, EngineOptions(model="tiny-random", device="cpu", compile=True))
    messages: list[str] = []
    engine.compile_ahead([engine.request(prompt="w", height=32, width=32, steps=2)], wait=True, notify=messages.append)
    assert "background compilation failed (RuntimeError: inductor exploded); staying eager" in messages
    assert fresh.transformer.compiled_gate is None  # not reopened by a later compiled run
    results = engine.run([Task(engine.request(prompt="p", height=32, width=32, steps=2))])
    assert results[0].ok and results[0].report["compiled"] is False and not fresh.compiled


def test_png_writes_leave_the_gpu_thread(pipe, tmp_path, monkeypatch):
    """PNGs are written on the engine's writer thread; run() returns once they are on disk."""
    import lensrun.metadata as md

    threads, real = [], md.save_png

    def recording(*args, **kwargs):
        time.sleep(0.05)
        threads.append(threading.current_thread().name)
        real(*args, **kwargs)

    monkeypatch.setattr(md, "save_png", recording)
    engine = Engine(pipe, EngineOptions(model="tiny-random", device="cpu"))
    tasks = [Task(engine.request(prompt="p", height=32, width=32, steps=1, seed=s), path=tmp_path / f"{s}.png") for s in range(3)]
    results = engine.run(tasks)
    assert all(r.ok and r.task.path.is_file() for r in results)
    assert len(threads) == 3 and all(name.startswith("lensrun-writer") for name in threads)


def test_replicas_take_batches_from_one_queue_and_keep_each_image(tmp_path):
    """Two engines (one per GPU in production; two CPU engines here), one worker thread each: jobs of different
    kinds run side by side, each image the one its request gets alone."""
    engines = [Engine(LensPipeline.tiny_random(device="cpu"), EngineOptions(model="tiny-random", device="cpu")) for _ in range(2)]
    used: list[tuple[str, int]] = []
    for number, engine in enumerate(engines):
        original = engine.run

        def recording(tasks, _original=original, _number=number, **kwargs):
            used.append((threading.current_thread().name, _number))
            return _original(tasks, **kwargs)

        engine.run = recording
    worker = Worker(engines, tmp_path / "files")
    sizes = [(32, 32), (32, 48), (48, 32), (48, 48)]
    jobs = [Job(engines[0].request(prompt=f"p{i}", height=h, width=w, steps=2, seed=i), "url") for i, (h, w) in enumerate(sizes)]
    with worker.ready:
        for job in jobs:
            worker.submit(job)
    for job in jobs:
        _wait(job)
    worker.shutdown()
    assert {number for _, number in used} == {0, 1}  # both replicas worked
    assert all(name == f"lensrun-worker-{number}" for name, number in used)  # each on its own thread
    alone = Engine(LensPipeline.tiny_random(device="cpu"), EngineOptions(model="tiny-random", device="cpu"))
    for job in jobs:
        task = Task(job.request.images()[0], path=tmp_path / "alone" / f"{job.id}.png")
        alone.run([task])
        assert np.array_equal(_pixels(task.path), _pixels(tmp_path / "files" / f"{job.files[0]}.png"))


def test_a_replica_process_serves_batches_with_progress_and_the_images_of_one_engine(tmp_path):
    """``serve --replicas 2``: the second engine in a spawned process (here on the CPU) takes batches from the one
    queue; each job gets its progress and its image (identical to the in-process engine's); a cancelled batch
    stops; closing ends the process."""
    from lensrun.replicas import RemoteEngine

    options = EngineOptions(model="tiny-random", device="cpu")
    local = Engine(LensPipeline.tiny_random(device="cpu"), options)
    first = local.request(prompt="warm-up", height=32, width=32, steps=2).images()
    remote = RemoteEngine(options, "cpu", first, warmup=False, notify=lambda message: None)
    remote.wait_ready()
    ran_remotely: list[int] = []
    original = remote.run
    remote.run = lambda tasks, **kwargs: ran_remotely.append(len(tasks)) or original(tasks, **kwargs)
    worker = Worker([local, remote], tmp_path / "files")
    sizes = [(32, 32), (32, 48), (48, 32), (48, 48), (32, 32), (48, 48)]
    jobs = [Job(local.request(prompt=f"p{i}", height=h, width=w, steps=2, seed=i), "url") for i, (h, w) in enumerate(sizes)]
    with worker.ready:
        for job in jobs:
            worker.submit(job)
    for job in jobs:
        _wait(job, 120)
    assert ran_remotely and all(job.step == job.total == 2 and job.report["plan"] for job in jobs)
    for job in jobs:
        task = Task(job.request.images()[0], path=tmp_path / "alone" / f"{job.id}.png")
        local.run([task])
        assert np.array_equal(_pixels(task.path), _pixels(tmp_path / "files" / f"{job.files[0]}.png"))
    with pytest.raises(Cancelled):
        original([Task(local.request(prompt="stop me", height=32, width=32, steps=50).images()[0], tmp_path / "x.png")],
                   should_stop=lambda: True)  # fmt: skip
    remote.process.kill()  # a replica lost (killed, out of host memory): the other engine takes the work
    remote.process.join(30)
    deadline = time.time() + 30
    while remote.alive and time.time() < deadline:
        time.sleep(0.05)
    assert not remote.alive
    later = [Job(local.request(prompt=f"q{i}", height=32, width=32, steps=2, seed=i), "url") for i in range(3)]
    with worker.ready:
        for job in later:
            worker.submit(job)
    for job in later:
        _wait(job, 120)
    worker.shutdown()
    assert not remote.process.is_alive()


def test_a_replica_that_cannot_load_says_why():
    from lensrun.errors import LensrunError
    from lensrun.replicas import RemoteEngine
    from lensrun.request import GenerationRequest

    first = GenerationRequest.build(prompt="warm-up", height=32, width=32, steps=2).images()
    remote = RemoteEngine(EngineOptions(model="/nowhere/Lens", device="cpu"), "cpu", first, warmup=False, notify=print)
    with pytest.raises(LensrunError, match="replica on cpu: .*nowhere"):
        remote.wait_ready()
    remote.process.join(30)
    assert not remote.process.is_alive()

def test_a_child_process_fills_empty_compile_caches_that_the_side_thread_then_reads(tmp_path, monkeypatch):
    """Empty caches: a child process compiles a one-block DiT of the same config (no interpreter lock shared
    with the serving thread); the side thread's own compilation then finds every graph in the caches."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # empty; the child inherits it
    torch._dynamo.reset()
    counters.clear()
    try:
        job = background_compile.BackgroundCompile(LensPipeline.tiny_random(device="cpu"), fill_caches_first=True)
        assert job.wait(600) and job.error is None and job.child.returncode == 0
        assert counters["inductor"]["fxgraph_cache_hit"] >= 2 and counters["inductor"]["fxgraph_cache_miss"] == 0
    finally:
        torch._dynamo.reset()

def test_replica_devices_are_checked_before_loading():
    from lensrun.errors import LensrunError
    from lensrun.parallel import device_per_gpu

    assert device_per_gpu("--replicas", 3, "cpu") == ["cpu", "cpu", "cpu"] and device_per_gpu("--replicas", 1, None) == [None]
    with pytest.raises(LensrunError, match="leave --device out"):
        device_per_gpu("--replicas", 2, "cuda:1")
    with pytest.raises(LensrunError, match="needs 64 GPUs"):
        device_per_gpu("--replicas", 64, None)
