"""What a newcomer hits: readable files, one-line errors instead of tracebacks, conflicts that are refused,
seeds that replay, interrupts that say what was kept."""

import os
import shutil
import socket
import stat

import pytest

from lensrun.cli import main

TINY = ["--model", "tiny-random", "--height", "32", "--width", "48", "--steps", "2"]


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_written_files_get_the_usual_permissions(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        code, _, err = _run(["generate", "--prompt", "x", "--out", str(tmp_path / "o"), *TINY], capsys)
        gallery = tmp_path / "g.txt"
        gallery.write_text("a fox\n")
        code2, _, _ = _run(["gallery", str(gallery), "--out", str(tmp_path / "g"), *TINY], capsys)
    finally:
        os.umask(old)
    assert code == 0 and code2 == 0, err
    files = [*(tmp_path / "o").glob("*.png"), *(tmp_path / "g").glob("*.png"), tmp_path / "g" / "index.html"]
    assert len(files) == 3
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o644}


@pytest.mark.parametrize(
    "damage, message",
    [
        ("garbage-shard", "not a readable safetensors file"),
        ("truncated-shard", "not a readable safetensors file"),
        ("broken-config", "config.json is not valid JSON"),
        ("config-list", "should hold a JSON object"),
    ],
)
def test_damaged_checkpoint_is_one_line_naming_the_file(tiny_checkpoint, tmp_path, capsys, damage, message):
    root = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, root)
    shard = min((root / "transformer").glob("*.safetensors"))
    if damage == "garbage-shard":
        shard.write_bytes(b"\x00garbage" * 100)
    elif damage == "truncated-shard":
        shard.write_bytes(shard.read_bytes()[:200])
    elif damage == "broken-config":
        (root / "vae" / "config.json").write_text('{"block_out_channels": [128, 256,')
    else:
        (root / "transformer" / "config.json").write_text("[1, 2]")
    code, _, err = _run(["generate", "--prompt", "x", "--model", str(root), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    named = shard.name if "shard" in damage else "config.json"
    assert named in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "mps"], "device 'mps' is not supported: use cpu, cuda or cuda:N"),
        (["--seed", "9223372036854775807", "--n", "2"], "would give seeds up to 9223372036854775808"),
        (["--aspect-ratio", "16:9"], "height/width and aspect ratio both given"),
        (["--prompt", "  "], "prompt is empty"),
    ],
)
def test_conflicts_and_impossible_values_are_refused(tmp_path, capsys, extra, message):
    argv = ["generate", "--prompt", "x", "--out", str(tmp_path / "o"), *TINY, *extra]
    if extra[0] == "--prompt":
        argv = ["generate", "--out", str(tmp_path / "o"), *TINY, *extra]
    code, _, err = _run(argv, capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_serve_checks_its_port_before_loading_the_model(capsys, monkeypatch):
    import lensrun.engine as engine_module

    monkeypatch.setattr(engine_module.Engine, "shared", lambda *a, **k: pytest.fail("model loaded before the port check"))
    code, _, err = _run(["serve", "--model", "tiny-random", "--port", "99999"], capsys)
    assert code == 2 and "port 99999 is not in 1–65535" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = _run(["serve", "--model", "tiny-random", "--port", str(port)], capsys)
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err


def test_gallery_entry_size_replaces_the_default_bucket(tmp_path):
    import lensrun.gallery as g

    path = tmp_path / "g.toml"
    path.write_text('[defaults]\nbase_resolution = 1440\n\n[[image]]\nname = "small"\nprompt = "x"\nheight = 64\nwidth = 32\n'
                    '\n[[image]]\nname = "bucket"\nprompt = "y"\naspect_ratio = "16:9"\n')  # fmt: skip
    entries = g.load_gallery(path, {"height": 48, "width": 48})
    small, bucket = (g.entry_request(e.settings) for e in entries)
    assert (small.height, small.width, small.base_resolution) == (64, 32, None)
    assert (bucket.height, bucket.width) == (1088, 1936)


def test_prompt_warnings_are_one_line_without_source_paths(tmp_path, capsys):
    code, _, err = _run(["generate", "--prompt", "fox " * 600, "--out", str(tmp_path), *TINY], capsys)
    assert code == 0
    lines = [ln for ln in err.splitlines() if "tokens with the template" in ln]
    assert lines and lines[0].startswith("lensrun: warning: prompt 1 is") and ".py:" not in err


def test_withdrawn_default_model_says_where_weights_are(tmp_path, capsys):
    code, _, err = _run(["generate", "--prompt", "x", "--model", "microsoft/Lens", "--out", str(tmp_path)], capsys)
    assert code == 2 and "YuCollection/Lens-Diffusers" in err and "withdrew" in err


def test_interrupted_gallery_says_what_was_kept(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the second image denoises: the first image's PNG (on the writer thread) still completes."""
    from lensrun.pipeline import LensPipeline

    real, calls = LensPipeline.denoise, []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(LensPipeline, "denoise", interrupt_second)
    gallery = tmp_path / "g.txt"
    gallery.write_text("a fox\na lake\na kite\n")
    code, _, err = _run(["gallery", str(gallery), "--out", str(tmp_path / "g"), *TINY], capsys)
    assert code == 130 and "Traceback" not in err
    assert "interrupted" in err and "Run the same command again to resume" in err
    monkeypatch.setattr(LensPipeline, "denoise", real)
    code, out, _ = _run(["gallery", str(gallery), "--out", str(tmp_path / "g"), *TINY], capsys)
    assert code == 0 and "done 2, skipped 1" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("lensrun 0.")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from lensrun import LensPipeline
    from lensrun.engine import Engine
    from lensrun.request import EngineOptions
    from lensrun.server import create_app

    engine = Engine(LensPipeline.tiny_random(device="cpu"), EngineOptions(model="tiny-random", device="cpu"))
    with TestClient(create_app(engine, tmp_path_factory.mktemp("files"))) as c:
        yield c


@pytest.mark.parametrize(
    "body, param, text",
    [
        ({"size": "32x32", "aspect_ratio": "16:9"}, "size", "size and aspect_ratio both given"),
        ({"size": "32x32", "bogus": 1}, "bogus", "unknown field(s) ['bogus']"),
        ({"prompt": "", "size": "32x32"}, "prompt", "prompt is empty"),
    ],
)
def test_server_refuses_conflicts_unknown_fields_and_empty_prompts(client, body, param, text):
    res = client.post("/v1/images/generations", json={"prompt": "x", "steps": 2, **body})
    assert res.status_code == 422
    assert res.json()["error"]["param"] == param and text in res.json()["error"]["message"]


def test_server_names_openai_options_it_ignores(client):
    res = client.post("/v1/images/generations", json={"prompt": "x", "size": "32x32", "steps": 2, "quality": "hd", "style": "vivid"})
    assert res.status_code == 200, res.text
    assert res.json()["warnings"] == [
        "'quality' is an OpenAI option lensrun does not apply; it was ignored",
        "'style' is an OpenAI option lensrun does not apply; it was ignored",
    ]


# `python -m lensrun …` with Python's Ctrl-C handler put back first: a child inherits an ignored SIGINT and Python
# then leaves it ignored, so a suite started in the background (`nohup … &`, which ignores SIGINT) saw the gallery
# process finish straight through its signal.
_LENSRUN_WITH_CTRL_C = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('lensrun', run_name='__main__', alter_sys=True)"
)


def _interruptible(args: list[str]):
    """A `lensrun` process that Ctrl-C reaches, its output read as one stream."""
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-c", _LENSRUN_WITH_CTRL_C, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _serve_process(tmp_path, files=True):
    """A real `lensrun serve` process on a free loopback port, the tiny model on the CPU."""
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _interruptible(
        ["serve", "--model", "tiny-random", "--device", "cpu", "--port", str(port),
         *(["--files", str(tmp_path / "files")] if files else [])],
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.time() < deadline, "server did not start"
        time.sleep(0.2)


def _interrupt(proc, times: int, wait: float) -> tuple[int, str]:
    """Ctrl-C ``times`` times; the exit code and everything the process printed (killed if it hangs)."""
    import signal
    import subprocess

    try:
        for _ in range(times):
            proc.send_signal(signal.SIGINT)
        code = proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    return code, proc.stdout.read()


def test_ctrl_c_with_clients_connected_answers_them_and_exits(tmp_path):
    """SIGINT while an SSE listener follows a long job and another client waits on a queued one: the stream ends
    with a final event, the waiting client gets a JSON 503, the process says what happened and exits 0."""
    import json
    import signal
    import threading
    import time

    import httpx

    proc, url = _serve_process(tmp_path)
    try:
        long_job = httpx.post(url + "/v1/jobs", json={"prompt": "long", "size": "64x64", "steps": 100000}).json()
        events, waited = [], {}

        def listen():
            with httpx.stream("GET", f"{url}/v1/jobs/{long_job['id']}/events", timeout=60) as res:
                for line in res.iter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))

        def wait():
            res = httpx.post(url + "/v1/images/generations", json={"prompt": "queued", "size": "32x32", "steps": 2}, timeout=60)
            waited.update(status=res.status_code, body=res.json())

        threads = [threading.Thread(target=listen), threading.Thread(target=wait)]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while not any(e["event"] == "progress" for e in events):
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(0.3)  # the waiting request is queued behind the long job
        start = time.time()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
        elapsed = time.time() - start
        for t in threads:
            t.join(10)
        output = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0 and elapsed < 10, output
    assert "shutting down: 1 queued job(s) failed, 1 running job(s) cancelled" in output
    assert "Traceback" not in output
    assert events[-1]["event"] == "error" and "cancelled" in events[-1]["message"]
    assert waited["status"] == 503 and "shut down before this job started" in waited["body"]["error"]["message"]
    assert not any((tmp_path / "files").glob("*.tmp"))
    assert "POST /v1/jobs 202" in output  # one access line per request


