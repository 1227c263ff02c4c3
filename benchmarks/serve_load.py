"""Loopback load test of `lensrun serve` on the tiny model: throughput, latency percentiles, server memory.

Starts the server as a subprocess on 127.0.0.1, sends at most N requests from C client threads for at most
D seconds, samples the server's resident memory once a second, then stops it with SIGINT (graceful shutdown).

    python benchmarks/serve_load.py --requests 400 --concurrency 8 --duration 60 --json load.json
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--size", default="32x32")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", default="load.json")
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "lensrun", "serve", "--model", "tiny-random", "--port", str(port), "--device", "cpu",
         "--max-queue", str(4 * args.concurrency)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit(f"server did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        proc = psutil.Process(server.pid)
        memory: list[tuple[float, float]] = []
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        lock = threading.Lock()
        sent = iter(range(args.requests))
        start = time.perf_counter()
        stop = start + args.duration

        def client() -> None:
            with httpx.Client(timeout=120) as http:
                while time.perf_counter() < stop:
                    with lock:
                        i = next(sent, None)
                    if i is None:
                        return
                    t0 = time.perf_counter()
                    res = http.post(url + "/v1/images/generations",
                                    json={"prompt": f"load {i}", "size": args.size, "steps": args.steps, "seed": i})  # fmt: skip
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                        statuses[res.status_code] = statuses.get(res.status_code, 0) + 1

        def sample() -> None:
            while any(t.is_alive() for t in threads):
                memory.append((time.perf_counter() - start, proc.memory_info().rss / 2**20))
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
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    q = statistics.quantiles(latencies, n=100)
    rss = [m for _, m in memory]
    third = max(1, len(rss) // 3)
    report = {
        "requests": len(latencies), "statuses": statuses, "seconds": elapsed, "throughput_rps": len(latencies) / elapsed,
        "latency_s": {"p50": q[49], "p90": q[89], "p99": q[98], "max": max(latencies)},
        "rss_mib": {"first_third_mean": statistics.mean(rss[:third]), "last_third_mean": statistics.mean(rss[-third:]),
                    "min": min(rss), "max": max(rss)},
        "server_exit_code": server.returncode, "concurrency": args.concurrency, "size": args.size, "steps": args.steps,
    }  # fmt: skip
    with open(args.json, "w") as f:
        json.dump({**report, "rss_samples": memory}, f, indent=1)
    print(f"{report['requests']} requests in {elapsed:.1f}s ({report['throughput_rps']:.2f}/s), statuses {statuses}")
    lat = report["latency_s"]
    print(f"latency p50 {lat['p50']:.3f}s  p90 {lat['p90']:.3f}s  p99 {lat['p99']:.3f}s  max {lat['max']:.3f}s")
    r = report["rss_mib"]
    print(f"server RSS: first third {r['first_third_mean']:.0f} MiB, last third {r['last_third_mean']:.0f} MiB "
          f"(min {r['min']:.0f}, max {r['max']:.0f}); exit code {server.returncode}")  # fmt: skip


if __name__ == "__main__":
    main()
