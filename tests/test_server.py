"""`lensrun serve` on the tiny model: the official OpenAI SDK, errors, queue limits, SSE, concurrency, shutdown,
and the web page driven by headless Chromium."""

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn
from PIL import Image

from lensrun import LensPipeline
from lensrun.engine import Engine
from lensrun.request import EngineOptions
from lensrun.server import create_app, host_warning

EXTRA = {"steps": 2}


class Server:
    """A real uvicorn server on a free loopback port, in a thread."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def pipe():
    return LensPipeline.tiny_random(device="cpu")


def _engine(pipe):
    return Engine(pipe, EngineOptions(model="tiny-random", device="cpu"))


@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
    srv = Server(create_app(_engine(pipe), tmp_path_factory.mktemp("files"), max_queue=32))
    yield srv
    srv.stop()


def _client(server, key="unused"):
    return openai.OpenAI(api_key=key, base_url=server.url + "/v1", max_retries=0, timeout=120)


def _png(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_sdk_b64_and_url(server):
    client = _client(server)
    res = client.images.generate(prompt="a red fox", n=2, size="48x32", response_format="b64_json", extra_body={"seed": 5, **EXTRA})
    images = [_png(base64.b64decode(d.b64_json)) for d in res.data]
    assert [im.size for im in images] == [(48, 32), (48, 32)]
    configs = [json.loads(im.text["lensrun"]) for im in images]
    assert [c["seed"] for c in configs] == [5, 6] and configs[0]["prompt"] == "a red fox"
    assert "plan" in json.loads(images[0].text["lensrun-report"])

    res = client.images.generate(prompt="a red fox", size="48x32", response_format="url", extra_body={"seed": 5, **EXTRA})
    url = res.data[0].url
    assert url.startswith(server.url + "/v1/files/") and url.endswith(".png")
    fetched = _png(httpx.get(url).content)
    assert fetched.tobytes() == images[0].tobytes()


def test_models_and_health(server):
    models = _client(server).models.list()
    assert [m.id for m in models.data] == ["tiny-random"]
    assert httpx.get(server.url + "/healthz").json()["status"] == "ok"


@pytest.mark.parametrize(
    "body, param, text",
    [
        ({"size": "100x64"}, "size", "multiple of 16"),
        ({"size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"aspect_ratio": "5:4"}, "aspect_ratio", "choose one of 1:2, 9:16"),
        ({"base_resolution": 768}, "base_resolution", "choose 1024 or 1440"),
        ({"steps": 0}, "steps", "≥ 1"),
        ({"cfg": -1}, "cfg", "finite number ≥ 0"),
        ({"n": 50}, "n", "between 1 and 8"),
        ({"prompt": None}, "prompt", ""),
    ],
)
def test_validation_errors_name_the_field(server, body, param, text):
    res = httpx.post(server.url + "/v1/images/generations", json={"prompt": "x", **body})
    assert res.status_code == 422
    err = res.json()["error"]
    assert err["param"] == param and text in err["message"]


def test_sdk_sees_422(server):
    with pytest.raises(openai.UnprocessableEntityError):
        _client(server).images.generate(prompt="x", size="100x64")


def test_long_prompt_warns_and_body_limit(server):
    res = httpx.post(server.url + "/v1/images/generations", json={"prompt": "fox " * 600, "size": "32x32", **EXTRA}, timeout=120)
    assert res.status_code == 200 and "prompt too long" in res.json()["warnings"][0]
    res = httpx.post(server.url + "/v1/images/generations", json={"prompt": "x" * 70_000})
    assert res.status_code == 413


def test_no_client_chosen_paths(server):
    for name in ("..%2F..%2Fetc%2Fpasswd", "00000000000000000000000000000000.png", "x.png"):
        assert httpx.get(server.url + "/v1/files/" + name).status_code == 404


def test_sse_progress(server):
    job = httpx.post(server.url + "/v1/jobs", json={"prompt": "a fox", "size": "32x32", "steps": 3}).json()
    assert job["status"] in ("queued", "running")
    events = []
    with httpx.stream("GET", f"{server.url}/v1/jobs/{job['id']}/events", timeout=120) as res:
        assert res.headers["content-type"].startswith("text/event-stream")
        for line in res.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    kinds = [e["event"] for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "done"
    assert [e["step"] for e in events if e["event"] == "progress"] == [1, 2, 3]
    final = httpx.get(f"{server.url}/v1/jobs/{job['id']}").json()
    assert final["status"] == "succeeded" and len(final["images"]) == 1


def test_sixteen_concurrent_clients(server):
    client = _client(server)

    def one(seed):
        res = client.images.generate(prompt=f"image {seed}", size="32x32", extra_body={"seed": seed, "steps": 1})
        config = json.loads(_png(base64.b64decode(res.data[0].b64_json)).text["lensrun"])
        return seed, config["seed"], config["prompt"], res.model_extra["lensrun"]["job"]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(100, 116)))
    assert all(sent == got and prompt == f"image {sent}" for sent, got, prompt, _ in results)
    assert len({job for *_, job in results}) == 16


@pytest.fixture
def held(pipe, tmp_path):
    """An app whose worker blocks inside its first job until released."""
    gate = threading.Event()
    engine = _engine(pipe)
    original = engine.run

    def slow(*args, **kwargs):
        should_stop = kwargs["should_stop"]
        kwargs["should_stop"] = lambda: (gate.wait(30), should_stop())[1]
        return original(*args, **kwargs)

    engine.run = slow
    app = create_app(engine, tmp_path, api_key="s3cret", max_queue=1)
    srv = Server(app)
    yield srv, gate
    gate.set()
    srv.stop()


def test_auth_queue_full_and_shutdown(held):
    srv, gate = held
    auth = {"Authorization": "Bearer s3cret"}
    assert httpx.get(srv.url + "/v1/models").status_code == 401
    assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        _client(srv, key="wrong").models.list()
    assert httpx.get(srv.url + "/healthz").status_code == 200
    body = {"prompt": "x", "size": "32x32", "steps": 2}
    running = httpx.post(srv.url + "/v1/jobs", json=body, headers=auth).json()
    deadline = time.time() + 30
    while httpx.get(f"{srv.url}/v1/jobs/{running['id']}", headers=auth).json()["status"] != "running":
        assert time.time() < deadline
        time.sleep(0.02)
    queued = httpx.post(srv.url + "/v1/jobs", json=body, headers=auth).json()
    full = httpx.post(srv.url + "/v1/jobs", json=body, headers=auth)
    assert full.status_code == 429 and full.headers["retry-after"] == "5"
    worker = srv.app.state.worker
    stopper = threading.Thread(target=worker.shutdown)
    stopper.start()
    running_job = worker.jobs[running["id"]]
    deadline = time.time() + 30
    while not (running_job.cancel.is_set() and worker.jobs[queued["id"]].done.is_set()):
        assert time.time() < deadline
        time.sleep(0.01)
    gate.set()  # the running job reaches its next step only now, already asked to stop
    stopper.join(30)
    assert worker.jobs[queued["id"]].error == "the server shut down before this job started"
    assert worker.jobs[running["id"]].status == "cancelled"
    assert httpx.post(srv.url + "/v1/jobs", json=body, headers=auth).status_code == 503


def test_host_warning():
    assert host_warning("127.0.0.1", None) is None
    assert host_warning("0.0.0.0", "key") is None
    assert "without --api-key" in host_warning("0.0.0.0", None)


def test_browser_drives_the_page(server, chrome, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chrome.get(server.url + "/")
    chrome.find_element(By.ID, "prompt").send_keys("a <b>bold</b> fox")
    chrome.find_element(By.ID, "size").send_keys("64x48")
    chrome.find_element(By.ID, "steps").send_keys("3")
    chrome.find_element(By.ID, "seed").send_keys("9")
    chrome.find_element(By.ID, "go").click()
    loaded = "const i = document.querySelector('#results img'); return !!i && i.complete && i.naturalWidth > 0;"
    WebDriverWait(chrome, 120).until(lambda d: d.execute_script(loaded))
    caption = chrome.find_element(By.CSS_SELECTOR, "#results figcaption").text
    assert "seed 9" in caption and "a <b>bold</b> fox" in caption and "size 64x48" in caption
    assert chrome.find_element(By.ID, "status").text == "done"
    assert chrome.execute_script("return document.querySelector('#results img').naturalWidth") == 64
    shot = tmp_path / "page.png"
    chrome.save_screenshot(str(shot))
    assert _png(shot.read_bytes()).size[0] > 0
