"""Loopback load test of `lensrun serve`: a mix of request kinds from C clients, against the in-process rate.

Starts the server as a subprocess on 127.0.0.1 (its own compile caches: `--cache-dir`), lets C client threads
send requests in turn for D seconds (each a kind from `--mix`, a unique prompt and seed), samples the server's
resident memory, GPU memory and GPU utilisation once a second, then stops it with SIGINT. With `--baseline`
the same requests (up to `--baseline-max`) then run back to back in this process through one warm engine: the
rate the GPU can give the same work with no server around it. `--replicas 1,2` loads the server once per count
(`lensrun serve --replicas N`, one engine per GPU) and compares each count's rate with the first's.

Mix: comma-separated `WxH:steps:cfg` kinds, e.g. the issue's mix
`1024x1024:4:1,1024x1024:20:5,1376x768:8:5`.

    python benchmarks/serve_load.py --model /tmp/lens-full --device cuda --duration 160 --concurrency 8 \
        --mix 1024x1024:4:1,1024x1024:20:5,1376x768:8:5 --baseline --json serve.json
    python benchmarks/serve_load.py --model tiny-random --device cpu --mix 32x32:2:5 --duration 60   # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import psutil


@dataclass(frozen=True)
class Kind:
    width: int
    height: int
    steps: int
    cfg: float

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height} {self.steps} steps cfg {self.cfg:g}"


def parse_mix(text: str) -> list[Kind]:
    kinds = []
    for part in text.split(","):
        size, steps, cfg = part.split(":")
        w, h = size.split("x")
        kinds.append(Kind(int(w), int(h), int(steps), float(cfg)))
    return kinds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_sample(gpus: int) -> list[tuple[float, float]] | None:
    """(memory used GiB, utilisation %) of GPUs 0…gpus-1 from nvidia-smi, or None without them."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=5, check=False,
        ).stdout  # fmt: skip
        rows = [line.split(",") for line in out.strip().splitlines()[:gpus]]
        return [(float(used) / 1024, float(util)) for used, util in rows] if len(rows) == gpus else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def prompt(i: int) -> str:
    things = ["fox", "lighthouse", "teapot", "glacier", "violin", "market", "robot", "orchard", "comet", "harbor"]
    return f"a detailed photo of a {things[i % 10]} number {i} at {['dawn', 'noon', 'dusk'][i % 3]}, {i * 7 % 13} birds"


def start_server(args, port: int, replicas: int) -> subprocess.Popen:
    env = {**os.environ, "LENSRUN_CACHE_DIR": args.cache_dir} if args.cache_dir else dict(os.environ)
    command = [sys.executable, "-m", "lensrun", "serve", "--model", args.model, "--port", str(port),
               "--device", args.device, "--max-queue", str(4 * args.concurrency), "--replicas", str(replicas)]  # fmt: skip
    if args.warmup:
        command.append("--warmup")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)


def load(args, kinds: list[Kind], replicas: int) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    launched = time.perf_counter()
    server = start_server(args, port, replicas)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(server.stdout), daemon=True).start()
    try:
        deadline = time.time() + 600
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit("server did not start:\n" + "".join(log[-40:]))
            time.sleep(0.2)
        ready_s = time.perf_counter() - launched
        proc = psutil.Process(server.pid)
        samples: list[dict] = []
        done: list[dict] = []
        lock = threading.Lock()
        counter = iter(range(10**9))
        start = time.perf_counter()
        stop = start + args.duration

        def client() -> None:
            with httpx.Client(timeout=900) as http:
                while time.perf_counter() < stop:
                    with lock:
                        i = next(counter)
                    kind = kinds[i % len(kinds)]
                    body = {"prompt": prompt(i), "size": f"{kind.width}x{kind.height}", "steps": kind.steps,
                            "cfg": kind.cfg, "seed": i, "response_format": "url"}  # fmt: skip
                    t0 = time.perf_counter()
                    res = http.post(url + "/v1/images/generations", json=body)
                    row = {"i": i, "kind": kind.name, "status": res.status_code, "sent": t0 - start,
                           "latency": time.perf_counter() - t0, "body": body}  # fmt: skip
                    if res.status_code == 200:
                        row["report"] = res.json().get("lensrun", {})
                    with lock:
                        done.append(row)

        def sample() -> None:
            while any(t.is_alive() for t in threads):
                gpus = gpu_sample(replicas) if args.device != "cpu" else None
                samples.append({"t": time.perf_counter() - start, "rss_mib": proc.memory_info().rss / 2**20,
                                "gpu_gib": [g[0] for g in gpus] if gpus else None,
                                "gpu_util": [g[1] for g in gpus] if gpus else None})  # fmt: skip
                time.sleep(1.0)

        threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        sampler = threading.Thread(target=sample)
        sampler.start()
        for t in threads:
            t.join()
        sampler.join()
        elapsed = time.perf_counter() - start
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    return {"ready_s": ready_s, "seconds": elapsed, "requests": done, "samples": samples, "exit_code": server.returncode,
            "log_tail": "".join(log[-30:]), "log_notes": [line for line in log if "POST /v1/" not in line][-80:]}  # fmt: skip


