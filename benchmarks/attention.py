"""Attention backends at the Lens shapes, in one run: kernel speed and error, then a compiled 1024² denoise per
backend with its PSNR against SDPA's image.

Kernel rows: B=1, 24 heads of 64, non-causal, S = 4196 (1024², 100 text tokens) and 8328 (1440² 16:9 with
text); error = max |out − fp32 SDPA| on unit-variance inputs; fa3-fp8 with per-head scales from the real values.
Candidates not (yet) lensrun backends are measured when importable: ``flash-attn-4`` (CuTe-DSL FlashAttention,
JIT-compiled on its first call: that call's time is its own column) and ``sageattention`` 1.x (Triton, INT8
Q·K). Bringing them to the GPU machine: benchmarks/README.md.

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
        cases.update(candidates())
        cases.update(kernel_only(cases, qb, kb, vb))
        for case, fn in cases.items():
            try:
                first = first_call_seconds(fn, qb, kb, vb)
                seconds = timed(lambda f=fn, args=(qb, kb, vb): f(*args))
                error = float((fn(qb, kb, vb).float() - reference).abs().max())
            except Exception as err:  # noqa: BLE001 - a candidate that fails at this shape is a row, not the end
                rows.append({"sequence": name, "tokens": tokens, "backend": case, "error": f"{type(err).__name__}: {err}"[:300]})
                continue
            rows.append({"sequence": name, "tokens": tokens, "backend": case, "ms": seconds * 1e3, "first_call_s": first,
                         "tflops": flops / seconds / 1e12, "max_error": error})  # fmt: skip
    return rows


def kernel_only(cases: dict, q, k, v) -> dict:
    """The fp8 kernels on q/k/v quantized once beforehand: what the kernel costs apart from quantizing."""
    from lensrun import attention

    found = {}
    if "fa3-fp8" in cases:
        from fa3_fwd_interface import flash_attn_func

        (q8, qs), (k8, ks), (v8, vs) = (attention.to_fp8(t.transpose(1, 2)) for t in (q, k, v))

        def fa3_fp8_kernel(q, k, v):
            out = flash_attn_func(q8, k8, v8, q_descale=qs, k_descale=ks, v_descale=vs)
            return (out[0] if isinstance(out, tuple) else out).to(q.dtype).transpose(1, 2)

        found["fa3-fp8 (kernel only)"] = fa3_fp8_kernel
    cudnn_fp8 = cases.get("cudnn-fp8 (per tensor)")
    if cudnn_fp8 is not None:
        quantized = cudnn_fp8.quantize(q, k, v)
        found["cudnn-fp8 (kernel only)"] = lambda q, k, v: cudnn_fp8.run(*quantized, q.dtype)
    return found


def first_call_seconds(fn, q, k, v) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn(q, k, v)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def candidates() -> dict:
    """Kernels measured here before lensrun adopts them: [B, H, L, D] in, [B, H, L, D] out."""
    found = {}
    try:
        from flash_attn.cute import flash_attn_func as fa4
    except ImportError:
        fa4 = None
    if fa4 is not None:

        def flash_attn_4(q, k, v):
            out = fa4(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)

        found["flash-attn-4"] = flash_attn_4
    try:
        import cudnn
    except ImportError:
        cudnn = None
    if cudnn is not None:
        found["cudnn-fp8 (per tensor)"] = CudnnFp8(cudnn)
    try:
        from sageattention import sageattn
    except ImportError:
        sageattn = None
    if sageattn is not None:
        found["sage (int8 QK)"] = lambda q, k, v: sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    return found


class CudnnFp8:
    """cuDNN's fp8 flash attention through ``nvidia-cudnn-frontend`` (inference, no mask): e4m3 q/k/v with one
    scale each (amax / 448 over every head: cuDNN takes per-tensor scales), probabilities scaled by 448 inside,
    e4m3 output scaled by v's scale (|O| ≤ max |v|) and brought back to bf16 here. One graph per shape."""

    def __init__(self, cudnn) -> None:
        self.cudnn = cudnn
        self.graphs: dict = {}

    def _graph(self, shape: tuple, device: torch.device):
        cudnn = self.cudnn
        fp8 = cudnn.data_type.FP8_E4M3
        graph = cudnn.pygraph(io_data_type=fp8, intermediate_data_type=cudnn.data_type.FLOAT,
                              compute_data_type=cudnn.data_type.FLOAT)  # fmt: skip
        template = torch.empty(shape, dtype=torch.uint8, device=device)
        scalar = torch.ones(1, 1, 1, 1, dtype=torch.float32, device=device)
        q, k, v = (graph.tensor_like(template).set_data_type(fp8) for _ in range(3))
        scalars = [graph.tensor_like(scalar) for _ in range(6)]
        names = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")
        common = dict(q=q, k=k, v=v, **dict(zip(names, scalars, strict=True)), attn_scale=shape[-1] ** -0.5, use_causal_mask=False)
        try:
            o, _, amax_s, amax_o = graph.sdpa_fp8(**common, generate_stats=False)
        except TypeError:  # frontends before generate_stats
            o, _, amax_s, amax_o = graph.sdpa_fp8(**common, is_inference=True)
        o.set_output(True).set_dim(list(shape)).set_stride(list(template.stride())).set_data_type(fp8)
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
        graph.build([cudnn.heur_mode.A])
        workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=device)
        amaxes = [torch.zeros(1, 1, 1, 1, dtype=torch.float32, device=device) for _ in range(2)]
        return graph, (q, k, v, o, *scalars, amax_s, amax_o), workspace, amaxes

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.run(*self.quantize(q, k, v), q.dtype)

    @staticmethod
    def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
        scales = [(t.abs().amax().float() / 448).clamp_min(1e-12).reshape(1, 1, 1, 1) for t in (q, k, v)]
        q8, k8, v8 = ((t / s.to(t.dtype)).to(torch.float8_e4m3fn).contiguous() for t, s in zip((q, k, v), scales, strict=True))
        return q8, k8, v8, scales

    def run(self, q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, scales: list, dtype: torch.dtype) -> torch.Tensor:
        key = (tuple(q8.shape), q8.device)
        if key not in self.graphs:
            self.graphs[key] = self._graph(tuple(q8.shape), q8.device)
        graph, names, workspace, amaxes = self.graphs[key]
        out = torch.empty(q8.shape, dtype=torch.float8_e4m3fn, device=q8.device)
        softmax = torch.full((1, 1, 1, 1), 448.0, device=q8.device)
        values = [q8.view(torch.uint8), k8.view(torch.uint8), v8.view(torch.uint8), out.view(torch.uint8),
                  *scales, 1 / softmax, softmax, 1 / scales[2], *amaxes]  # fmt: skip
        graph.execute(dict(zip(names, values, strict=True)), workspace)
        return (out.float() * scales[2]).to(dtype)


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
    ap.add_argument("--kernels-only", action="store_true", help="skip the compiled denoise rows")
    args = ap.parse_args()
    from lensrun.random_checkpoint import ensure_checkpoint

    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "kernels": kernel_rows()}
    print(f"{'sequence':<11} {'backend':<14} {'ms':>7} {'TFLOP/s':>8} {'max err':>9} {'1st call s':>10}")
    for r in result["kernels"]:
        if "error" in r:
            print(f"{r['sequence']:<11} {r['backend']:<14} failed: {r['error']}")
            continue
        print(f"{r['sequence']:<11} {r['backend']:<14} {r['ms']:>7.3f} {r['tflops']:>8.0f} {r['max_error']:>9.1e} {r['first_call_s']:>10.2f}")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    if args.kernels_only:
        return
    ensure_checkpoint(args.root, device="cuda")
    result["denoise_1024"] = denoise_rows(args.root)
    for r in result["denoise_1024"]:
        print(f"1024² Lens compiled, {r['backend']:<8} denoise {r['denoise_s']:.3f} s, first image {r['first_image_s']:.1f} s, "
              f"PSNR vs sdpa {r['psnr_vs_sdpa_db']:.1f} dB")  # fmt: skip
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
