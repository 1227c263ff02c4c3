"""Attention backends at the Lens shapes, in one run: kernel speed and error, then a compiled 1024² denoise per
backend with its PSNR against SDPA's image.

Kernel rows: B=1, 24 heads of 64, non-causal, S = 4196 (1024², 100 text tokens) and 8328 (1440² 16:9 with
text); error = max |out − fp32 SDPA| on unit-variance inputs; fa3-fp8 with per-head scales from the real values.

    python benchmarks/attention.py --root /tmp/lens-full --json attention.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from quality import psnr

SEQUENCES = {"1024²": 4196, "1440² 16:9": 8328}


def timed(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def kernel_rows() -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lensrun import attention

    rows = []
    for name, tokens in SEQUENCES.items():
        q, k, v = (torch.randn(1, 24, tokens, 64, device="cuda") for _ in range(3))
        reference = F.scaled_dot_product_attention(q, k, v)
        qb, kb, vb = (t.bfloat16() for t in (q, k, v))
        flops = 4 * 24 * tokens * tokens * 64
        cases = {
            "sdpa (cuDNN)": lambda q, k, v: _sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION, sdpa_kernel),
            "sdpa (flash)": lambda q, k, v: _sdpa(q, k, v, SDPBackend.FLASH_ATTENTION, sdpa_kernel),
        }
        for backend in ("fa3", "fa3-fp8"):
            if attention.installed(backend) and attention.supported(backend, torch.device("cuda")):
                cases[backend] = lambda q, k, v, b=backend: attention.attend(q, k, v, None, b)
        for case, fn in cases.items():
            seconds = timed(lambda f=fn, args=(qb, kb, vb): f(*args))
            error = float((fn(qb, kb, vb).float() - reference).abs().max())
            rows.append({"sequence": name, "tokens": tokens, "backend": case, "ms": seconds * 1e3,
                         "tflops": flops / seconds / 1e12, "max_error": error})  # fmt: skip
    return rows


def _sdpa(q, k, v, backend, sdpa_kernel):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v)


def denoise_rows(root: str) -> list[dict]:
    """One compiled pipeline; per backend: a warm-up image (compiles for that backend), then a timed one."""
    from lensrun import LensPipeline, attention

    pipe = LensPipeline.from_pretrained(root, device="cuda").optimize(compile=True)
    rows, images = [], {}
    for backend in ("sdpa", "fa3", "fa3-fp8"):
        if backend != "sdpa" and not (attention.installed(backend) and attention.supported(backend, pipe.device)):
            continue
        pipe.transformer.set_attention_backend(backend)
        pipe.step_graphs.reset()
        kwargs = {"height": 1024, "width": 1024, "seed": 3, "output_type": "np"}
        start = time.perf_counter()
        pipe("a lighthouse on a cliff at dusk", **kwargs)
        first = time.perf_counter() - start
        out = pipe("a lighthouse on a cliff at dusk", **kwargs)
        images[backend] = out.images[0]
        rows.append({"backend": backend, "denoise_s": out.timings.get("denoise"), "first_image_s": first,
                     "psnr_vs_sdpa_db": psnr(images[backend], images["sdpa"], 1.0)})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/lens-full")
    ap.add_argument("--json", default="attention.json")
    args = ap.parse_args()
    from lensrun.random_checkpoint import ensure_checkpoint

    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "kernels": kernel_rows()}
    print(f"{'sequence':<11} {'backend':<14} {'ms':>7} {'TFLOP/s':>8} {'max err':>9}")
    for r in result["kernels"]:
        print(f"{r['sequence']:<11} {r['backend']:<14} {r['ms']:>7.3f} {r['tflops']:>8.0f} {r['max_error']:>9.1e}")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    ensure_checkpoint(args.root, device="cuda")
    result["denoise_1024"] = denoise_rows(args.root)
    for r in result["denoise_1024"]:
        print(f"1024² Lens compiled, {r['backend']:<8} denoise {r['denoise_s']:.3f} s, first image {r['first_image_s']:.1f} s, "
              f"PSNR vs sdpa {r['psnr_vs_sdpa_db']:.1f} dB")  # fmt: skip
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