def baseline(args, rows: list[dict]) -> dict:
    """The served requests again, back to back in this process through one engine, after one warm-up image of
    each kind (compiled as the server was): the rate without a server."""
    import tempfile
    from pathlib import Path

    if args.cache_dir:
        os.environ["LENSRUN_CACHE_DIR"] = args.cache_dir
    from lensrun.engine import Engine, Task
    from lensrun.request import EngineOptions

    options = EngineOptions(model=args.model, device=args.device, compile=args.device != "cpu")
    bodies = [r["body"] for r in rows if r["status"] == 200][: args.baseline_max]

    def request(engine, body):
        w, h = (int(v) for v in body["size"].split("x"))
        return engine.request(prompt=body["prompt"], width=w, height=h, steps=body["steps"], cfg=body["cfg"], seed=body["seed"])

    engine = Engine.shared(options)
    out = Path(tempfile.mkdtemp(prefix="serve-baseline-"))
    kinds = {b["size"] + str(b["steps"]) + str(b["cfg"]): b for b in bodies}
    for body in kinds.values():  # warm: compiled code, cuDNN plans
        engine.run([Task(request(engine, {**body, "prompt": "warm " + body["prompt"]}), path=out / "warm.png")])
    start = time.perf_counter()
    for i, body in enumerate(bodies):
        engine.run([Task(request(engine, body), path=out / f"{i}.png")])
    seconds = time.perf_counter() - start
    return {"images": len(bodies), "seconds": seconds, "images_per_s": len(bodies) / seconds}


