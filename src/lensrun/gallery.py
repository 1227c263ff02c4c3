"""`lensrun gallery`: a prompt file in, a reproducible captioned gallery out — resumable.

This module adds only the gallery's file formats, its manifest and its index page; the images are made by the
engine (``lensrun.engine``): prompts encoded once, images denoised grouped by size and decoded group by group,
each PNG written atomically. Each finished image is recorded in ``manifest.jsonl``; a re-run skips images whose
recipe hash is done.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from lensrun import __version__
from lensrun.errors import LensrunError
from lensrun.metadata import write_atomic
from lensrun.request import REQUEST_OPTIONS, EngineOptions, GenerationRequest

ENTRY_KEYS = {"name", *REQUEST_OPTIONS}
MANIFEST = "manifest.jsonl"
CURRENT = "current.json"  # the image hashes of the gallery file as last run: the index and --entry follow it
WORK_FOLDER = ".lensrun-work"


@dataclass
class Entry:
    name: str
    where: str  # how to point at it in an error: "entry 'portrait'" or "line 3"
    settings: dict


def _entries_from_file(path: Path) -> tuple[dict, list[tuple[str, dict]]]:
    """(file defaults, [(where, raw entry)]) from TOML, JSON (same shape, or a list) or plain text."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise LensrunError(f"{path}: not valid TOML: {err}") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise LensrunError(f"{path}: not valid JSON: {err}") from None
        if isinstance(data, list):
            data = {"image": data}
    else:
        lines = [(i, ln.strip()) for i, ln in enumerate(text.splitlines(), 1)]
        return {}, [(f"line {i}", {"prompt": ln, "name": f"line-{i}"}) for i, ln in lines if ln and not ln.startswith("#")]
    if not isinstance(data, dict) or not isinstance(data.get("image", []), list):
        raise LensrunError(f"{path}: expected a [defaults] table and [[image]] entries (or a JSON list of entries)")
    unknown_top = set(data) - {"defaults", "image"}
    if unknown_top:
        raise LensrunError(f"{path}: unknown top-level key(s) {sorted(unknown_top)}; allowed: defaults, image")
    raw = data.get("image", [])
    return data.get("defaults", {}), [(f"entry {i + 1}", e) for i, e in enumerate(raw)]


SIZE_KEYS, BUCKET_KEYS = ("height", "width"), ("base_resolution", "aspect_ratio")


def _merge(*layers: dict) -> dict:
    """Later layers win; a layer that gives an explicit size drops the bucket inherited from below, and the
    other way round, so an entry's own size never conflicts with a default."""
    merged: dict = {}
    for layer in layers:
        for own, other in ((SIZE_KEYS, BUCKET_KEYS), (BUCKET_KEYS, SIZE_KEYS)):
            if any(k in layer for k in own):
                for k in other:
                    merged.pop(k, None)
        merged.update(layer)
    return merged


def seed_for(name: str, prompt: str) -> int:
    """A fixed seed for an entry that gives none, so the gallery (and its resume) is reproducible."""
    return int(hashlib.sha256(f"{name}\n{prompt}".encode()).hexdigest()[:8], 16) % 2**31


def load_gallery(path: str | Path, defaults: dict | None = None, variant: str | None = None) -> list[Entry]:
    """Parse and validate every entry; all problems are reported together, naming each entry. ``variant``
    (the model's) is what an entry without one gets (its preset steps and CFG)."""
    path = Path(path)
    if not path.is_file():
        raise LensrunError(f"gallery file not found: {path}")
    file_defaults, raw = _entries_from_file(path)
    problems, entries, names = [], [], set()
    for where, item in [("[defaults]", file_defaults)] + raw:
        if not isinstance(item, dict):
            problems.append(f"{where}: expected a table of settings")
            continue
        unknown = set(item) - ENTRY_KEYS
        if unknown:
            label = f"{where} ({item['name']!r})" if "name" in item else where
            problems.append(f"{label}: unknown key(s) {sorted(unknown)}; allowed: {', '.join(sorted(ENTRY_KEYS))}")
    if not raw:
        problems.append(f"{path}: no entries")
    for where, item in raw:
        if not isinstance(item, dict) or set(item) - ENTRY_KEYS:
            continue
        settings = _merge(defaults or {}, file_defaults, item)
        name = str(settings.get("name") or f"image-{len(entries) + 1:03d}")
        label = f"{where} ('{name}')"
        if name in names:
            problems.append(f"{label}: duplicate name")
        names.add(name)
        if not isinstance(settings.get("prompt"), str) or not settings["prompt"].strip():
            problems.append(f"{label}: 'prompt' must be a non-empty string")
            continue
        settings["name"] = name
        if settings.get("seed") is None:
            settings["seed"] = seed_for(name, settings["prompt"])
        if variant is not None:
            settings.setdefault("variant", variant)
        try:
            entry_request(settings)
        except LensrunError as err:
            problems.append(f"{label}: {err}")
            continue
        entries.append(Entry(name, label, settings))
    if problems:
        raise LensrunError("invalid gallery:\n  " + "\n  ".join(problems))
    return entries


