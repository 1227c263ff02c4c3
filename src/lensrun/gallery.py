"""`lensrun gallery`: a prompt file in, a reproducible captioned gallery out — resumable and phase-batched.

Every prompt is encoded first (through the prompt cache), then every image is denoised (grouped by size, so
each compiled shape is reused), then decoded: the encoder's phase happens once per gallery. Each finished image
is written atomically and recorded in ``manifest.jsonl``; a re-run skips images whose config hash is done.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lensrun import __version__
from lensrun.decoding import decode_tokens, to_pil
from lensrun.errors import LensrunError
from lensrun.metadata import save_png, write_atomic
from lensrun.request import GenerationRequest

ENTRY_KEYS = {
    "name", "prompt", "negative_prompt", "seed", "steps", "cfg", "base_resolution", "aspect_ratio", "height",
    "width", "n", "variant",
}  # fmt: skip
MANIFEST = "manifest.jsonl"


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


def seed_for(name: str, prompt: str) -> int:
    """A fixed seed for an entry that gives none, so the gallery (and its resume) is reproducible."""
    return int(hashlib.sha256(f"{name}\n{prompt}".encode()).hexdigest()[:8], 16) % 2**31


def load_gallery(path: str | Path, defaults: dict | None = None) -> list[Entry]:
    """Parse and validate every entry; all problems are reported together, naming each entry."""
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
        settings = {**(defaults or {}), **file_defaults, **item}
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
        try:
            entry_request(settings, "lens")
        except LensrunError as err:
            problems.append(f"{label}: {err}")
            continue
        entries.append(Entry(name, label, settings))
    if problems:
        raise LensrunError("invalid gallery:\n  " + "\n  ".join(problems))
    return entries


def entry_request(settings: dict, variant: str, **common) -> GenerationRequest:
    """The validated request of one entry's settings (``common``: noise, template date, step cache)."""
    s = settings
    return GenerationRequest.build(
        s["prompt"], s.get("negative_prompt"), s.get("height"), s.get("width"), s.get("base_resolution"),
        s.get("aspect_ratio"), s.get("steps"), s.get("cfg"), s.get("n", 1), s["seed"],
        variant=s.get("variant") or variant, **common,
    )  # fmt: skip


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


@dataclass
class Job:
    """One image to make: its recipe, where it goes, and (once denoised) its latents."""

    entry: Entry
    config: dict
    hash: str
    file: str
    request: GenerationRequest
    latents: torch.Tensor | None = None
    seconds: float = 0.0


def plan_images(entries: list[Entry], pipe, common: dict | None = None) -> list[Job]:
    """Expand entries into images (entry ``n`` > 1 → seeds seed, seed+1, …), each with its config and hash."""
    jobs = []
    for entry in entries:
        s = entry.settings
        req = entry_request(s, pipe.variant, **(common or {}))
        for k in range(req.n):
            config = {
                **req.image_settings(0, k), "model": pipe.model_name, "variant": s.get("variant") or pipe.variant,
                "dtype": str(pipe.dtype).removeprefix("torch."), "quantize": pipe.precision,
                "vae_tiling": pipe.plan.vae_tiling,
            }  # fmt: skip
            single = GenerationRequest(**{**req.__dict__, "prompts": [s["prompt"]], "seed": config["seed"], "n": 1})
            digest = config_hash(config)
            suffix = f"-{k}" if req.n > 1 else ""
            jobs.append(Job(entry, config, digest, f"{entry.name}{suffix}-{digest[:8]}.png", single))
    return jobs