def test_second_ctrl_c_exits_at_once_and_quietly(tmp_path):
    import time

    import httpx

    proc, url = _serve_process(tmp_path, files=False)
    try:
        httpx.post(url + "/v1/jobs", json={"prompt": "long", "size": "64x64", "steps": 100000})
        time.sleep(0.5)
    finally:
        code, output = _interrupt(proc, times=2, wait=10)
    assert code in (0, 130) and "Traceback" not in output and "terminate called" not in output


def test_temporary_image_folder_goes_with_the_server(tmp_path):
    import re

    proc, _ = _serve_process(tmp_path, files=False)
    code, output = _interrupt(proc, times=1, wait=30)
    folder = re.search(r"images in (\S+)\)", output).group(1)
    assert code == 0 and "lensrun-serve-" in folder and not os.path.exists(folder)


def test_server_says_a_long_prompt_warning_once(client):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = client.post("/v1/images/generations", json={"prompt": "fox " * 600, "size": "32x32", "steps": 2})
    assert res.status_code == 200
    assert len([w for w in caught if "tokens with the template" in str(w.message)]) == 1
    assert res.json()["warnings"][0].startswith("prompt too long: the last")


def test_replay_check_and_other_weights_warning(tmp_path, capsys):
    import json

    from PIL import Image

    from lensrun.metadata import save_png

    code, out, err = _run(["generate", "--prompt", "a kite", "--seed", "3", "--out", str(tmp_path / "o"), *TINY], capsys)
    png = out.split()[0]
    code, _, err = _run(["replay", png, "--check", "--out", str(tmp_path / "r")], capsys)
    assert code == 0 and "check: identical to" in err and "other weights" not in err
    with Image.open(png) as im:
        config = json.loads(im.text["lensrun"])
        assert config["weights"] == "tiny-random:0"
        image = im.convert("RGB")
    image.putpixel((0, 0), (0, 0, 0) if image.getpixel((0, 0)) != (0, 0, 0) else (255, 255, 255))
    moved = tmp_path / "moved.png"
    save_png(image, moved, {**config, "weights": "0123456789abcdef"})
    code, _, err = _run(["replay", str(moved), "--check", "--out", str(tmp_path / "r2")], capsys)
    assert code == 0 and "made with other weights (fingerprint 0123456789abcdef, now tiny-random:0)" in err
    assert "check: 1 pixels differ from moved.png" in err