def entry_request(settings: dict) -> GenerationRequest:
    """The validated request of one entry's settings (every key but ``name`` is a request option)."""
    return GenerationRequest.build(**{k: v for k, v in settings.items() if k != "name"})


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(out: Path) -> list[dict]:
    """Rows of the manifest; a torn last line (a crash while appending) is ignored."""
    path = out / MANIFEST
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _append(out: Path, row: dict) -> None:
    with open(out / MANIFEST, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def plan_images(entries: list[Entry], options: EngineOptions, dtype: str) -> list[tuple[Entry, GenerationRequest, str, str]]:
    """Every image of the gallery: (entry, single-image request, identity hash, file name). The hash covers
    what the user asked for (request, model, dtype, forced precision), not the plan, so a resume finds it."""
    images = []
    for entry in entries:
        singles = entry_request(entry.settings).images()
        for k, single in enumerate(singles):
            identity = {**single.record(), "model": options.model, "dtype": dtype, "quantize": options.quantize}
            digest = config_hash(identity)
            suffix = f"-{k}" if len(singles) > 1 else ""
            images.append((entry, single, digest, f"{entry.name}{suffix}-{digest[:8]}.png"))
    return images


@dataclass
class GalleryRun:
    """One run over a gallery folder: which images are pending, and the recording of each finished one (the
    manifest has one writer: the process that made this object)."""

    out: Path
    options: EngineOptions
    dtype: str
    pending: list[tuple[Entry, GenerationRequest, str, str]]
    summary: dict

    @classmethod
    def start(cls, options: EngineOptions, entries: list[Entry], out: str | Path) -> GalleryRun:
        import torch

        from lensrun.engine import resolve_device, resolve_dtype

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        try:  # a Ray driver may lack the device its workers use: only the name is checked here
            device = torch.device(options.device) if options.device else resolve_device(None)
        except RuntimeError:
            raise LensrunError(f"unknown device '{options.device}': use cpu, cuda or cuda:N") from None
        dtype = str(resolve_dtype(options.dtype, device)).removeprefix("torch.")
        done_hashes = set(_finished(out))
        images = plan_images(entries, options, dtype)
        current = json.dumps({"hashes": [digest for _, _, digest, _ in images]}).encode()
        write_atomic(out / CURRENT, lambda f: f.write(current))
        pending = [i for i in images if i[2] not in done_hashes]
        return cls(out, options, dtype, pending, {"done": 0, "skipped": len(images) - len(pending), "failed": 0})

    def tasks(self, images=None) -> list:
        """Engine tasks for ``images`` (default: every pending one); each keeps its denoised latents in the work
        folder until its PNG is written, so an interrupted image resumes at decoding."""
        from lensrun.engine import Task

        work = self.out / WORK_FOLDER
        return [
            Task(single, self.out / file, (entry, single, digest, file), keep=work / f"{digest}.safetensors")
            for entry, single, digest, file in (self.pending if images is None else images)
        ]  # fmt: skip

    def record(self, tag, ok: bool, config: dict, report: dict, error: str | None) -> None:
        """One manifest row for a finished image (done or failed)."""
        entry, single, digest, file = tag
        row = {"hash": digest, "name": entry.name, "file": file, "lensrun_version": __version__}
        if ok:
            _append(self.out, {**row, "status": "done", "config": config, "report": report})
            self.summary["done"] += 1
        else:
            config = {**single.record(), "model": self.options.model, "dtype": self.dtype}
            _append(self.out, {**row, "status": "failed", "error": error, "config": config})
            self.summary["failed"] += 1

    def finish(self) -> dict:
        work = self.out / WORK_FOLDER
        if work.is_dir() and not any(work.iterdir()):
            work.rmdir()
        write_index(self.out)
        return self.summary


def run_gallery(
    options: EngineOptions, entries: list[Entry], out: str | Path, show_progress: bool = True, notify=None
) -> dict:
    """Make every image not already done; returns the summary (done / skipped / failed)."""
    from lensrun.engine import Engine

    run = GalleryRun.start(options, entries, out)
    if run.pending:
        engine = Engine.shared(options, [single for _, single, _, _ in run.pending], notify)

        def record(result) -> None:
            run.record(result.task.tag, result.ok, result.config, result.report, result.error)

        engine.run(run.tasks(), isolate=True, on_result=record, notify=notify, progress=show_progress)
    return run.finish()


def _caption(row: dict) -> str:
    c, r = row["config"], row.get("report", {})
    size = (
        f"base resolution {c['base_resolution']}, aspect ratio {c['aspect_ratio']}"
        if c.get("base_resolution")
        else f"{c['width']}×{c['height']}"
    )
    peak = f", peak {r['peak_allocated_gib']:.1f} GiB" if "peak_allocated_gib" in r else ""
    seconds = r.get("seconds", 0)
    seconds = sum(seconds.values()) if isinstance(seconds, dict) else seconds  # older rows: one number
    negative = f"\nnegative: {c['negative_prompt']}" if c.get("negative_prompt") else ""
    return (
        f"{size}, steps {c['steps']}, cfg {c['cfg']:g}, seed {c['seed']}\n{c['prompt']}{negative}\n"
        f"plan {r.get('plan', '?')}{peak}, {seconds:.2f} s"
    )


def current_hashes(out: Path) -> set[str] | None:
    """The image hashes of the gallery file as last run (None for folders made before this was recorded)."""
    path = out / CURRENT
    if not path.is_file():
        return None
    try:
        return set(json.loads(path.read_text(encoding="utf-8"))["hashes"])
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def _finished(out: Path) -> dict[str, dict]:
    """The latest done row per image hash whose PNG is still there."""
    return {r["hash"]: r for r in read_manifest(out) if r.get("status") == "done" and (out / r["file"]).is_file()}


def finished_rows(out: Path) -> tuple[list[dict], list[dict]]:
    """Finished images, (current, superseded): superseded rows belong to entries since edited or removed."""
    rows = list(_finished(out).values())
    current = current_hashes(out)
    if current is None:
        return rows, []
    return [r for r in rows if r["hash"] in current], [r for r in rows if r["hash"] not in current]


def _figure(row: dict) -> str:
    name, file = html.escape(row["name"]), html.escape(row["file"], quote=True)
    return (
        f'<figure data-text="{html.escape((row["name"] + " " + _caption(row)).lower(), quote=True)}">'
        f'<a href="{file}"><img src="{file}" alt="{name}" loading="lazy"></a>'
        f"<figcaption><b>{name}</b>\n{html.escape(_caption(row))}</figcaption></figure>"
    )


def write_index(out: Path) -> None:
    """A self-contained index.html (no network): grid of the current images with their exact configs, a text
    filter, and images of since-edited entries apart, marked superseded."""
    rows, superseded = finished_rows(out)
    figures = [_figure(r) for r in rows]
    old = ""
    if superseded:
        old = (f'<details id="superseded"><summary>{len(superseded)} superseded image(s): their entries were edited or '
               f'removed since</summary><div class="grid">{"".join(_figure(r) for r in superseded)}</div></details>')  # fmt: skip
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>lensrun gallery</title>
<style>body{{font:14px system-ui,sans-serif;margin:1.5rem}} .grid{{display:flex;flex-wrap:wrap;gap:1rem}}
figure{{margin:0;width:320px}} img{{width:320px;height:auto;display:block;background:#eee}}
figcaption{{white-space:pre-wrap;font-size:12px;color:#333}} input{{font:inherit;padding:.3rem;width:20rem}}</style>
</head><body><h1>lensrun gallery</h1><p>{len(figures)} images · <input id="q" placeholder="filter by text"></p>
<div id="grid" class="grid">{"".join(figures)}</div>{old}
<script>document.getElementById('q').addEventListener('input', e => {{ const q = e.target.value.toLowerCase();
for (const f of document.querySelectorAll('figure')) f.style.display = f.dataset.text.includes(q) ? '' : 'none'; }});
</script></body></html>"""
    write_atomic(out / "index.html", lambda f: f.write(page.encode("utf-8")))


def manifest_config(path: str | Path, entry: str | None) -> dict:
    """The config of one finished image of a gallery (by entry name or file name; the only one if there is
    one), following the gallery file as last run; a superseded image is found by its file name only."""
    out = Path(path).parent
    if not Path(path).is_file():
        raise LensrunError(f"{path}: no such manifest")
    rows, superseded = finished_rows(out)
    if not rows and not superseded:
        raise LensrunError(f"{path}: no finished images in this manifest")
    if entry is not None:
        matches = [r for r in rows if entry in (r["name"], r["file"])] or [r for r in superseded if entry == r["file"]]
        if not matches:
            names = ", ".join(sorted({r["name"] for r in rows})[:20])
            raise LensrunError(f"{path}: no finished image named '{entry}'; entries: {names}")
        rows = matches
    if len(rows) != 1:
        files = ", ".join(r["file"] for r in rows[:10])
        raise LensrunError(f"{path}: say which image with --entry NAME or FILE (one of: {files})")
    return {**rows[0]["config"], "_file": rows[0]["file"]}