def run_gallery(pipe, entries: list[Entry], out: str | Path, show_progress: bool = True, common: dict | None = None) -> dict:
    """Make every image not already done; returns the summary (done / skipped / failed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done_hashes = {r["hash"] for r in read_manifest(out) if r.get("status") == "done" and (out / r["file"]).is_file()}
    jobs = plan_images(entries, pipe, common)
    pending = [j for j in jobs if j.hash not in done_hashes]
    summary = {"done": 0, "skipped": len(jobs) - len(pending), "failed": 0}
    bar = tqdm(total=sum(j.request.steps for j in pending), unit="step", disable=not show_progress)
    failed: dict[str, str] = {}

    def fail(job: Job, err: Exception) -> None:
        failed[job.hash] = f"{type(err).__name__}: {err}"
        _append(out, {"hash": job.hash, "name": job.entry.name, "status": "failed", "error": failed[job.hash],
                      "config": job.config, "lensrun_version": __version__, "file": job.file})  # fmt: skip
        summary["failed"] += 1

    conditions: dict[str, tuple] = {}
    with pipe.encoding_phase([text for job in pending for text in job.request.prompts_to_encode()]):
        bar.set_description("encode")
        for job in pending:
            r = job.request
            try:
                pos, neg = pipe.conditions(r)
                conditions[job.hash] = (pos[0], neg[0] if neg is not None else None)
            except Exception as err:  # noqa: BLE001 - one entry's failure is recorded, the others go on
                fail(job, err)
    with pipe.phase("denoise"):
        for job in sorted((j for j in pending if j.hash in conditions), key=lambda j: (j.request.height, j.request.width)):
            bar.set_description(f"denoise {job.entry.name}")
            try:
                t0 = time.perf_counter()
                noise = pipe.initial_noise(job.config["seed"], job.request.grid, job.request.noise)
                job.latents = pipe.denoise(noise, *conditions[job.hash], job.request, lambda i, n: bar.update(1)).cpu()
                job.seconds = time.perf_counter() - t0
            except Exception as err:  # noqa: BLE001
                fail(job, err)
    with pipe.phase("decode"):
        for job in (j for j in pending if j.latents is not None):
            bar.set_description(f"decode {job.entry.name}")
            try:
                t0 = time.perf_counter()
                image = to_pil(decode_tokens(pipe.vae, job.latents.to(pipe.device), job.request.grid))[0]
                job.seconds += time.perf_counter() - t0
                report = {"plan": pipe.plan.name, "seconds": round(job.seconds, 3)}
                if pipe.device.type == "cuda":
                    report["peak_allocated_gib"] = torch.cuda.max_memory_allocated(pipe.device) / 2**30
                config = {**job.config, "lensrun_version": __version__}
                save_png(image, out / job.file, config, report)
                _append(out, {"hash": job.hash, "name": job.entry.name, "status": "done", "file": job.file,
                              "config": config, "report": report, "lensrun_version": __version__})  # fmt: skip
                summary["done"] += 1
            except Exception as err:  # noqa: BLE001
                fail(job, err)
    bar.close()
    write_index(out)
    return summary


def _caption(row: dict) -> str:
    c, r = row["config"], row.get("report", {})
    size = (
        f"base resolution {c['base_resolution']}, aspect ratio {c['aspect_ratio']}"
        if c.get("base_resolution")
        else f"{c['width']}×{c['height']}"
    )
    peak = f", peak {r['peak_allocated_gib']:.1f} GiB" if "peak_allocated_gib" in r else ""
    return (
        f"{size}, steps {c['steps']}, cfg {c['cfg']:g}, seed {c['seed']}\n{c['prompt']}\n"
        f"plan {r.get('plan', '?')}{peak}, {r.get('seconds', 0):.2f} s"
    )


def write_index(out: Path) -> None:
    """A self-contained index.html (no network): grid, exact configs under each image, text filter."""
    latest: dict[str, dict] = {}
    for row in read_manifest(out):
        if row.get("status") == "done" and (out / row["file"]).is_file():
            latest[row["hash"]] = row
    figures = []
    for row in latest.values():
        name, file = html.escape(row["name"]), html.escape(row["file"], quote=True)
        figures.append(
            f'<figure data-text="{html.escape((row["name"] + " " + _caption(row)).lower(), quote=True)}">'
            f'<a href="{file}"><img src="{file}" alt="{name}" loading="lazy"></a>'
            f"<figcaption><b>{name}</b>\n{html.escape(_caption(row))}</figcaption></figure>"
        )
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>lensrun gallery</title>
<style>body{{font:14px system-ui,sans-serif;margin:1.5rem}} #grid{{display:flex;flex-wrap:wrap;gap:1rem}}
figure{{margin:0;width:320px}} img{{width:320px;height:auto;display:block;background:#eee}}
figcaption{{white-space:pre-wrap;font-size:12px;color:#333}} input{{font:inherit;padding:.3rem;width:20rem}}</style>
</head><body><h1>lensrun gallery</h1><p>{len(figures)} images · <input id="q" placeholder="filter by text"></p>
<div id="grid">{"".join(figures)}</div>
<script>document.getElementById('q').addEventListener('input', e => {{ const q = e.target.value.toLowerCase();
for (const f of document.querySelectorAll('figure')) f.style.display = f.dataset.text.includes(q) ? '' : 'none'; }});
</script></body></html>"""
    write_atomic(out / "index.html", lambda f: f.write(page.encode("utf-8")))


def manifest_config(path: str | Path, entry: str | None) -> dict:
    """The config of one manifest row (by entry name or file name; the only done row if there is one)."""
    rows = [r for r in read_manifest(Path(path).parent) if r.get("status") == "done"] if Path(path).is_file() else []
    if not rows:
        raise LensrunError(f"{path}: no finished images in this manifest")
    if entry is not None:
        rows = [r for r in rows if entry in (r["name"], r["file"])]
    if len(rows) != 1:
        names = ", ".join(r["file"] for r in rows[:10])
        raise LensrunError(f"{path}: say which image with --entry NAME (one of: {names})")
    return rows[0]["config"]