def test_output_a_person_reads(tmp_path, capsys, monkeypatch):
    """Per-image times, a CPU plan line that does not claim bf16 weights, progress lines, a plan legend."""
    from lensrun.engine import Engine

    monkeypatch.setattr(Engine, "_shared", {})  # a fresh process: the model is loaded, and says so
    code, out, err = _run(["generate", "--prompt", "a", "--prompt", "b", "--seed", "1", "--out", str(tmp_path), *TINY], capsys)
    assert code == 0
    assert err.index("loading tiny-random onto cpu") < err.index("plan resident+bf16: CPU run (weights in CPU memory")
    assert "encoding 2 prompt(s)" in err
    from lensrun.metadata import read_report

    reports = [read_report(line.split()[0]) for line in out.splitlines()]
    assert len(reports) == 2 and all(set(r["seconds"]) == {"encode", "denoise", "decode"} for r in reports)
    for line, report in zip(out.splitlines(), reports, strict=True):  # each line prints its own image's times
        assert f"denoise={report['seconds']['denoise']:.2f}s" in line
    code, out, _ = _run(["plan", "--vram", "12GB"], capsys)
    assert code == 0 and "Legend: => the plan `lensrun generate` would use" in out and "emb-cpu:" in out


def test_ctrl_c_on_a_real_gallery_process_keeps_finished_work(tmp_path):
    """SIGINT to a running `lensrun gallery`: one line saying what was kept, exit 130, no partial file; the
    re-run makes only what is missing."""
    import subprocess
    import sys
    import time

    gallery = tmp_path / "g.txt"
    gallery.write_text("".join(f"image {i}\n" for i in range(12)))
    out = tmp_path / "g"
    args = ["gallery", str(gallery), "--out", str(out), "--model", "tiny-random",
            "--height", "32", "--width", "32", "--steps", "60"]  # fmt: skip
    proc = _interruptible(args)
    deadline = time.time() + 120
    while not list(out.glob("*.png")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    code, output = _interrupt(proc, times=1, wait=30)
    assert code == 130 and "Traceback" not in output, output
    assert "interrupted; images finished so far are in" in output and "Run the same command again to resume" in output
    kept = {p.name for p in out.glob("*.png")}
    assert kept and not list(out.rglob("*.tmp"))
    rerun = subprocess.run([sys.executable, "-m", "lensrun", *args], capture_output=True, text=True, timeout=300,
                           check=False)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert f"skipped {len(kept)}" in rerun.stdout and len(list(out.glob("*.png"))) == 12
    assert "decoding" in rerun.stderr  # progress shows the decode phase too
