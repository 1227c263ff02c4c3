"""The one run path: every option defined once reaches every surface, every surface drives ``Engine.run``,
the compile policy's choices, and imports that stay light until a model is loaded."""

import subprocess
import sys
import time

import pytest

from lensrun import api, compile_policy
from lensrun.cli import _parser, main
from lensrun.engine import Engine, Task
from lensrun.request import EngineOptions, GenerationRequest, option_specs

REQUEST_SPECS = option_specs(GenerationRequest)
BUCKET = {"base_resolution", "aspect_ratio"}  # examples that conflict with an explicit height/width


def _examples(names) -> dict:
    return {s.name: s.example for s in REQUEST_SPECS if s.name in names}


COMBOS = [_examples({s.name for s in REQUEST_SPECS} - BUCKET), _examples(BUCKET | {"prompt"})]


def test_every_option_has_an_example_that_differs_from_its_default():
    for cls in (GenerationRequest, EngineOptions):
        for spec in option_specs(cls):
            assert spec.example is not None and spec.example != spec.default, spec.name
            assert spec.help, spec.name


def _check(singles: list[GenerationRequest], given: dict) -> None:
    """The request the engine received carries every option as given."""
    prompts = given["prompt"]
    assert len(singles) == len(prompts) * given.get("n", 1)
    first = singles[0]
    for name, value in given.items():
        if name == "n":
            continue
        if name == "prompt":
            assert first.prompt == (prompts[0],)
        elif name in BUCKET:
            assert getattr(first, name) == value and (first.height, first.width) == (1088, 1936)
        else:
            assert getattr(first, name) == value, name


@pytest.fixture
def captured(monkeypatch):
    """Engine.run records the tasks it is given (and makes nothing)."""
    calls: list[list[Task]] = []
    monkeypatch.setattr(Engine, "run", lambda self, tasks, **kw: calls.append(tasks) or [])
    return calls


def _flag_values(spec, value) -> list[str]:
    if spec.type is bool:
        return [spec.flag] if value else []
    values = value if spec.repeated else [value]
    return [x for v in values for x in (spec.flag, str(v))]


@pytest.mark.parametrize("given", COMBOS, ids=["explicit-size", "bucket"])
def test_every_request_option_reaches_cli_api_server_and_gallery(given, captured, tmp_path):
    engine = {"model": "tiny-random", "device": "cpu"}
    # Python API
    api.generate(list(given["prompt"]), out=tmp_path / "api", **engine, **{k: v for k, v in given.items() if k != "prompt"})
    _check([t.request for t in captured[-1]], given)
    # CLI
    argv = ["generate", "--out", str(tmp_path / "cli"), "--model", "tiny-random", "--device", "cpu"]
    for spec in REQUEST_SPECS:
        if spec.name in given:
            argv += _flag_values(spec, given[spec.name])
    assert main(argv) == 0
    _check([t.request for t in captured[-1]], given)
    # Gallery entry keys
    import json

    entry = {"name": "e", **{k: v for k, v in given.items() if k != "prompt"}, "prompt": given["prompt"][0]}
    gallery = tmp_path / "g.json"
    gallery.write_text(json.dumps([entry]))
    api.gallery(gallery, out=tmp_path / "gallery", **engine)
    _check([t.request for t in captured[-1]], given)
    # Server request schema
    from fastapi.testclient import TestClient

    from lensrun import LensPipeline
    from lensrun.server import create_app

    body = {**{k: v for k, v in given.items() if k != "prompt"}, "prompt": given["prompt"][0]}
    server_engine = Engine(LensPipeline.tiny_random(device="cpu"), EngineOptions(model="tiny-random", device="cpu"))
    runs = len(captured)
    with TestClient(create_app(server_engine, tmp_path / "files")) as client:
        client.post("/v1/jobs", json=body).raise_for_status()
        deadline = time.time() + 30  # the recording run completes no job: wait for the run itself
        while len(captured) == runs and time.time() < deadline:
            time.sleep(0.01)
    _check([t.request for t in captured[-1]], given)


def test_every_engine_option_reaches_the_engine_from_cli_and_api(monkeypatch, tmp_path):
    seen: list[EngineOptions] = []

    class Stop(Exception):
        pass

    def shared(cls, options, first=None, notify=None):
        seen.append(options)
        raise Stop

    monkeypatch.setattr(Engine, "shared", classmethod(shared))
    examples = {s.name: s.example for s in option_specs(EngineOptions)}
    examples.update(vram=None, placement=None)  # CPU runs refuse a budget or a placement (tested elsewhere)
    examples.update(offload=False, gpus=1, split="auto")  # --gpus 2 spawns workers (tests/test_parallel.py)
    given = {k: v for k, v in examples.items() if v is not None and v is not False}
    with pytest.raises(Stop):
        api.generate("x", out=tmp_path, **given)
    argv = ["generate", "--prompt", "x", "--out", str(tmp_path)]
    for spec in option_specs(EngineOptions):
        if spec.name in given:
            argv += _flag_values(spec, given[spec.name])
    with pytest.raises(Stop):
        main(argv)
    assert seen[0] == seen[1] == EngineOptions(**given).resolved()
    gen = _parser()._subparsers._group_actions[0].choices["generate"]
    flags = {a.dest for a in gen._actions}
    assert {s.name for s in option_specs(EngineOptions)} <= flags
    assert {s.name for s in REQUEST_SPECS} <= flags


