"""One image on several GPUs over torch.distributed: CFG-parallel or sequence-parallel denoising.

* CFG-parallel (2 GPUs, guided images): Lens guides every step with a conditional and an unconditional velocity
  (CFG 5), the same transformer on the same latents with different text; rank 0 runs the conditional branch,
  rank 1 the unconditional one, and one all-gather of the two velocities per step lets both take the same Euler
  step. Each branch is computed exactly as on one GPU, so the image is the single-GPU image.
* Sequence-parallel (Ulysses; any GPU count dividing the 24 heads; ``launch(mode="sequence")``): each rank
  holds a slice of the image tokens through the whole denoise (the text, short, whole on every rank); in each
  block's joint attention all-to-alls trade token slices for head slices and back
  (``LensJointAttention._sequence_parallel``); the latents are gathered once at the end. GEMMs over fewer rows
  may round differently: PSNR against the single-GPU image is reported, not bit equality. Measured slower
  than one GPU while its exchanges broke the compiled blocks' graphs (``ONE_GPU_INSTEAD``), so ``lensrun
  generate --gpus`` uses it only when asked (``--split sequence``); the exchanges are now functional
  collectives traced into the blocks.
* Both (an even count above two, guided images; ``launch(mode="cfg+sequence")``): the first half of the ranks
  runs the conditional branch, the second half the unconditional one, each half splitting its tokens as
  above; rank j and rank j + N/2 hold the same tokens and exchange their velocities each step. Like
  sequence-parallel, not yet measured on GPUs, so only run when asked (``--split``).

In every mode rank 0 encodes the prompts and broadcasts the features (the encoder runs once), and rank 0 decodes
and writes the PNGs.

``launch`` spawns one worker process per GPU (``torch.multiprocessing``, NCCL on CUDA, gloo on the CPU for
tests); each worker loads an ``Engine`` on its own device and drives ``Engine.run`` like every other surface.
NVLink multicast stays off in every worker (``NO_MULTICAST``).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from lensrun.errors import LensrunError

# torch 2.13 renamed all_gather_tensor (kept, with a warning); the GPU machine's 2.11 has only the old name.
_ALL_GATHER = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


MODE_NAMES = {"cfg": "CFG-parallel", "sequence": "sequence-parallel", "cfg+sequence": "CFG-parallel × sequence-parallel"}


@dataclass
class Group:
    """This process's place in the group. ``mode``: 'cfg' (2 ranks: rank 0 the conditional branch, rank 1 the
    unconditional one), 'sequence' (every rank a slice of the image tokens, both branches), or 'cfg+sequence'
    (an even count: the first half runs the conditional branch, the second half the unconditional one, each
    half splitting its tokens). ``sequence``: this rank's token-slicing group, if any; ``pair``: the process
    group that exchanges the two branches' velocities (None: every rank)."""

    rank: int
    world: int
    device: torch.device
    mode: str = "cfg"
    sequence: Sequence | None = None
    pair: object | None = None

    @classmethod
    def create(cls, rank: int, world: int, device: torch.device, mode: str) -> Group:
        """The group for ``mode``; every rank calls this in the same order (process groups are made together)."""
        if mode == "cfg":
            return cls(rank, world, device, mode)
        if mode == "sequence":
            return cls(rank, world, device, mode, Sequence(rank, world, dist.group.WORLD))
        half = world // 2
        halves = [dist.new_group(list(range(b * half, (b + 1) * half))) for b in range(2)]
        pairs = [dist.new_group([j, j + half]) for j in range(half)]
        return cls(rank, world, device, mode, Sequence(rank % half, half, halves[rank // half]), pairs[rank % half])

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def branch(self) -> int:
        """0: this rank computes the conditional velocity, 1: the unconditional one (CFG modes)."""
        return self.rank // (self.world // 2)

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

    def branches(self, mine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional) velocity of this rank's tokens: its own and its counterpart's."""
        out = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(out, mine.contiguous(), group=self.pair)
        return out[0], out[1]

    def _object_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None


@dataclass
class Sequence:
    """Ranks that share one branch's image tokens (Ulysses): ``rank`` and ``world`` within ``group``."""

    rank: int
    world: int
    group: object

    def shard(self, tokens: torch.Tensor) -> torch.Tensor:
        """This rank's slice [B, N/P, C] of image tokens [B, N, C]."""
        return tokens.chunk(self.world, dim=1)[self.rank].contiguous()

    def unshard(self, local: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(out, local.contiguous(), group=self.group)
        return torch.cat(out, dim=1)

    def local_rows(self, table: torch.Tensor, image_tokens: int) -> torch.Tensor:
        """This rank's image rows of a per-position table [N + S, …], then every text row."""
        n = image_tokens // self.world
        return torch.cat([table[self.rank * n : (self.rank + 1) * n], table[image_tokens:]])

    # The exchanges inside a block use functional collectives, which torch.compile traces into the block's
    # graph: a compiled block has no graph break per exchange.
    def scatter_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, n, D] (this rank's tokens, every head) → [B, H/P, P·n, D] (every token, this rank's heads)."""
        b, h, n, d = x.shape
        send = x.reshape(b, self.world, h // self.world, n, d).transpose(0, 1).contiguous()
        recv = funcol.wait_tensor(funcol.all_to_all_single(send, None, None, self.group))
        return recv.permute(1, 2, 0, 3, 4).reshape(b, h // self.world, self.world * n, d)

    def gather_heads(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse: [B, H/P, P·n, D] → [B, H, n, D]."""
        b, hp, tokens, d = x.shape
        n = tokens // self.world
        send = x.reshape(b, hp, self.world, n, d).permute(2, 0, 1, 3, 4).contiguous()
        recv = funcol.wait_tensor(funcol.all_to_all_single(send, None, None, self.group))
        return recv.transpose(0, 1).reshape(b, self.world * hp, n, d)

    def my_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, S, D] → this rank's heads [B, H/P, S, D]."""
        return x.chunk(self.world, dim=1)[self.rank]

    def all_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H/P, S, D] from every rank → [B, H, S, D]."""
        if x.shape[2] == 0:  # the empty negative prompt: nothing to exchange
            return x.new_empty(x.shape[0], x.shape[1] * self.world, 0, x.shape[3])
        return funcol.wait_tensor(_ALL_GATHER(x.contiguous(), 1, self.group))


HEADS = 24  # Lens's attention heads: a sequence-parallel group splits them evenly
# Sequence parallelism works (tests/test_parallel.py) but measured slower than one GPU: 1024² Turbo 0.560 s
# on two H200s against 0.156 s on one (2026-11-28, docs/scale-out.md). The CLI does not choose it.
ONE_GPU_INSTEAD = ("CFG 1 (Turbo) has no second branch to put on the other GPU, and splitting the sequence "
                   "measured slower than one GPU (docs/scale-out.md): running on one GPU (--split sequence to try it)")  # fmt: skip


def device_per_gpu(flag: str, count: int, device: str | None) -> list[str | None]:
    """One device for each of ``count`` workers or engines (``flag`` names the option in errors): cuda:0… on a
    GPU machine, checked against its GPU count before any work; the CPU when ``device`` is cpu (tests)."""
    if count < 1:
        raise LensrunError(f"{flag} must be 1 or more, got {count}")
    if count == 1:
        return [device]
    if device == "cpu":
        return ["cpu"] * count
    if device not in (None, "cuda"):
        raise LensrunError(f"{flag} {count} places one on each of cuda:0…cuda:{count - 1}; leave --device out (or cpu for a test)")
    found = torch.cuda.device_count()
    if found < count:
        raise LensrunError(f"{flag} {count} needs {count} GPUs; this machine has {found}")
    return [f"cuda:{i}" for i in range(count)]


def check_gpus(gpus: int, device: str | None, split: str = "auto") -> None:
    """A clear error before any work: more than 2 GPUs only for an asked sequence split, and this machine has
    them."""
    if gpus > 2 and split == "auto":
        raise LensrunError(f"--gpus {gpus}: one image runs on 1 or 2 GPUs (CFG-parallel); splitting it further "
                           "(sequence parallelism) measured slower than one GPU, see docs/scale-out.md; to try it "
                           "anyway: --split sequence or cfg+sequence")  # fmt: skip
    device_per_gpu("--gpus", gpus, device)


def mode_for(tasks, gpus: int, split: str = "auto") -> str:
    """How ``gpus`` ranks share these images (``split``, see ``request.SPLITS``). ``auto``: 'cfg' for two GPUs
    and guided images (exact, one exchange per step); 'cfg+sequence' for an even count above two and guided
    images (each branch's tokens split over half the ranks); else 'sequence'. An asked split that cannot serve
    these images, or heads and tokens that do not split evenly, are clear errors."""
    guided = all(t.request.cfg != 1.0 for t in tasks)
    mode = split
    if split == "auto":
        mode = "cfg" if gpus == 2 and guided else "cfg+sequence" if guided and gpus % 2 == 0 else "sequence"
    if mode != "sequence" and not guided:
        raise LensrunError(f"--split {mode} runs the two CFG branches apart; these images have CFG 1 (one branch): use sequence")
    if mode == "cfg" and gpus != 2:
        raise LensrunError(f"--split cfg puts the two CFG branches on 2 GPUs, not {gpus}: use cfg+sequence")
    if mode == "cfg+sequence" and (gpus % 2 or gpus < 4):
        raise LensrunError(f"--split cfg+sequence needs an even count of 4 or more GPUs, not {gpus}")
    if mode == "cfg":
        return mode
    split_over = gpus // 2 if mode == "cfg+sequence" else gpus
    if HEADS % split_over:
        raise LensrunError(f"{gpus} GPUs ({MODE_NAMES[mode]}): the {HEADS} attention heads do not split over {split_over}")
    for t in tasks:
        h, w = t.request.grid
        if (h * w) % split_over:
            raise LensrunError(f"{t.request.width}x{t.request.height} has {h * w} latent tokens, which do not split over {split_over} GPUs")
    return mode


def launch(options, tasks: list, notify=None, progress: bool = False, mode: str | None = None) -> None:
    """Run ``tasks`` (their PNG paths set) on ``options.gpus`` worker processes; returns when every PNG is written.
    ``mode``: one of ``MODE_NAMES`` (default: ``options.split``). A worker's error ends the run with that error."""
    import pickle

    import torch.multiprocessing as mp

    world = options.gpus
    mode = mode_for(tasks, world, mode or options.split)
    try:  # workers are spawned processes: a callback that cannot travel (a lambda) stays silent there
        pickle.dumps(notify)
    except (pickle.PicklingError, AttributeError, TypeError):
        notify = None
    backend = "gloo" if options.device == "cpu" else "nccl"
    os.environ.update(NO_MULTICAST)  # spawned workers inherit it
    port = _free_port()
    errors = mp.get_context("spawn").SimpleQueue()
    try:
        mp.start_processes(
            _worker, args=(world, mode, backend, port, options, tasks, notify, progress, errors), nprocs=world,
            start_method="spawn", join=True,
        )  # fmt: skip
    except mp.ProcessRaisedException:
        pass  # the worker put its error on the queue first
    except mp.ProcessExitedException as err:  # killed, or died before it could say why
        raise LensrunError(f"a GPU worker process ended without finishing: {err}") from None
    if not errors.empty():
        raise LensrunError(errors.get())


def _worker(rank: int, world: int, mode: str, backend: str, port: int, options, tasks, notify, progress, errors) -> None:
    """One spawned process of ``launch`` (it ends the process itself once its images are done)."""
    from lensrun.engine import Engine

    os.environ.update(NO_MULTICAST, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cpu") if backend == "gloo" else torch.device("cuda", rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world, device_id=device if device.type == "cuda" else None)
    try:
        group = Group.create(rank, world, device, mode)
        local = dataclasses.replace(options, device=str(device), gpus=1, split="auto")  # this worker: one device
        say = notify if group.leader else None
        engine = Engine.load(local, [t.request for t in tasks], say)
        engine.pipe.parallel = group
        if group.sequence is not None:
            engine.pipe.transformer.split_sequence(group.sequence)
        plans, why = engine.plans([t.request for t in tasks])
        plans = group.share_object(plans)  # one plan for all: the same precision, so the same arithmetic
        if say is not None:
            say(f"{MODE_NAMES[mode]} on {world} devices; {why}")
        mine = tasks if group.leader else [dataclasses.replace(t, path=None, keep=None) for t in tasks]
        engine.run(mine, plans=plans, notify=say, progress=progress and group.leader)
        dist.barrier()  # every rank's last exchange is over before any rank leaves
    except Exception as err:
        errors.put(f"worker {rank}: {type(err).__name__}: {err}" if not isinstance(err, LensrunError) else str(err))
        dist.destroy_process_group()
        raise
    # Every image is written: leave without tearing the process group down. That teardown (gloo's threads, then
    # the interpreter's) ended a finished worker with SIGABRT ("terminate called without an active exception")
    # about once in nine CI runs; the OS closes the connections anyway.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
