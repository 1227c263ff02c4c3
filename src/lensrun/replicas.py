"""``lensrun serve --replicas N``: the engines of GPUs 1…N-1 each in a process of their own.

Measured first with every engine in the server's process, one thread each (2×H200, 2026-11-28,
docs/scale-out.md): two replicas gave 1.32× one GPU with the GPUs 58 % busy — the replicas' Python work (step
launches, compiled-code guards, PNG encoding) shares one interpreter lock — and requests failed when two
threads compiled or captured at once. So a further replica is a spawned process with its own ``Engine``; the
server's worker thread for it hands it a batch and receives each image's progress and result, as from a local
engine. The replica writes its PNGs into the server's folder (same machine).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import queue
import signal
import threading
from collections.abc import Callable

from lensrun.engine import Cancelled, Result, Task
from lensrun.errors import LensrunError
from lensrun.parallel import NO_MULTICAST
from lensrun.request import EngineOptions, GenerationRequest


class RemoteEngine:
    """An engine in a child process on ``device``, driven like ``Engine``: ``run`` returns once the child's run
    has queued its last image (``wait=False`` semantics); each result reaches ``on_result`` as it is written."""

    def __init__(self, options: EngineOptions, device: str, first: list[GenerationRequest], warmup: bool, notify) -> None:
        import torch.multiprocessing as mp

        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        self.device = device
        self.notify = notify
        self.tasks: dict[int, tuple[Task, Callable | None]] = {}  # key → (task, on_result) until its result
        self.outcomes: queue.Queue = queue.Queue()  # ("ready" | "ran" | "cancelled" | "failed", detail)
        self.keys = itertools.count()
        self.lock = threading.Lock()
        self.alive = True  # False once the process has ended: the server stops giving it work
        self.closing = False
        os.environ.update(NO_MULTICAST)  # inherited by the spawned process
        self.process = context.Process(target=serve_replica, args=(options, device, first, warmup, child),
                                       name=f"lensrun-replica-{device}", daemon=True)  # fmt: skip
        self.process.start()
        child.close()
        threading.Thread(target=self._read, name=f"lensrun-replica-reader-{device}", daemon=True).start()

    def wait_ready(self) -> None:
        """Until the child has loaded (and compiled or warmed up as asked); its failure raised here."""
        kind, detail = self.outcomes.get()
        if kind != "ready":
            raise LensrunError(f"replica on {self.device}: {detail}")

    def run(self, tasks: list[Task], *, isolate: bool = True, on_result=None, should_stop=None, wait: bool = False) -> list:
        if not isolate or wait:
            raise LensrunError("a replica process runs a server's batches only (isolate=True, wait=False)")
        keys = [next(self.keys) for _ in tasks]
        for key, task in zip(keys, tasks, strict=True):
            self.tasks[key] = (task, on_result)
        try:
            self._send("run", [(key, task.request, task.path) for key, task in zip(keys, tasks, strict=True)])
        except OSError:
            raise LensrunError(f"the replica on {self.device} has stopped") from None
        stopping = False
        while True:
            try:
                kind, detail = self.outcomes.get(timeout=0.1)
                break
            except queue.Empty:
                if not stopping and should_stop is not None and should_stop():
                    self._send("stop")
                    stopping = True
        if kind == "cancelled":
            raise Cancelled
        if kind == "failed":
            raise LensrunError(f"replica on {self.device}: {detail}")
        return []

    def close(self, timeout: float = 30.0) -> None:
        """Let the child write its last PNGs and exit; stopped by force after ``timeout``."""
        self.closing = True
        try:
            self._send("exit")
        except OSError:
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()

    def _send(self, *message) -> None:
        with self.lock:
            self.conn.send(message)

    def _read(self) -> None:
        """The child's messages: per-image progress and results (to their callbacks), run outcomes (to ``run``).
        A result may come after its run failed (an image written before the failure): it still completes."""
        while True:
            try:
                kind, *rest = self.conn.recv()
            except (EOFError, OSError):
                self.alive = False
                if not self.closing:
                    self.notify(f"the replica on {self.device} has stopped; the other engines take its work")
                self.outcomes.put(("failed", "the replica process ended"))
                return
            try:
                self._dispatch(kind, rest)
            except Exception as err:  # noqa: BLE001 - a failing callback must not stop the replica's messages
                self.notify(f"replica on {self.device}: {kind} callback failed: {type(err).__name__}: {err}")

    def _dispatch(self, kind: str, rest: list) -> None:
        if kind == "step":
            task, _ = self.tasks.get(rest[0], (None, None))
            if task is not None and task.on_step is not None:
                task.on_step(rest[1], rest[2])
        elif kind == "result":
            key, config, report, error = rest
            task, on_result = self.tasks.pop(key, (None, None))
            if on_result is not None:
                on_result(Result(task, config, report, image=None, error=error))
        elif kind == "say":
            self.notify(f"{self.device}: {rest[0]}")
        else:
            self.outcomes.put((kind, rest[0]))


def serve_replica(options: EngineOptions, device: str, first: list[GenerationRequest], warmup: bool, conn) -> None:
    """The child: load, prepare as the server's own engine is prepared, then run batches until told to exit.
    Ctrl-C is the parent's to answer (it cancels running batches through ``stop``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from lensrun.engine import Engine

    lock = threading.Lock()

    def send(*message) -> None:
        with lock:
            conn.send(message)

    say = lambda message: send("say", message)
    try:
        engine = Engine.load(dataclasses.replace(options, device=device), first, say)
        engine.prepare_to_serve(first, warmup, say)
    except Exception as err:  # noqa: BLE001 - reported to the parent, which refuses to start
        send("failed", f"{type(err).__name__}: {err}")
        return
    send("ready", None)
    stop, commands = threading.Event(), queue.Queue()

    def read() -> None:  # a stop arrives while a run is under way
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                message = ("exit",)
            if message[0] == "stop":
                stop.set()
            else:
                commands.put(message)
            if message[0] == "exit":
                return

    threading.Thread(target=read, daemon=True).start()
    while (message := commands.get())[0] == "run":
        stop.clear()
        tasks = [Task(request, path, tag=key, on_step=lambda i, n, key=key: send("step", key, i, n))
                 for key, request, path in message[1]]  # fmt: skip
        try:
            engine.run(tasks, isolate=True, wait=False, should_stop=stop.is_set,
                       on_result=lambda r: send("result", r.task.tag, r.config, r.report, r.error))  # fmt: skip
            send("ran", None)
        except Cancelled:
            send("cancelled", None)
        except Exception as err:  # noqa: BLE001 - this batch fails, the replica goes on
            send("failed", f"{type(err).__name__}: {err}")
    engine.close()