def summarize(result: dict, kinds: list[Kind]) -> dict:
    rows = [r for r in result["requests"] if r["status"] == 200]
    per_kind = {}
    for kind in kinds:
        mine = [r for r in rows if r["kind"] == kind.name]
        lat = sorted(r["latency"] for r in mine)
        if lat:
            q = statistics.quantiles(lat, n=10) if len(lat) > 1 else [lat[0]] * 9
            # The denoise phase's span on the GPU's stream: a request held behind a compilation (or a capture)
            # on the serving thread shows here, apart from the time it queued behind other requests.
            denoise = [r["report"].get("seconds", {}).get("denoise", 0.0) for r in mine]
            per_kind[kind.name] = {"n": len(lat), "p50": statistics.median(lat), "p90": q[8], "max": lat[-1],
                                   "denoise_max": max(denoise), "compiled": sum(bool(r["report"].get("compiled")) for r in mine)}  # fmt: skip
    gpu = [max(s["gpu_gib"]) for s in result["samples"] if s["gpu_gib"] is not None]  # the fullest GPU
    util = [statistics.mean(s["gpu_util"]) for s in result["samples"] if s["gpu_util"] is not None]
    third = max(1, len(gpu) // 3)
    statuses: dict[int, int] = {}
    for r in result["requests"]:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return {
        "images": len(rows), "images_per_s": len(rows) / result["seconds"], "statuses": statuses,
        "ready_s": result["ready_s"], "per_kind": per_kind, "max_latency": max((r["latency"] for r in rows), default=None),
        "p50": statistics.median(r["latency"] for r in rows) if rows else None,
        "gpu_gib": {"first_third_max": max(gpu[:third]), "last_third_max": max(gpu[-third:]), "max": max(gpu)} if gpu else None,
        "gpu_busy": statistics.mean(util) / 100 if util else None, "exit_code": result["exit_code"],
        "compile_notes": [line.strip() for line in result["log_notes"] if "in the background" in line or "background compilation" in line],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mix", default="32x32:2:5")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--warmup", action="store_true", help="start the server with --warmup")
    ap.add_argument("--cache-dir", default=None, help="LENSRUN_CACHE_DIR for the server (empty folder: cold caches)")
    ap.add_argument("--baseline", action="store_true", help="then the same requests back to back in-process")
    ap.add_argument("--baseline-max", type=int, default=60)
    ap.add_argument("--replicas", default="1", help="comma-separated replica counts, one server each, e.g. 1,2")
    ap.add_argument("--label", default="serve")
    ap.add_argument("--json", default="load.json")
    args = ap.parse_args()
    kinds = parse_mix(args.mix)
    runs = []
    for replicas in (int(n) for n in args.replicas.split(",")):
        result = load(args, kinds, replicas)
        runs.append({"replicas": replicas, "summary": summarize(result, kinds), **result})
        report(f"{args.label}, {replicas} replica(s)", runs[-1]["summary"], result["seconds"])
        with open(args.json, "w") as f:  # after each server: a later one cut short loses only itself
            json.dump({"label": args.label, "args": vars(args), "runs": runs}, f, indent=1)
    summary = runs[0]["summary"]
    for run in runs[1:]:
        run["summary"]["vs_first"] = run["summary"]["images_per_s"] / summary["images_per_s"]
        print(f"{run['replicas']} replicas / {runs[0]['replicas']}: {run['summary']['vs_first']:.2f}x images/s")
    if args.baseline:
        summary["baseline"] = baseline(args, runs[0]["requests"])
        summary["vs_baseline"] = summary["images_per_s"] / summary["baseline"]["images_per_s"]
        b = summary["baseline"]
        print(f"in-process back to back: {b['images']} images in {b['seconds']:.1f} s = {b['images_per_s']:.3f} images/s; "
              f"server ({runs[0]['replicas']} replica(s))/in-process = {summary['vs_baseline']:.2f}")  # fmt: skip
    with open(args.json, "w") as f:
        json.dump({"label": args.label, "args": vars(args), "runs": runs}, f, indent=1)


def report(label: str, summary: dict, seconds: float) -> None:
    print(f"[{label}] ready after {summary['ready_s']:.1f} s; {summary['images']} images in {seconds:.0f} s = "
          f"{summary['images_per_s']:.3f} images/s; statuses {summary['statuses']}; exit {summary['exit_code']}")  # fmt: skip
    print(f"{'kind':<32} {'n':>4} {'p50 s':>7} {'p90 s':>7} {'max s':>7} {'max denoise s':>13} {'compiled':>8}")
    for name, k in summary["per_kind"].items():
        print(f"{name:<32} {k['n']:>4} {k['p50']:>7.2f} {k['p90']:>7.2f} {k['max']:>7.2f} {k['denoise_max']:>13.2f} {k['compiled']:>8}")
    if summary["p50"] is not None:
        print(f"{'all kinds':<32} {summary['images']:>4} {summary['p50']:>7.2f}")
    for line in summary["compile_notes"]:
        print("server:", line)
    if summary["gpu_gib"]:
        g = summary["gpu_gib"]
        print(f"GPU memory max (fullest GPU): first third {g['first_third_max']:.1f} GiB, last third "
              f"{g['last_third_max']:.1f} GiB; GPU busy {summary['gpu_busy']:.0%} (mean over the server's GPUs)")  # fmt: skip


if __name__ == "__main__":
    main()