def test_server_jobs_run_through_the_engine_and_store_its_recipe(tmp_path, monkeypatch):
    import base64
    import io
    import json

    from fastapi.testclient import TestClient
    from PIL import Image

    from lensrun import LensPipeline
    from lensrun.server import create_app

    engine = Engine(LensPipeline.tiny_random(device="cpu"), EngineOptions(model="tiny-random", device="cpu"))
    runs = []
    real = engine.run
    monkeypatch.setattr(engine, "run", lambda tasks, **kw: runs.append(tasks) or real(tasks, **kw))
    with TestClient(create_app(engine, tmp_path)) as client:
        r = client.post("/v1/images/generations", json={"prompt": "a kite", "size": "48x32", "steps": 2, "seed": 4, "n": 2})
    assert r.status_code == 200, r.text
    assert len(runs) == 1 and [t.request.seed for t in runs[0]] == [4, 5]
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][1]["b64_json"])))
    assert json.loads(image.text["lensrun"]) == engine.recipe(runs[0][1].request)


@pytest.mark.parametrize(
    "asked, device, seconds, warm, compiled, expected",
    [
        (None, "cpu", [1.7] * 50, False, False, False),  # CPU: never worth it
        (None, "cuda", [1.7], False, False, False),  # one 1024² image: compiling costs more than it saves
        (None, "cuda", [1.7] * 20, False, False, True),  # a 20-image gallery repays a cold compile
        (None, "cuda", [1.7] * 8, False, False, False),  # eight do not, with empty caches ...
        (None, "cuda", [1.7] * 8, True, False, True),  # ... but do once this machine has compiled before
        (None, "cuda", [0.17] * 20, True, False, False),  # Turbo steps are too short to repay even a warm compile
        (None, "cuda", [1.7], False, True, True),  # already compiled in this process: free
        (True, "cpu", [], False, False, True),  # asked wins
        (False, "cuda", [1.7] * 100, True, False, False),
    ],
)
def test_compile_policy(asked, device, seconds, warm, compiled, expected):
    decision = compile_policy.decide(asked, device, seconds, warm, compiled)
    assert decision.compile is expected
    assert decision.reason.startswith(("compiled", "asked") if expected else ("eager", "asked"))


def test_engine_reports_its_compile_decision(tmp_path):
    paths = api.generate("x", model="tiny-random", device="cpu", height=32, width=32, steps=2, out=tmp_path)
    from lensrun.metadata import read_report

    report = read_report(paths[0])
    assert report["compiled"] is False and set(report["seconds"]) == {"encode", "denoise", "decode"}
    engine = next(iter(Engine._shared.values()))
    assert engine.last_decision.reason == "eager: compilation pays off on CUDA GPUs only"


def test_importing_lensrun_loads_no_model_code():
    code = (
        "import sys, lensrun; from lensrun import LensPipeline, generate; LensPipeline; "
        "import lensrun.engine, lensrun.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers', 'triton'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_compiled_shared_engine_runs_eagerly_for_a_run_that_asks_so(tmp_path, monkeypatch):
    """One model per process whatever --compile says: a later --no-compile run must not go through the compiled
    blocks (its image would differ by kernel rounding), and a compiled run after it reuses them."""
    import torch

    calls: list[int] = []

    def counting(gm, example_inputs):
        return lambda *args: (calls.append(1), gm(*args))[1]

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counting, dynamic=kw.get("dynamic")))
    monkeypatch.setattr(Engine, "_shared", {})

    def run(compile: bool):
        engine = Engine.shared(EngineOptions(model="tiny-random", device="cpu", compile=compile))
        before = len(calls)
        task = Task(engine.request(prompt="p", height=32, width=32, steps=2, seed=1), path=tmp_path / f"{len(calls)}.png")
        [result] = engine.run([task])
        return engine, result.report["compiled"], len(calls) - before

    first, compiled, graph_calls = run(True)
    assert compiled is True and graph_calls > 0
    second, compiled, graph_calls = run(False)
    assert second is first and compiled is False and graph_calls == 0
    third, compiled, graph_calls = run(True)
    assert third is first and compiled is True and graph_calls > 0


def test_after_an_eager_run_an_automatic_run_reopens_the_compiled_blocks(monkeypatch):
    """A process that compiled, then ran eagerly (``--no-compile``), holds compiled code: an automatic choice
    takes it (free) instead of weighing a compilation's cost again."""
    import torch

    from lensrun import LensPipeline

    engine = Engine(LensPipeline.tiny_random(device="cpu"), EngineOptions(model="tiny-random", compile=None))
    engine.pipe.optimize(compile=True)
    engine.pipe.use_eager()
    request = engine.request(prompt="p", height=32, width=32, steps=2)
    plan = engine.plans([request])[0][0]
    monkeypatch.setattr(engine, "device", torch.device("cuda"))  # the policy compiles on CUDA GPUs only
    monkeypatch.setattr(engine, "_compile_key", lambda plan: "no-such-cache")  # (it would name the GPU)
    decision = engine.decide_compile([request], plan)
    assert decision.compile and "compiled already" in decision.reason
    engine.compiling = object()  # a compilation still under way on a side thread is not code to reopen
    assert "compiled already" not in engine.decide_compile([request], plan).reason
