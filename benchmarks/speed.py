"""Speed of every lensrun mode against the reference path, in one run, on full-size random weights.

Baseline = upstream semantics: [cond; uncond] padded into one batch of 2 with a key mask, modulation recomputed
in each forward, eager, default attention kernel choice. Modes: lensrun's fast path eager, compiled (bf16),
compiled fp8 (torchao dynamic per-row), compiled + step cache, and "tuned" / "fp8-tuned": compiled with Inductor's
GEMM autotuning (Triton templates with fused epilogues against cuBLAS). Same weights, prompt and seed everywhere; PSNR is
each mode's decoded image against the baseline's.

    python benchmarks/speed.py --root /tmp/lens-full --json $OUT/speed.json

A full run exceeds one 10-minute device command (fp8 compiles for minutes), so it can be split: every split
names the same ``--json`` and ``--reference`` file on the same machine; rows are appended, the baseline's decoded
images are kept in the reference file (safetensors) for later splits' PSNR, and the table shows every row so far.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from quality import psnr as psnr_db
from safetensors.torch import load_file, save_file

from lensrun import LensPipeline, __version__, attention
from lensrun.decoding import decode_tokens
from lensrun.random_checkpoint import ensure_checkpoint
from lensrun.request import GenerationRequest

PEAK_TFLOPS = 790.0
PROMPT = "A cinematic film still of a lone astronaut on a red desert dune at dusk, two distant moons"
CASES = {
    "lens-1024": dict(base_resolution=1024, aspect_ratio="1:1", steps=20, cfg=5.0),
    "lens-1440-16:9": dict(base_resolution=1440, aspect_ratio="16:9", steps=20, cfg=5.0),
    "turbo-1024": dict(base_resolution=1024, aspect_ratio="1:1", steps=4, cfg=1.0),
}
# Modes "tuned" and "fp8-tuned": Inductor times its Triton GEMM templates against cuBLAS and may take them with the
# elementwise work that follows each GEMM fused in (the first call pays the tuning).
TUNED = {"max_autotune_gemm": True, "max_autotune_gemm_backends": "TRITON,ATEN"}
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def forward_flops(image_tokens: int, text_tokens: int, blocks: int = 48, width: int = 1536) -> float:
    """Useful FLOPs of one DiT forward: block linears (28.3M MACs/token) + joint attention (4·S²·D)."""
    macs_per_token = width * 3 * width + width * width + 3 * width * 4096
    s = image_tokens + text_tokens
    return blocks * (2 * macs_per_token * s + 4 * s * s * width)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times, result


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Of two decoded images in [-1, 1]."""
    a, b = (((t.clamp(-1, 1) + 1) / 2).float().cpu().numpy() for t in (a, b))
    return psnr_db(a, b, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/lens-full")
    ap.add_argument("--json", default="speed.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="baseline,fast-eager,compiled,fp8,compiled+cache")
    ap.add_argument("--size", choices=("full", "tiny"), default="full", help="tiny: a CPU dry run of this script")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    ap.add_argument("--reference", default="speed-reference.safetensors", help="baseline images, kept between splits")
    ap.add_argument("--append", action="store_true", help="add rows to --json instead of starting it afresh")
    ap.add_argument("--attention", default="auto", help="backend of the compiled and fp8 modes (baseline and fast-eager: sdpa)")
    ap.add_argument("--unfused", action="store_true", help="FlashAttention's inputs by Inductor's kernels, not lensrun.joint_qkv")
    args = ap.parse_args()
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        ap.error(f"unknown case(s) {', '.join(sorted(unknown))}: choose from {', '.join(CASES)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    modes = args.modes.split(",")
    root = Path(args.root)
    ensure_checkpoint(root, size=args.size, device=device)
    info = {"gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
            "lensrun": __version__, "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats}  # fmt: skip
    report = {"info": info, "splits": [], "rows": []}
    if args.append and Path(args.json).exists():
        report = json.loads(Path(args.json).read_text())
        if report["info"]["gpu"] != info["gpu"]:
            raise SystemExit(f"--append: {args.json} was measured on {report['info']['gpu']}, this is {info['gpu']}")
    report["splits"].append({"modes": args.modes, "cases": args.cases, "started": time.strftime("%H:%M:%S")})

    def save():
        Path(args.json).write_text(json.dumps(report, indent=1))

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = LensPipeline.from_pretrained(root, dtype=dtype, device=device)
    rename = {"steps": "num_inference_steps", "cfg": "guidance_scale"}
    cases_kw = {k: {rename.get(a, a): b for a, b in v.items()} | {"output_type": "pt"} for k, v in CASES.items()}
    reqs = {k: GenerationRequest.build(prompt=PROMPT, seed=7, **v) for k, v in CASES.items() if k in args.cases.split(",")}
    cond = pipe.encode_one(PROMPT)
    empty = [f[:, :0] for f in cond]
    text_len = cond[0].shape[1]
    noise = {k: pipe.initial_noise(7, r.grid) for k, r in reqs.items()}
    reference_file = Path(args.reference)
    reference_images: dict[str, torch.Tensor] = {}
    if reference_file.exists():
        reference_images = {k: v.to(device) for k, v in load_file(reference_file).items()}
    log(f"loaded; prompt is {text_len} tokens")

    def use_attention(p: LensPipeline, precision: str) -> None:
        backend, why = attention.resolve(args.attention, precision, p.device, p.dtype)
        p.transformer.set_attention_backend(backend)
        p.transformer.set_fused_attention_inputs(not args.unfused)
        log(why)

    def run_mode(mode: str, p: LensPipeline) -> None:
        for case, req in reqs.items():
            if mode == "compiled+cache" and req.steps < 8:
                continue
            r = GenerationRequest.build(prompt=PROMPT, seed=7, cache=0.05 if mode == "compiled+cache" else None, **CASES[case])
            uncond = empty if r.cfg != 1.0 else None
            if mode == "baseline":
                fn = lambda: p.denoise_reference(noise[case], cond, empty, r)
            else:
                stats: dict = {}
                fn = lambda: p.denoise(noise[case], cond, uncond, r, stats=stats)
            warm_t, _ = timed(fn, 2)  # the second warm-up is where a compiled run captures its step graph
            times, latents = timed(fn, args.repeats)
            image = decode_tokens(p.vae, latents, r.grid)
            if mode in ("baseline", "compiled"):  # kept for later splits: fp8 is also compared with bf16
                reference_images[case if mode == "baseline" else f"compiled/{case}"] = image
                save_file({k: v.contiguous().cpu() for k, v in reference_images.items()}, reference_file)
            n = r.grid[0] * r.grid[1]
            flops = r.steps * (forward_flops(n, text_len) + (forward_flops(n, 0) if r.cfg != 1.0 else 0))
            med = statistics.median(times)
            e2e, cached, first_new, timings, first_phases = [], [], [None], {}, {}
            if mode not in ("baseline", "fast-eager"):
                # End to end with prompts the cache has not seen (encode + denoise + decode), then a cached one.
                # The first new prompt is timed apart: a recompilation for a new text length would show there.
                new_prompt = f"{PROMPT}, new {time.perf_counter()}"
                first_new, first_out = timed(lambda: p(new_prompt, seed=7, cache=r.cache, **cases_kw[case]), 1)
                first_phases = {**first_out.timings, "text_tokens": p.encode_one(new_prompt)[0].shape[1]}  # cached now
                e2e, _ = timed(lambda: p(f"{PROMPT} #{time.perf_counter()}", seed=7, cache=r.cache, **cases_kw[case]), 2)
                cached, out = timed(lambda: p(PROMPT, seed=7, cache=r.cache, **cases_kw[case]), 2)
                timings = out.timings
            graphs = None if mode == "baseline" else {"on": p.graph_steps, "captured": len(p.step_graphs.graphs), "failed": p.step_graphs.failed}
            new_shape = None  # last: a shape's first image (bf16: the Python step loop; quantized: captured at once)
            if mode != "baseline" and p.graph_steps:
                p.step_graphs.reset()
                new_shape, _ = timed(fn, 1)
            row = {
                "mode": mode, "case": case, "attention": p.transformer.attention_backend,
                "fused_inputs": mode != "baseline" and p.transformer.attention_backend in attention.FLASH and not args.unfused, "denoise_s": med, "denoise_all_s": times, "denoise_new_shape_s": new_shape and new_shape[0], "warmup_s": warm_t[0], "warmup_all_s": warm_t,
                "tflops": flops / med / 1e12, "pct_of_peak": 100 * flops / med / 1e12 / PEAK_TFLOPS,
                "e2e_first_new_prompt_s": first_new[0], "e2e_first_new_prompt_phases": first_phases, "e2e_s": statistics.median(e2e) if e2e else None,
                "e2e_cached_prompt_s": statistics.median(cached) if cached else None,
                "encode_cached_s": timings.get("encode"), "decode_s": timings.get("decode"),
                "psnr_vs_baseline_db": psnr(image, reference_images[case]) if case in reference_images else None,
                "psnr_vs_compiled_bf16_db": psnr(image, reference_images[f"compiled/{case}"])
                if mode not in ("baseline", "compiled") and f"compiled/{case}" in reference_images else None,
                "cache_skipped": stats.get("cache_skipped") if mode != "baseline" else None,
                "step_graphs": graphs,
                "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            }  # fmt: skip
            report["rows"].append(row)
            save()
            log(f"{mode:15s} {case:15s} denoise {med:6.3f}s (new shape {row['denoise_new_shape_s'] or 0:6.3f}s)  e2e {row['e2e_s'] or 0:6.3f}s  1st new prompt {row['e2e_first_new_prompt_s'] or 0:6.3f}s  PSNR {row['psnr_vs_baseline_db']}")

    for mode in ("baseline", "fast-eager"):
        if mode in modes:
            run_mode(mode, pipe)
    if "compiled" in modes or "compiled+cache" in modes:
        use_attention(pipe, "bf16")
        pipe.optimize(compile=True)
        for mode in ("compiled", "compiled+cache"):
            if mode in modes:
                run_mode(mode, pipe)
        # Encoder alone at the 512-token limit (compiled MXFP4 decode + grouped matmuls).
        ids, mask = torch.randint(0, pipe.text_encoder.config.vocab_size, (1, 512)), torch.ones(1, 512, dtype=torch.bool)
        timed(lambda: pipe.text_encoder(ids, mask), 2)
        enc, _ = timed(lambda: pipe.text_encoder(ids, mask), 5)
        report["info"]["encoder_512_tokens_s"] = statistics.median(enc)
        save()
        log(f"encoder 512 tokens: {statistics.median(enc) * 1000:.1f} ms")
    for mode, precision, options in (("fp8", "fp8", {}), ("tuned", "bf16", TUNED), ("fp8-tuned", "fp8", TUNED)):
        if mode in modes:  # a fresh pipeline: its own compiled blocks (give each its own process, see the README)
            del pipe
            torch.cuda.empty_cache()
            pipe = LensPipeline.from_pretrained(root, dtype=dtype, device=device)
            use_attention(pipe, precision)
            if options:
                pipe.transformer.compile_blocks(options=options)
            pipe.optimize(True, precision)
            run_mode(mode, pipe)

    print(f"\nGPU {report['info']['gpu']}, torch {report['info']['torch']}, {report['info']['date']}")
    print(f"{'mode':15s} {'attention':9s} {'case':15s} {'denoise s':>9s} {'new shp':>7s} {'speedup':>7s} {'TFLOP/s':>8s} {'%peak':>6s} {'e2e s':>7s} {'1st new':>7s} {'cached':>7s} {'PSNR dB':>8s} {'vs bf16':>8s}")
    base = {r["case"]: r["denoise_s"] for r in report["rows"] if r["mode"] == "baseline"}
    for r in report["rows"]:
        sp = base.get(r["case"], float("nan")) / r["denoise_s"]
        print(
            f"{r['mode']:15s} {r.get('attention', 'sdpa') + ('+1pass' if r.get('fused_inputs') else ''):9s} {r['case']:15s} {r['denoise_s']:9.3f} {r.get('denoise_new_shape_s') or float('nan'):7.3f} {sp:6.2f}x {r['tflops']:8.1f} {r['pct_of_peak']:5.1f}% "
            f"{r['e2e_s'] or float('nan'):7.3f} {r.get('e2e_first_new_prompt_s') or float('nan'):7.3f} {r['e2e_cached_prompt_s'] or float('nan'):7.3f} {r['psnr_vs_baseline_db'] or float('nan'):8.2f} {r.get('psnr_vs_compiled_bf16_db') or float('nan'):8.2f}"
        )
    print(f"encoder, 512 tokens: {report['info'].get('encoder_512_tokens_s', float('nan')) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
