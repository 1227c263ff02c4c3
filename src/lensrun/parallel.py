"""One image on two GPUs: CFG-parallel denoising over torch.distributed.

Lens guides every step with a conditional and an unconditional velocity (CFG 5): the two branches are the same
transformer on the same latents with different text, so rank 0 runs the conditional one and rank 1 the
unconditional one, and one all-gather of the two velocities per step lets both ranks take the same Euler step.
Rank 0 encodes the prompts and broadcasts the features (the encoder runs once); rank 0 decodes and writes the
PNGs. Each branch is computed exactly as on one GPU, so the image is the single-GPU image.

``launch`` spawns one worker process per GPU (``torch.multiprocessing``, NCCL on CUDA, gloo on the CPU for
tests); each worker loads an ``Engine`` on its own device and drives ``Engine.run`` like every other surface.
NVLink multicast stays off in every worker (``NO_MULTICAST``).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lensrun.errors import LensrunError

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class CfgGroup:
    """This process's place in a CFG-parallel group of two: rank 0 conditional, rank 1 unconditional."""

    rank: int
    world: int
    device: torch.device

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def share(self, tensors: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """Rank 0's tensors on every rank (others pass None): shapes and dtypes first, then the data."""
        meta = [[(tuple(t.shape), t.dtype) for t in tensors] if self.leader else None]
        dist.broadcast_object_list(meta, src=0, device=self._object_device())
        if not self.leader:
            tensors = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in meta[0]]
        for t in tensors:
            if t.numel():
                dist.broadcast(t, src=0)
        return tensors

    def share_object(self, value):
        """Rank 0's picklable value on every rank (plans, decisions: every rank must run the same)."""
        box = [value if self.leader else None]
        dist.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]

    def gather(self, mine: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor of this shape, in rank order."""
        out = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine.contiguous())
        return out

    def _object_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None


def check_gpus(gpus: int, device: str | None) -> None:
    """A clear error before any work: the count is even and this machine has that many GPUs."""
    if gpus < 1:
        raise LensrunError(f"gpus must be 1 or more, got {gpus}")
    if gpus == 1:
        return
    if gpus != 2:
        raise LensrunError(f"--gpus {gpus}: CFG-parallel runs one image on 2 GPUs; more needs sequence parallelism, not built yet")
    if device not in (None, "cuda", "cpu"):
        raise LensrunError(f"--gpus {gpus} places its workers on cuda:0…cuda:{gpus - 1}; leave --device out (or cpu for a test)")
    if device != "cpu":
        found = torch.cuda.device_count()
        if found < gpus:
            raise LensrunError(f"--gpus {gpus} asked for, but this machine has {found} CUDA GPU(s)")


def needs_group(tasks) -> bool:
    """Whether any task has two branches to split (Turbo, CFG 1, has one: it runs on one GPU)."""
    return any(t.request.cfg != 1.0 for t in tasks)


def launch(options, tasks: list, notify=None, progress: bool = False) -> None:
    """Run ``tasks`` (their PNG paths set) on ``options.gpus`` worker processes; returns when every PNG is written.
    A worker's error ends the run with that error."""
    import torch.multiprocessing as mp

    world = options.gpus
    backend = "gloo" if options.device == "cpu" else "nccl"
    os.environ.update(NO_MULTICAST)  # spawned workers inherit it
    port = _free_port()
    errors = mp.get_context("spawn").SimpleQueue()
    try:
        mp.start_processes(
            _worker, args=(world, backend, port, options, tasks, notify, progress, errors), nprocs=world,
            start_method="spawn", join=True,
        )  # fmt: skip
    except mp.ProcessRaisedException:
        pass  # the worker put its error on the queue first
    if not errors.empty():
        raise LensrunError(errors.get())


def _worker(rank: int, world: int, backend: str, port: int, options, tasks, notify, progress, errors) -> None:
    from lensrun.engine import Engine

    os.environ.update(NO_MULTICAST, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cpu") if backend == "gloo" else torch.device("cuda", rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world, device_id=device if device.type == "cuda" else None)
    try:
        group = CfgGroup(rank, world, device)
        local = dataclasses.replace(options, device=str(device), gpus=1)
        say = notify if group.leader else None
        engine = Engine.load(local, [t.request for t in tasks], say)
        engine.pipe.parallel = group
        plans, why = engine.plans([t.request for t in tasks])
        plans = group.share_object(plans)  # one plan for both: the same precision, so the same arithmetic
        if say is not None:
            say(f"CFG-parallel on {world} devices; {why}")
        mine = tasks if group.leader else [dataclasses.replace(t, path=None, keep=None) for t in tasks]
        engine.run(mine, plans=plans, notify=say, progress=progress and group.leader)
    except Exception as err:
        errors.put(f"worker {rank}: {type(err).__name__}: {err}" if not isinstance(err, LensrunError) else str(err))
        raise
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
