"""The time a user waits: each case is a fresh process, from interpreter start to the last PNG written.

Every case runs the CLI (`lensrun generate` / `lensrun gallery`) in a new process through a small child wrapper
that only adds clocks: import torch, import lensrun, load (``Engine.load``), then the engine's per-image report
(encode / denoise / decode). Each case runs under the compile decision the engine makes by itself ("auto") and,
in the same run, under the other decision, so the table shows whether the policy chose the faster one. Cases
named "…-again" reuse the cache folder of the case before them (a second process: prompt cache and compile
caches warm); every other case starts from an empty ``LENSRUN_CACHE_DIR``.

    python benchmarks/first_image.py --root /tmp/lens-full --json $OUT/first_image.json [--cases a,b,c,d]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "A cinematic film still of a lone astronaut on a red desert dune at dusk, two distant moons"
# name: (cache folder label, CLI argv after the subcommand's own arguments, images)
CASES = {
    "a": ("a", ["generate", "--prompt", PROMPT, "--seed", "1"], 1),
    "b": ("a", ["generate", "--prompt", PROMPT, "--seed", "2"], 1),
    "c": ("c", ["generate", "--prompt", PROMPT, "--seed", "3", "--vram", "24GB", "--base-resolution", "1440",
                "--aspect-ratio", "16:9", "--n", "2"], 2),
    "d": ("d", ["gallery", "{gallery}"], 20),
}  # fmt: skip
LABELS = {
    "a": "(a) one 1024² image, fresh machine",
    "b": "(b) the same, second process",
    "c": "(c) 1440² 16:9 ×2, --vram 24GB",
    "d": "(d) 20-image 1024² gallery",
}


def child(argv: list[str], out: str) -> None:
    """Run the CLI with clocks around its stages; write them to ``out``."""
    start = time.perf_counter()
    import torch  # noqa: F401

    t_torch = time.perf_counter()
    import lensrun  # noqa: F401
    from lensrun import LensPipeline  # noqa: F401 - the lazy import users pay

    t_lensrun = time.perf_counter()
    from lensrun import engine as engine_module
    from lensrun.cli import main

    stages: dict = {"import_torch": t_torch - start, "import_lensrun": t_lensrun - t_torch}
    original_load = engine_module.Engine.load.__func__

    def timed_load(cls, *a, **k):
        t0 = time.perf_counter()
        engine = original_load(cls, *a, **k)
        stages["load"] = stages.get("load", 0.0) + time.perf_counter() - t0
        original_run = engine.run

        def timed_run(*ra, **rk):
            t1 = time.perf_counter()
            results = original_run(*ra, **rk)
            stages["run"] = time.perf_counter() - t1
            stages["compiled"] = engine.pipe.compiled
            stages["decision"] = engine.last_decision.reason if engine.last_decision else None
            stages["images"] = [r.report for r in results]
            return results

        engine.run = timed_run
        return engine

    engine_module.Engine.load = classmethod(timed_load)
    code = main(argv)
    stages["main"] = time.perf_counter() - t_lensrun
    stages["exit_code"] = code
    Path(out).write_text(json.dumps(stages))


def run_case(name: str, argv: list[str], cache: Path, stage_file: Path) -> dict:
    env = {**os.environ, "LENSRUN_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", str(stage_file), "--", *argv], env=env,
                          capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"case {name} failed ({proc.returncode})")
    stages = json.loads(stage_file.read_text())
    seconds = [img.get("seconds", {}) for img in stages.get("images", [])]
    total = lambda key: sum(s.get(key, 0.0) for s in seconds)
    row = {
        "case": name, "wall_s": wall, "import_torch_s": stages["import_torch"], "import_lensrun_s": stages["import_lensrun"],
        "load_s": stages.get("load", 0.0), "encode_s": total("encode"), "denoise_s": total("denoise"),
        "decode_s": total("decode"), "run_s": stages.get("run", 0.0), "compiled": stages.get("compiled"),
        "decision": stages.get("decision"), "plan": (stages.get("images") or [{}])[0].get("plan"),
        "first_denoise_s": seconds[0].get("denoise") if seconds else None,
        "last_denoise_s": seconds[-1].get("denoise") if seconds else None,
    }  # fmt: skip
    row["other_s"] = row["wall_s"] - sum(row[k] for k in ("import_torch_s", "import_lensrun_s", "load_s", "run_s"))
    return row


def gallery_file(folder: Path) -> Path:
    lines = ["[defaults]", "base_resolution = 1024", ""]
    for i in range(20):
        lines += ["[[image]]", f'name = "img-{i:02d}"', f'prompt = "{PROMPT}, variation {i}"', f"seed = {i}", ""]
    path = folder / "gallery.toml"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/lens-full")
    ap.add_argument("--json", default="first_image.json")
    ap.add_argument("--cases", default="a,b,c,d")
    ap.add_argument("--work", default="/tmp/first-image", help="cache folders and outputs (kept between splits)")
    ap.add_argument("--append", action="store_true", help="add rows to an existing --json")
    args = ap.parse_args()
    import torch

    from lensrun import __version__
    from lensrun.random_checkpoint import ensure_checkpoint

    root, work = Path(args.root), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    info = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "lensrun": __version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    t0 = time.perf_counter()
    if ensure_checkpoint(root, device="cuda"):
        info["write_checkpoint_s"] = time.perf_counter() - t0
    del torch
    t0 = time.perf_counter()
    for f in root.rglob("*.safetensors"):  # the page cache holds the weights, as on a machine used before
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    info["page_cache_fill_s"] = time.perf_counter() - t0
    gallery = gallery_file(work)
    rows = json.loads(Path(args.json).read_text())["rows"] if args.append and Path(args.json).exists() else []
    for name in args.cases.split(","):
        label, argv, images = CASES[name]
        argv = [a.replace("{gallery}", str(gallery)) for a in argv]
        for mode in ("auto", "other"):
            cache = work / f"cache-{label}-{mode}"
            if name != "b" and cache.exists():  # "b" is the second process on "a"'s caches
                subprocess.run(["rm", "-rf", str(cache)], check=True)
            out = work / f"out-{name}-{mode}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            extra = ["--out", str(out), "--model", str(root)]
            if mode == "other":
                auto = next(r for r in rows if r["case"] == name and r["mode"] == "auto")
                extra.append("--no-compile" if auto["compiled"] else "--compile")
            row = run_case(name, [*argv, *extra], cache, work / f"stages-{name}-{mode}.json")
            row.update(mode=mode, label=LABELS[name], images=images)
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    print(f"\n{info['gpu']}, torch {info['torch']}, {info['date']}")
    head = f"{'case':34s} {'mode':5s} {'compiled':8s} {'wall':>6s} {'torch':>6s} {'lensrun':>7s} {'load':>6s} {'encode':>6s} {'denoise':>7s} {'decode':>6s} {'other':>6s}"
    print(head)
    for r in rows:
        print(f"{r['label']:34s} {r['mode']:5s} {r['compiled']!s:8s} {r['wall_s']:6.1f} {r['import_torch_s']:6.1f} "
              f"{r['import_lensrun_s']:7.2f} {r['load_s']:6.1f} {r['encode_s']:6.2f} {r['denoise_s']:7.2f} "
              f"{r['decode_s']:6.2f} {r['other_s']:6.1f}")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[4:], sys.argv[2])
    else:
        main()
