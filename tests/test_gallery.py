"""`lensrun gallery`: file formats, validation, phase batching, resume, failures, atomic writes, the page."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lensrun.gallery as g
from lensrun import LensrunError, api
from lensrun.cli import main

TOML = """
[defaults]
height = 32
width = 48
steps = 2

[[image]]
name = "fox"
prompt = "a red fox <script>alert(1)</script>"
n = 2

[[image]]
name = "lake"
prompt = "a mountain lake"
cfg = 1.0
seed = 7
"""


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def _run(path, out, **kw):
    return api.gallery(path, out=out, model="tiny-random", device="cpu", **kw)


def _engine():
    """The engine the gallery runs on (the process's shared one for the tiny model on the CPU)."""
    from lensrun.engine import Engine
    from lensrun.request import EngineOptions

    return Engine.shared(EngineOptions(model="tiny-random", device="cpu"))


def test_three_formats(tmp_path):
    toml = g.load_gallery(_write(tmp_path, "g.toml", TOML))
    as_dict = {"defaults": {"height": 32, "width": 48, "steps": 2},
               "image": [{"name": "fox", "prompt": "a red fox <script>alert(1)</script>", "n": 2},
                         {"name": "lake", "prompt": "a mountain lake", "cfg": 1.0, "seed": 7}]}  # fmt: skip
    js = g.load_gallery(_write(tmp_path, "g.json", json.dumps(as_dict)))
    as_list = [{**e, **as_dict["defaults"]} for e in as_dict["image"]]
    js_list = g.load_gallery(_write(tmp_path, "l.json", json.dumps(as_list)))
    assert [e.settings for e in toml] == [e.settings for e in js] == [e.settings for e in js_list]
    text = g.load_gallery(_write(tmp_path, "p.txt", "# comment\na fox\n\na lake\n"), {"steps": 3})
    assert [(e.name, e.settings["prompt"], e.settings["steps"]) for e in text] == [("line-2", "a fox", 3), ("line-4", "a lake", 3)]
    # An entry without a seed gets a fixed one derived from its name and prompt.
    assert toml[0].settings["seed"] == g.seed_for("fox", "a red fox <script>alert(1)</script>")


def test_validation_names_every_bad_entry_before_running(tmp_path):
    bad = """
[[image]]
name = "one"
prompt = "x"
aspect_ratio = "5:4"

[[image]]
prompt = "y"
colour = "red"

[[image]]
name = "three"
steps = 0
prompt = "z"

[[image]]
name = "one"
prompt = "again"
"""
    out = tmp_path / "out"
    with pytest.raises(LensrunError) as err:
        _run(_write(tmp_path, "bad.toml", bad), out)
    message = str(err.value)
    assert "entry 1 ('one'): unknown aspect ratio '5:4'" in message
    assert "entry 2: unknown key(s) ['colour']" in message
    assert "entry 3 ('three'): steps must be an integer ≥ 1" in message
    assert "entry 4 ('one'): duplicate name" in message
    assert not out.exists()


def test_text_file_line_numbers_in_errors(tmp_path):
    with pytest.raises(LensrunError, match=r"line 2 \('line-2'\): steps must be"):
        g.load_gallery(_write(tmp_path, "p.txt", "\nprompt\n"), {"steps": -3})


def test_run_resume_and_replay(tmp_path):
    path, out = _write(tmp_path, "g.toml", TOML), tmp_path / "out"
    summary = _run(path, out)
    assert (summary["done"], summary["skipped"], summary["failed"]) == (3, 0, 0)
    rows = g.read_manifest(out)
    assert [r["name"] for r in rows] == ["fox", "fox", "lake"] and all(r["status"] == "done" for r in rows)
    assert [r["config"]["seed"] for r in rows[:2]] == [rows[0]["config"]["seed"], rows[0]["config"]["seed"] + 1]
    stamps = {f.name: f.stat().st_mtime_ns for f in out.glob("*.png")}
    again = _run(path, out)
    assert (again["done"], again["skipped"]) == (0, 3)
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("*.png")} == stamps
    # A manifest row replays to the same pixels; so does the PNG.
    lake = out / next(r["file"] for r in rows if r["name"] == "lake")
    from_row = api.replay(out / "manifest.jsonl", entry="lake", out=tmp_path / "r1", device="cpu")
    from_png = api.replay(lake, out=tmp_path / "r2", device="cpu")
    original = np.asarray(Image.open(lake))
    assert np.array_equal(np.asarray(Image.open(from_row)), original)
    assert np.array_equal(np.asarray(Image.open(from_png)), original)
    # And the gallery image equals what `generate` makes from the same settings.
    gen = api.generate("a mountain lake", model="tiny-random", device="cpu", height=32, width=48, steps=2, cfg=1.0,
                       seed=7, out=tmp_path / "gen")  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(gen[0])), original)


