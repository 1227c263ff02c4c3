"""Finding and checking a diffusers-layout Lens checkpoint (local folder or Hugging Face repo), safetensors only.

Every check here reads file names and safetensors headers only, so a bad folder is reported before gigabytes
are read: missing folder, missing subfolder, pickle weights, missing keys, shape mismatches.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import torch
from safetensors import safe_open

from lensrun.errors import LensrunError

COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
WEIGHT_COMPONENTS = ("transformer", "text_encoder", "vae")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack")
WHERE_TO_GET = (
    "Microsoft withdrew the original Lens repos; community diffusers-layout mirrors (e.g. "
    "YuCollection/Lens-Diffusers) work with --model REPO_ID, a downloaded folder with --model PATH, and "
    "ComfyUI's single files (Comfy-Org/Lens) with --model COMFYUI_MODELS_FOLDER"
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what the pipeline reads: configs, safetensors, tokenizer files. Pickles are never downloaded.
HUB_PATTERNS = ["model_index.json", "*/*.json", "*/*.safetensors", "tokenizer/*", "*/*.jinja"]


def resolve_model(model: str | Path) -> Path:
    """A local folder as is, or a Hub repo id (``owner/name``) through the local cache / download."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    if not _REPO_ID.match(text) or path.exists():
        raise LensrunError(f"model folder not found: {text}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError as err:
        raise LensrunError(
            f"model '{text}' is not a local folder and is not in the Hugging Face cache (offline, or the Hub is "
            f"unreachable). {WHERE_TO_GET}. ({type(err).__name__})"
        ) from None
    except HfHubHTTPError as err:
        raise LensrunError(
            f"model '{text}' is not a local folder and could not be fetched from the Hub: {str(err).splitlines()[0]}. "
            f"{WHERE_TO_GET}."
        ) from None


def check_layout(root: Path, provided: set[str] | frozenset[str] = frozenset()) -> dict:
    """Validate model_index.json and the component subfolders; return the model index. ``provided``: weight
    components given as single files instead (their subfolders may be absent)."""
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise LensrunError(
            f"{root} has no model_index.json: expected a diffusers-layout Lens folder "
            f"(model_index.json + {', '.join(c + '/' for c in COMPONENTS)})"
        )
    index = read_json(index_file)
    for name in COMPONENTS:
        if name not in provided and not (root / name).is_dir():
            raise LensrunError(f"missing subfolder '{name}/' in {root} (a Lens checkpoint needs {', '.join(COMPONENTS)})")
    for name in (c for c in WEIGHT_COMPONENTS if c not in provided):
        read_json(root / name / "config.json")
        _key_to_file(root / name)  # every shard's header readable (headers only: milliseconds)
    read_json(root / "scheduler" / "scheduler_config.json")
    return index


def read_json(path: Path) -> dict:
    """A config file, or an error naming it and what is wrong."""
    if not path.is_file():
        raise LensrunError(f"{path} is missing (every Lens component folder has its config file)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LensrunError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise LensrunError(f"{path} should hold a JSON object of settings, not {type(data).__name__}")
    return data



def component_config(root: Path | None, part: str, full: dict) -> dict:
    """The folder's config for a component, or the published Lens one when the component comes from a single
    file with no folder beside it (all Lens variants share the shapes; the file's shapes are checked)."""
    path = root / part / "config.json" if root is not None else None
    return read_json(path) if path is not None and path.is_file() else {**full}

def safetensor_files(folder: Path) -> list[Path]:
    """The folder's safetensors shards; pickle-only folders are refused, never opened."""
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise LensrunError(
            f"refusing to load {folder / pickles[0]}: lensrun loads safetensors weights only "
            f"(pickle files can run code when opened); convert the checkpoint to .safetensors"
        )
    raise LensrunError(f"no .safetensors weights in {folder}")


def _key_to_file(folder: Path) -> dict[str, Path]:
    """Map every tensor name to its shard (headers only)."""
    mapping: dict[str, Path] = {}
    for file in safetensor_files(folder):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                    mapping[key] = file
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise LensrunError(f"{file}: not a readable safetensors file (truncated or corrupt?): {err}") from None
    return mapping


def check_shapes(folder: Path, expected: dict[str, torch.Tensor], ignore_unexpected: bool = True) -> dict[str, Path]:
    """Compare the checkpoint's tensor shapes with the model's; name the first bad key and both shapes."""
    mapping = _key_to_file(folder)
    missing = sorted(set(expected) - set(mapping))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LensrunError(f"{folder}: weight '{missing[0]}' is missing from the checkpoint{more}")
    if not ignore_unexpected:
        extra = sorted(set(mapping) - set(expected))
        if extra:
            raise LensrunError(f"{folder}: unexpected weight '{extra[0]}' in the checkpoint")
    handles: dict[Path, object] = {}
    try:
        for key, ref in expected.items():
            file = mapping[key]
            if file not in handles:
                handles[file] = safe_open(file, framework="pt").__enter__()
            shape = tuple(handles[file].get_slice(key).get_shape())
            if shape != tuple(ref.shape):
                raise LensrunError(
                    f"{folder}: weight '{key}' has shape {list(shape)} in the checkpoint but the model "
                    f"(from config.json) expects {list(ref.shape)}"
                )
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return mapping


def load_safetensors_folder(
    folder: Path, expected: dict[str, torch.Tensor], device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Read exactly the expected tensors (shape-checked) from a folder of shards; others are never read."""
    mapping = check_shapes(folder, expected)
    by_file: dict[Path, list[str]] = {}
    for key in expected:
        by_file.setdefault(mapping[key], []).append(key)
    out = {}
    for file, keys in by_file.items():
        with safe_open(file, framework="pt", device=str(device)) as f:
            for key in keys:
                out[key] = f.get_tensor(key)
    return out


class TensorReader:
    """Reads checkpoint folders' tensors onto ``device`` in background threads (one per shard, a few at once),
    so the weights travel while the caller imports the model code and builds the models; the copies release
    the GIL. ``skip``: per component, names that are never read (e.g. the encoder's ``lm_head``)."""

    WORKERS = 4

    def __init__(self, folders: dict[str, Path], device: torch.device, skip: dict[str, set[str]] | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.folders, self.device, self.skip = folders, device, skip or {}
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(self.WORKERS, thread_name_prefix="lensrun-weights")
        self.futures = {
            name: [self.pool.submit(self._read_file, file, self.skip.get(name, set())) for file in safetensor_files(folder)]
            for name, folder in folders.items()
        }
        self.pool.shutdown(wait=False)

    def _read_file(self, file: Path, skip: set[str]) -> dict[str, torch.Tensor]:
        out = {}
        with safe_open(file, framework="pt", device=str(self.device)) as f:
            for key in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                if self.stop.is_set():
                    break
                if key not in skip:
                    out[key] = f.get_tensor(key)
        return out

    def take(self, name: str) -> dict[str, torch.Tensor]:
        """One component's tensors (waits for its shards); a read error is raised here, naming the folder."""
        tensors: dict[str, torch.Tensor] = {}
        for future in self.futures.pop(name):
            try:
                tensors.update(future.result())
            except Exception as err:  # noqa: BLE001 - safetensors and CUDA raise their own types
                self.cancel()
                raise LensrunError(f"{self.folders[name]}: reading the weights failed: {err}") from None
        return tensors

    def cancel(self) -> None:
        self.stop.set()
        for futures in self.futures.values():
            for future in futures:
                future.cancel()
