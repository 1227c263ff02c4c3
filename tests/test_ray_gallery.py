"""A gallery over Ray workers on the CPU (two engines, tiny model): the one-engine gallery's images and
manifest, resume, and a worker killed mid-run whose images are made again by a new one — nothing duplicated,
nothing half-written."""

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")

from lensrun import api
from lensrun import gallery as g

PROMPTS = "a red fox\na lighthouse\na kite over dunes\na teapot\na glacier\n"
TINY = {"model": "tiny-random", "device": "cpu", "height": 32, "width": 48, "steps": 2}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _pixels(path):
    return np.asarray(Image.open(path))


def _done(out):
    return {r["hash"]: r for r in g.read_manifest(out) if r["status"] == "done"}


def test_ray_gallery_equals_the_one_engine_gallery_and_resumes(local_ray, tmp_path):
    import torch

    (tmp_path / "g.txt").write_text(PROMPTS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a one-CPU Ray actor: CPU matmuls split their sums by thread count
    try:
        one = api.gallery(tmp_path / "g.txt", out=tmp_path / "one", **TINY)
    finally:
        torch.set_num_threads(threads)
    two = api.gallery(tmp_path / "g.txt", out=tmp_path / "two", ray="local", workers=2, **TINY)
    assert (one["done"], two["done"], two["failed"]) == (5, 5, 0)
    rows_one, rows_two = _done(tmp_path / "one"), _done(tmp_path / "two")
    assert rows_one.keys() == rows_two.keys() and len(g.read_manifest(tmp_path / "two")) == 5
    for digest, row in rows_one.items():
        assert rows_two[digest]["file"] == row["file"]
        assert np.array_equal(_pixels(tmp_path / "one" / row["file"]), _pixels(tmp_path / "two" / row["file"]))
    assert (tmp_path / "two" / "index.html").is_file()
    again = api.gallery(tmp_path / "g.txt", out=tmp_path / "two", ray="local", workers=2, **TINY)
    assert (again["done"], again["skipped"]) == (0, 5)


def test_a_worker_killed_mid_run_is_replaced_and_nothing_is_duplicated(local_ray, tmp_path):
    from lensrun.gallery import load_gallery
    from lensrun.ray_gallery import run_gallery_ray
    from lensrun.request import EngineOptions

    (tmp_path / "g.txt").write_text(PROMPTS)
    killed = []

    def kill_first(actor, tasks):
        if not killed:
            killed.append([t.path.name for t in tasks])
            ray.kill(actor, no_restart=True)

    said = []
    entries = load_gallery(tmp_path / "g.txt", {k: TINY[k] for k in ("height", "width", "steps")})
    options = EngineOptions(model="tiny-random", device="cpu").resolved()
    summary = run_gallery_ray(options, entries, tmp_path / "out", workers=2, notify=said.append, on_submit=kill_first)
    assert summary["done"] == 5 and summary["failed"] == 0
    rows = g.read_manifest(tmp_path / "out")
    assert len(rows) == 5 and len({r["hash"] for r in rows}) == 5  # each image recorded once
    assert all((tmp_path / "out" / name).is_file() for name in killed[0])  # the killed worker's images were redone
    assert not list((tmp_path / "out").rglob("*.tmp"))
    assert any("a worker was lost" in m for m in said)


def test_a_worker_decides_compilation_on_its_share_of_the_gallery_not_on_one_chunk(tmp_path, monkeypatch):
    """Chunks of CHUNK_IMAGES alone would never repay compiling; the actor decides once, on its share."""
    from lensrun import compile_policy
    from lensrun.gallery import GalleryRun, load_gallery
    from lensrun.ray_gallery import CHUNK_IMAGES, GalleryWorker
    from lensrun.request import EngineOptions

    seen: list[int] = []
    decide = compile_policy.decide
    monkeypatch.setattr(compile_policy, "decide", lambda asked, dev, seconds, *a: seen.append(len(seconds)) or decide(asked, dev, seconds, *a))
    (tmp_path / "g.txt").write_text("\n".join(f"a red fox number {i}" for i in range(3 * CHUNK_IMAGES)))
    engine_keys = ("model", "device")
    options = EngineOptions(**{k: v for k, v in TINY.items() if k in engine_keys})
    sizes = {k: v for k, v in TINY.items() if k not in engine_keys}
    run = GalleryRun.start(options, load_gallery(tmp_path / "g.txt", defaults=sizes), tmp_path / "out")
    share = [single for _, single, _, _ in run.pending]
    worker = GalleryWorker(options, share)
    rows = worker.run(run.tasks(run.pending[:CHUNK_IMAGES]))
    assert all(r["ok"] for r in rows)
    assert seen[0] == len(share) == 3 * CHUNK_IMAGES  # the first decision saw the whole share