def test_failing_entry_does_not_stop_the_others(tmp_path, monkeypatch):
    path, out = _write(tmp_path, "g.toml", TOML), tmp_path / "out"
    pipe = _engine().pipe
    original = pipe.denoise

    def broken(x, cond, uncond, req, *a, **k):
        if req.prompts[0] == "a mountain lake":
            raise RuntimeError("boom")
        return original(x, cond, uncond, req, *a, **k)

    monkeypatch.setattr(pipe, "denoise", broken)
    summary = _run(path, out)
    assert (summary["done"], summary["failed"]) == (2, 1)
    failed = [r for r in g.read_manifest(out) if r["status"] == "failed"]
    assert failed[0]["name"] == "lake" and failed[0]["error"] == "RuntimeError: boom"
    monkeypatch.setattr(pipe, "denoise", original)
    retry = _run(path, out)
    assert (retry["done"], retry["skipped"], retry["failed"]) == (1, 2, 0)


def test_interrupt_leaves_no_partial_files(tmp_path, monkeypatch):
    import lensrun.metadata as md

    path, out = _write(tmp_path, "g.toml", TOML), tmp_path / "out"
    real = md.save_png
    calls = []

    def interrupted(image, target, config, report=None):
        if calls:
            def torn(f):
                f.write(b"\x89PNG partial")
                raise KeyboardInterrupt

            md.write_atomic(target, torn)
        calls.append(target)
        real(image, target, config, report)

    monkeypatch.setattr(md, "save_png", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(path, out)
    assert not list(out.rglob("*.tmp")) and [p.name for p in out.glob(".*")] == [g.WORK_FOLDER]
    assert len(list(out.glob("*.png"))) == 1 and len(g.read_manifest(out)) == 1
    # The two images denoised but not yet written wait as latents; the re-run decodes them without denoising.
    assert len(list((out / g.WORK_FOLDER).glob("*.safetensors"))) == 2
    monkeypatch.setattr(md, "save_png", real)
    pipe = _engine().pipe
    denoised = []
    original = pipe.denoise
    monkeypatch.setattr(pipe, "denoise", lambda *a, **k: denoised.append(1) or original(*a, **k))
    summary = _run(path, out)
    assert (summary["done"], summary["skipped"]) == (2, 1) and denoised == []
    assert not (out / g.WORK_FOLDER).exists()
    # Resumed images are the images an uninterrupted run makes.
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(pipe, "denoise", original)
    _run(path, fresh)
    for row in g.read_manifest(out):
        assert np.array_equal(np.asarray(Image.open(out / row["file"])), np.asarray(Image.open(fresh / row["file"])))


def test_out_of_memory_falls_back_to_the_next_plan(tmp_path, monkeypatch):
    """An OOM while denoising one image: the engine frees, applies the next plan and redoes that image; the
    gallery finishes every image and the manifest says which plan made it and what failed before."""
    import torch

    import lensrun.engine as engine_module
    from lensrun.memory import Plan

    plans = [Plan(), Plan(vae_tiling=True)]
    monkeypatch.setattr(engine_module, "plans_for", lambda *a, **k: (list(plans), "two test plans"))
    pipe = _engine().pipe
    original, calls = pipe.denoise, []

    def once_oom(x, cond, uncond, req, *a, **k):
        calls.append(req.seed)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB (injected)")
        return original(x, cond, uncond, req, *a, **k)

    monkeypatch.setattr(pipe, "denoise", once_oom)
    messages = []
    path, out = _write(tmp_path, "g.toml", TOML), tmp_path / "out"
    summary = api.gallery(path, out=out, model="tiny-random", device="cpu", notify=messages.append)
    assert (summary["done"], summary["failed"]) == (3, 0)
    assert len(calls) == 4 and calls[1] == calls[2]  # the failed image is redone, the others once each
    assert "out of memory under plan resident+bf16; retrying with resident+bf16+vae-tiled" in messages
    rows = g.read_manifest(out)
    # A resident plan decodes each image right after it is denoised: the first was finished before the OOM.
    assert [r["report"]["plan"] for r in rows] == ["resident+bf16"] + ["resident+bf16+vae-tiled"] * 2
    assert [r["config"]["vae_tiling"] for r in rows] == [False, True, True]
    assert rows[1]["report"]["fallbacks"] == [
        "resident+bf16: CUDA out of memory. Tried to allocate 9.00 GiB (injected)"
    ] and rows[0]["report"]["fallbacks"] == rows[2]["report"]["fallbacks"] == []
    pipe.apply_plan(Plan())


def test_index_escapes_and_cli_summary(tmp_path, capsys):
    path, out = _write(tmp_path, "g.toml", TOML), tmp_path / "out"
    code = main(["gallery", str(path), "--out", str(out), "--model", "tiny-random", "--device", "cpu"])
    assert code == 0
    assert "done 3, skipped 0, failed 0" in capsys.readouterr().out
    page = (out / "index.html").read_text()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("<figure") == 3 and "steps 2, cfg 5, seed" in page and "plan resident+bf16" in page
    assert "http://" not in page and "https://" not in page


def test_example_gallery_is_valid():
    entries = g.load_gallery(Path(__file__).parents[1] / "examples" / "gallery.toml")
    assert len(entries) == 12
    by_name = {e.name: e.settings for e in entries}
    assert by_name["fox-watercolor"]["steps"] == 22 and by_name["photoreal-landscape-rerun"]["cfg"] == 4.5
    assert sum(s["base_resolution"] == 1440 for s in by_name.values()) == 3
    assert all(isinstance(s["seed"], int) for s in by_name.values())


def test_index_in_a_browser(tmp_path, chrome):
    from selenium.webdriver.support.ui import WebDriverWait

    out = tmp_path / "out"
    _run(_write(tmp_path, "g.toml", TOML), out)
    chrome.get((out / "index.html").as_uri())
    chrome.execute_script("document.querySelectorAll('img').forEach(i => i.loading = 'eager')")
    loaded = "return [...document.images].every(i => i.complete && i.naturalWidth > 0) && document.images.length"
    WebDriverWait(chrome, 30).until(lambda d: d.execute_script(loaded))
    assert chrome.execute_script("return document.images.length") == 3
    captions = chrome.execute_script("return [...document.querySelectorAll('figcaption')].map(c => c.innerText)")
    assert len(captions) == 3 and all("seed" in c and "steps 2" in c for c in captions)
    assert any("<script>alert(1)</script>" in c for c in captions)  # shown as text, not run
    shot = tmp_path / "gallery.png"
    chrome.save_screenshot(str(shot))
    assert Image.open(shot).size[0] > 0


def test_edited_gallery_follows_the_current_file(tmp_path):
    """One seed changed: the index shows the new image as current and the old one apart, marked superseded;
    --entry finds the current one; an unknown entry lists the entries; captions carry the negative prompt."""
    path, out = _write(tmp_path, "g.toml", TOML.replace('seed = 7', 'seed = 7\nnegative_prompt = "fog"')), tmp_path / "out"
    _run(path, out)
    old_lake = next(r["file"] for r in g.read_manifest(out) if r["name"] == "lake")
    _write(tmp_path, "g.toml", TOML.replace("seed = 7", 'seed = 8\nnegative_prompt = "fog"'))
    summary = _run(path, out)
    assert (summary["done"], summary["skipped"]) == (1, 2)
    page = (out / "index.html").read_text()
    current, superseded = page.split('<details id="superseded">')
    assert current.count("<figure") == 3 and superseded.count("<figure") == 1
    assert old_lake in superseded and old_lake not in current and "seed 8" in current
    assert "negative: fog" in current
    assert api.replay(out / "manifest.jsonl", entry="lake", out=tmp_path / "r", device="cpu").is_file()
    config = g.manifest_config(out / "manifest.jsonl", "lake")
    assert config["seed"] == 8
    assert g.manifest_config(out / "manifest.jsonl", old_lake)["seed"] == 7  # by file name, still replayable
    with pytest.raises(LensrunError, match=r"no finished image named 'nosuch'; entries: fox, lake"):
        g.manifest_config(out / "manifest.jsonl", "nosuch")
