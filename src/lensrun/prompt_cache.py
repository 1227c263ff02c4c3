"""Prompt-embedding cache, in memory and on disk: a repeated prompt costs no encoder work.

Key: prompt text, template date, token limit, feature dtype and a fingerprint of the encoder's weights, so a
cached entry is exactly what the encoder would produce. Entries are the valid-token features only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from lensrun.metadata import write_atomic


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
        self._memory: OrderedDict[str, list[torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def key(self, prompt: str, template_date: str, max_length: int, dtype: torch.dtype) -> str:
        blob = json.dumps([self.encoder_id, prompt, template_date, max_length, str(dtype)])
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str, device: torch.device) -> list[torch.Tensor] | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            self.hits += 1
            return [t.to(device) for t in self._memory[key]]
        path = self._path(key)
        if path is not None and path.is_file():
            tensors = load_file(path)
            features = [tensors[f"layer_{i}"] for i in range(len(tensors))]
            self._remember(key, features)
            self.hits += 1
            return [t.to(device) for t in features]
        self.misses += 1
        return None

    def has(self, key: str) -> bool:
        path = self._path(key)
        return key in self._memory or (path is not None and path.is_file())

    def put(self, key: str, features: list[torch.Tensor]) -> None:
        cpu = [f.detach().to("cpu").contiguous() for f in features]
        self._remember(key, cpu)
        path = self._path(key)
        if path is not None:
            blob = save({f"layer_{i}": t for i, t in enumerate(cpu)})
            write_atomic(path, lambda f: f.write(blob))

    def _remember(self, key: str, features: list[torch.Tensor]) -> None:
        self._memory[key] = features
        self._memory.move_to_end(key)
        while len(self._memory) > self.capacity:
            self._memory.popitem(last=False)

    def _path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key}.safetensors"
