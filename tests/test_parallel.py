"""One image on two devices (CFG-parallel over torch.distributed), proven on the CPU with gloo: two spawned
worker processes give exactly the single-process image."""

import numpy as np
import pytest
from PIL import Image

from lensrun import api
from lensrun.errors import LensrunError
from lensrun.metadata import read_config
from lensrun.parallel import check_gpus

TINY = {"model": "tiny-random", "device": "cpu", "height": 32, "width": 48, "steps": 3}


def test_cfg_parallel_on_two_processes_gives_the_single_process_image(tmp_path):
    prompts = ["a red fox in snow", "a lighthouse"]
    one = api.generate(prompts, out=tmp_path / "one", seed=3, negative_prompt="blurry", **TINY)
    two = api.generate(prompts, out=tmp_path / "two", seed=3, negative_prompt="blurry", gpus=2, **TINY)
    assert [p.name for p in one] == [p.name for p in two]
    for a, b in zip(one, two, strict=True):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
        assert read_config(a) == read_config(b)  # the recipe does not depend on the GPU count


def test_cfg_one_runs_on_one_device(tmp_path):
    said = []
    paths = api.generate("a kite", out=tmp_path, cfg=1.0, gpus=2, notify=said.append, **TINY)
    assert paths[0].is_file() and any("no second branch to split" in m for m in said)


@pytest.mark.parametrize(
    ("gpus", "device", "message"),
    [
        (3, None, "more needs sequence parallelism"),
        (2, "cuda:1", "leave --device out"),
        (0, None, "gpus must be 1 or more"),
    ],
)
def test_bad_gpu_counts_are_refused_before_any_work(gpus, device, message):
    with pytest.raises(LensrunError, match=message):
        check_gpus(gpus, device)


def test_gallery_and_server_say_they_run_on_one_gpu(tmp_path):
    (tmp_path / "g.txt").write_text("a fox\n")
    with pytest.raises(LensrunError, match="a gallery runs on one GPU for now"):
        api.gallery(tmp_path / "g.txt", out=tmp_path / "g", gpus=2, **{k: v for k, v in TINY.items() if k in ("model", "device")})
