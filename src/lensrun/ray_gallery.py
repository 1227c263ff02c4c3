"""``lensrun gallery FILE --ray [ADDRESS]``: one gallery over every GPU of a machine or a Ray cluster.

One Ray actor per GPU holds an ``Engine`` (loaded once) and makes chunks of same-size images through
``Engine.run`` exactly as the one-GPU gallery does, so every image is the one-GPU gallery's image. The driver
(this process) is the only writer of ``manifest.jsonl`` and ``index.html``; actors write the PNGs (atomically)
into the gallery folder, which every node must see at the same path (a shared filesystem). An actor that dies —
killed, out of memory, its node lost — has its chunk handed to a new actor: images already written are written
again identically (same recipe, atomic rename), the manifest records each image once, and images already
denoised resume at decoding from their kept latents.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lensrun.errors import LensrunError
from lensrun.gallery import Entry, GalleryRun
from lensrun.parallel import NO_MULTICAST
from lensrun.request import EngineOptions

CHUNK_IMAGES = 4  # images an actor makes per call: small enough that a lost actor costs little
MAX_TRIES = 3  # a chunk whose actor died this many times is recorded as failed


class GalleryWorker:
    """The body of a Ray actor: one engine on this actor's GPU (or the CPU), loaded at the first chunk and
    prepared for ``share`` (about the images this actor will make), so that compiling is decided on the actor's
    whole part of the gallery rather than on each small chunk."""

    def __init__(self, options: EngineOptions, share: list) -> None:
        os.environ.update(NO_MULTICAST)
        self.options = options
        self.share = share
        self.engine = None

    def run(self, tasks: list) -> list[dict]:
        from lensrun.engine import Engine

        if self.engine is None:
            self.engine = Engine.shared(self.options, [t.request for t in tasks])
            self.engine.compile_ahead(self.share, background=False)
        results = self.engine.run(tasks, isolate=True)
        return [{"ok": r.ok, "config": r.config, "report": r.report, "error": r.error} for r in results]


@dataclass
class _Chunk:
    images: list
    tries: int = 0


@dataclass
class RayGallery:
    """The driver: hands chunks to idle actors, records what comes back, replaces actors that die."""

    run: GalleryRun
    workers: int
    gpus_each: float
    notify: Callable[[str], None] = print
    on_submit: Callable[[object, list], None] | None = None  # (actor, tasks): observers such as tests
    restarts: int = 0
    todo: list[_Chunk] = field(default_factory=list)

    def go(self) -> None:
        import ray

        remote = ray.remote(num_gpus=self.gpus_each)(GalleryWorker)
        from lensrun.engine import size_groups

        self.todo = [_Chunk(c) for c in size_groups(self.run.pending, CHUNK_IMAGES, lambda image: image[1])]
        actors = [self._actor(remote) for _ in range(min(self.workers, len(self.todo)))]
        busy: dict = {}  # future → (actor, chunk, tasks)
        while self.todo or busy:
            idle = [a for a in actors if a not in {v[0] for v in busy.values()}]
            while idle and self.todo:
                actor, chunk = idle.pop(), self.todo.pop(0)
                tasks = self.run.tasks(chunk.images)
                busy[actor.run.remote(tasks)] = (actor, chunk, tasks)
                if self.on_submit is not None:
                    self.on_submit(actor, tasks)
            ready, _ = ray.wait(list(busy), num_returns=1)
            actor, chunk, tasks = busy.pop(ready[0])
            try:
                rows = ray.get(ready[0])
            except ray.exceptions.RayActorError as err:
                actors[actors.index(actor)] = self._replace(remote, chunk, err)
                continue
            for task, row in zip(tasks, rows, strict=True):
                self.run.record(task.tag, row["ok"], row["config"], row["report"], row["error"])
            self.notify(f"{self.run.summary['done']} done, {self.run.summary['failed']} failed")

    def _replace(self, remote, chunk: _Chunk, err: Exception):
        """A new actor for a dead one; its chunk goes back to the front of the queue (or fails, after tries)."""
        self.restarts += 1
        chunk.tries += 1
        reason = str(err).splitlines()[0][:160]
        if chunk.tries >= MAX_TRIES:
            for image in chunk.images:
                self.run.record(image, False, {}, {}, f"worker lost {chunk.tries} times: {reason}")
        else:
            self.todo.insert(0, chunk)
            self.notify(f"a worker was lost ({reason}); its {len(chunk.images)} image(s) go to a new worker")
        return self._actor(remote)

    def _actor(self, remote):
        """A new actor, told about its share of the run (every ``workers``-th image pending at its start)."""
        share = [single for _, single, _, _ in self.run.pending[:: self.workers]]
        return remote.remote(self.run.options, share)


def run_gallery_ray(
    options: EngineOptions,
    entries: list[Entry],
    out: str | Path,
    address: str | None = None,
    workers: int | None = None,
    notify: Callable[[str], None] | None = None,
    on_submit: Callable[[object, list], None] | None = None,
) -> dict:
    """The gallery on Ray: ``address`` of a running cluster (None or 'local': a local Ray instance, started
    here and stopped after); ``workers``: actors (default: one per GPU of the cluster; on a CPU device, 1)."""
    try:
        import ray
    except ImportError:
        raise LensrunError("--ray needs Ray: pip install 'lensrun[ray]'") from None
    say = notify or (lambda message: None)
    run = GalleryRun.start(options, entries, out)
    if not run.pending:
        return run.finish()
    started = not ray.is_initialized()
    if started:
        local = address in (None, "local")
        env = {**NO_MULTICAST, **{k: v for k, v in os.environ.items() if k.startswith(("LENSRUN_", "HF_"))}}
        ray.init(address=None if local else address, runtime_env={"env_vars": env}, include_dashboard=False,
                 log_to_driver=False, **({"num_cpus": max(2, workers or 1)} if local else {}))  # fmt: skip
    try:
        on_gpu = options.device != "cpu"
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if on_gpu and gpus == 0:
            raise LensrunError("--ray: the Ray cluster has no GPUs; add --device cpu to run there anyway")
        count = workers or (gpus if on_gpu else 1)
        say(f"Ray: {count} worker(s), {len(run.pending)} image(s) to make")
        RayGallery(run, count, 1 if on_gpu else 0, say, on_submit).go()
    finally:
        if started:
            ray.shutdown()
    return run.finish()
