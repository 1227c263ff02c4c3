"""Prompt-embedding cache, in memory and on disk: a repeated prompt costs no encoder work.

Key: prompt text, template date, token limit, feature dtype and a fingerprint of the encoder's weights, so a
cached entry is exactly what the encoder would produce. Entries are the valid-token features only. A new entry's
copy off the GPU and its file are finished on a side thread: the GPU thread never waits for either.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from lensrun.metadata import write_atomic
from lensrun.transfers import Download, upload

_DISK = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lensrun-prompt-cache")  # joined at exit


def default_cache_dir() -> Path:
    """``$LENSRUN_CACHE_DIR`` or ``~/.cache/lensrun``."""
    return Path(os.environ.get("LENSRUN_CACHE_DIR", Path.home() / ".cache" / "lensrun"))


def folder_fingerprint(folder: Path) -> str:
    """Cheap identity of a weights folder (or one weights file): config plus each shard's name, size and
    first/last MiB."""
    h = hashlib.sha256()
    for path in [folder] if folder.is_file() else sorted(folder.iterdir()):
        if path.suffix not in (".json", ".safetensors"):
            continue
        h.update(path.name.encode())
        size = path.stat().st_size
        h.update(str(size).encode())
        with open(path, "rb") as f:
            h.update(f.read(2**20))
            if size > 2**21:
                f.seek(-(2**20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:32]


class PromptCache:
    """LRU in memory (``capacity`` prompts) backed by safetensors files under ``folder`` (None: memory only)."""

    def __init__(self, encoder_id: str, folder: Path | None = None, capacity: int = 64) -> None:
        self.encoder_id = encoder_id
        self.folder = folder
        self.capacity = capacity
        self._memory: OrderedDict[str, list[Download]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self._writes: list[Future] = []  # files still being written

    def key(self, prompt: str, template_date: str, max_length: int, dtype: torch.dtype) -> str:
        blob = json.dumps([self.encoder_id, prompt, template_date, max_length, str(dtype)])
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str, device: torch.device) -> list[torch.Tensor] | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            self.hits += 1
            return [upload(d.result(), device) for d in self._memory[key]]
        path = self._path(key)
        if path is not None and path.is_file():
            tensors = load_file(path)
            features = [Download(tensors[f"layer_{i}"]) for i in range(len(tensors))]
            self._remember(key, features)
            self.hits += 1
            return [upload(d.result(), device) for d in features]
        self.misses += 1
        return None

    def has(self, key: str) -> bool:
        path = self._path(key)
        return key in self._memory or (path is not None and path.is_file())

    def put(self, key: str, features: list[torch.Tensor]) -> None:
        downloads = [Download(f.contiguous()) for f in features]
        self._remember(key, downloads)
        path = self._path(key)
        if path is not None:
            self._writes = [w for w in self._writes if not w.done()]
            self._writes.append(_DISK.submit(_write, path, downloads))

    def flush(self) -> None:
        """Wait until every entry put so far is on disk (another process, or cache object, can read it)."""
        futures.wait(self._writes)
        for write in self._writes:
            write.result()
        self._writes = []

    def _remember(self, key: str, features: list[Download]) -> None:
        self._memory[key] = features
        self._memory.move_to_end(key)
        while len(self._memory) > self.capacity:
            self._memory.popitem(last=False)

    def _path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key}.safetensors"


def _write(path: Path, downloads: list[Download]) -> None:
    blob = save({f"layer_{i}": d.result() for i, d in enumerate(downloads)})
    write_atomic(path, lambda f: f.write(blob))
