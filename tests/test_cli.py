"""`lensrun generate` / `lensrun replay`: outputs with their config, exact replays, and clean errors."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lensrun import api
from lensrun.cli import _parser, main

TINY = ["--model", "tiny-random", "--height", "32", "--width", "48", "--steps", "2"]


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _paths(stdout: str) -> list[str]:
    """Each output line is 'PATH  plan=… times…'."""
    return [line.split()[0] for line in stdout.splitlines()]


def test_generate_writes_png_with_config_and_replays_exactly(tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = _run(["generate", "--prompt", "a red fox", "--seed", "5", "--out", str(out), *TINY], capsys)
    assert code == 0, err
    assert "images are noise" in err and "plan resident+bf16: CPU run" in err
    files = sorted(out.glob("*.png"))
    assert [str(f) for f in files] == _paths(stdout)
    assert "plan=resident+bf16" in stdout and "denoise=" in stdout
    image = Image.open(files[0])
    config = json.loads(image.text["lensrun"])
    assert config["prompt"] == "a red fox" and config["seed"] == 5 and config["steps"] == 2
    assert (config["height"], config["width"], config["model"]) == (32, 48, "tiny-random")
    assert config["template_date"] == "2026-05-23" and config["noise"] == "cpu"
    assert image.text["parameters"].startswith("a red fox\nNegative prompt: \nSteps: 2,")
    assert "Seed: 5" in image.text["parameters"]

    code, stdout, err = _run(["replay", str(files[0]), "--out", str(tmp_path / "again")], capsys)
    assert code == 0, err
    replayed = Image.open(_paths(stdout)[0])
    assert np.array_equal(np.asarray(replayed), np.asarray(image))
    assert json.loads(replayed.text["lensrun"]) == config


def test_random_seed_recorded_and_several_prompts(tmp_path, capsys):
    argv = ["generate", "--prompt", "a", "--prompt", "b", "--n", "2", "--seed", "-1", "--out", str(tmp_path), *TINY]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    paths = _paths(stdout)
    assert len(paths) == 4
    seeds = [json.loads(Image.open(p).text["lensrun"])["seed"] for p in paths]
    assert seeds == list(range(seeds[0], seeds[0] + 4))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--aspect-ratio", "5:4"], "unknown aspect ratio '5:4': choose one of 1:2, 9:16, 2:3, 3:4, 1:1"),
        (["--height", "100", "--width", "64"], "height 100 is not a positive multiple of 16"),
        (["--height", "64"], "give both height and width"),
        (["--base-resolution", "768"], "base resolution 768 is not supported: choose 1024 or 1440"),
        (["--steps", "0"], "steps must be an integer ≥ 1, got 0"),
        (["--cfg", "nan"], "cfg must be a finite number ≥ 0, got nan"),
        (["--cfg", "-1"], "cfg must be a finite number ≥ 0, got -1.0"),
        (["--n", "0"], r"n \(images per prompt\) must be an integer ≥ 1, got 0"),
        (["--model", "./missing/model"], "model folder not found: ./missing/model"),
        (["--template-date", "yesterday"], "template date must look like YYYY-MM-DD"),
    ],
)
def test_bad_input_is_refused_before_work(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    argv = ["generate", "--prompt", "x", "--model", "tiny-random", "--out", str(out), *extra]
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert "lensrun: error:" in err and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert not out.exists()


@pytest.mark.parametrize("damage, message", [("subfolder", "missing subfolder 'vae/'"), ("pickle", "refusing to load"),
                                             ("shape", "'img_in.weight' has shape")])  # fmt: skip
def test_bad_checkpoint_is_refused_by_cli(tiny_checkpoint, tmp_path, capsys, damage, message):
    from safetensors.torch import load_file, save_file

    root = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, root)
    if damage == "subfolder":
        shutil.rmtree(root / "vae")
    elif damage == "pickle":
        for f in (root / "transformer").glob("*.safetensors"):
            f.unlink()
        (root / "transformer" / "pytorch_model.bin").write_bytes(b"x")
    else:
        for f in (root / "transformer").glob("*.safetensors"):
            tensors = load_file(f)
            if "img_in.weight" in tensors:
                tensors["img_in.weight"] = tensors["img_in.weight"][:, :64].contiguous()
                save_file(tensors, f)
    out = tmp_path / "out"
    code, _, err = _run(["generate", "--prompt", "x", "--model", str(root), "--out", str(out)], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_every_cli_option_is_an_api_keyword():
    import inspect

    gen = next(a for a in _parser()._subparsers._group_actions[0].choices.items() if a[0] == "generate")[1]
    options = {a.dest for a in gen._actions if a.dest != "help"}
    keywords = set(inspect.signature(api.generate).parameters)
    assert options <= keywords, options - keywords


def test_module_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lensrun", "generate", "--prompt", "x", "--seed", "1", "--out", str(tmp_path), *TINY],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(list(tmp_path.glob("*.png"))) == 1


def test_failed_write_leaves_no_file(tmp_path):
    from lensrun.metadata import write_atomic

    target = tmp_path / "img.png"

    def broken(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, broken)
    assert list(tmp_path.iterdir()) == []
