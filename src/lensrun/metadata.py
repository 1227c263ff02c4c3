"""PNG files that carry their own recipe: a ``lensrun`` JSON chunk (machine-readable, used by replay) and an
A1111-style ``parameters`` text (read by common image tools). Files are written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

from lensrun.errors import LensrunError

CHUNK = "lensrun"
REPORT_CHUNK = "lensrun-report"  # what happened (plan, peak VRAM, times): not part of the recipe


def parameters_text(config: dict) -> str:
    """The A1111 ``parameters`` convention: prompt, negative prompt, then 'Key: value' pairs."""
    pairs = [
        ("Steps", config.get("steps")),
        ("Sampler", "flow-match Euler"),
        ("CFG scale", config.get("cfg")),
        ("Seed", config.get("seed")),
        ("Size", f"{config.get('width')}x{config.get('height')}"),
        ("Model", config.get("model")),
        ("Variant", config.get("variant")),
        ("Base resolution", config.get("base_resolution")),
        ("Aspect ratio", config.get("aspect_ratio")),
        ("Noise", config.get("noise")),
        ("Template date", config.get("template_date")),
        ("Version", f"lensrun {config.get('lensrun_version')}"),
    ]
    tail = ", ".join(f"{k}: {v}" for k, v in pairs if v is not None)
    return f"{config.get('prompt', '')}\nNegative prompt: {config.get('negative_prompt', '')}\n{tail}"


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_atomic(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename: a crash never leaves a partial file. The file
    ends with the permissions a plain ``open()`` would give (``mkstemp`` creates it private)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_png(image: Image.Image, path: Path, config: dict, report: dict | None = None) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text(CHUNK, json.dumps(config, sort_keys=True))
    if report is not None:
        info.add_text(REPORT_CHUNK, json.dumps(report, sort_keys=True))
    info.add_text("parameters", parameters_text(config))
    write_atomic(path, lambda f: image.save(f, format="PNG", pnginfo=info))


def read_report(path: str | Path) -> dict:
    """The run report stored beside the recipe (empty if absent)."""
    with Image.open(path) as im:
        return json.loads(im.text.get(REPORT_CHUNK, "{}"))


def read_config(path: str | Path) -> dict:
    """The recipe stored in a lensrun PNG."""
    path = Path(path)
    if not path.is_file():
        raise LensrunError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            text = im.text.get(CHUNK) if hasattr(im, "text") else None
    except OSError as err:
        raise LensrunError(f"{path} is not a readable image: {err}") from None
    if text is None:
        raise LensrunError(f"{path} carries no lensrun metadata (was it made by lensrun and kept as PNG?)")
    return json.loads(text)
