"""Attention backends for the DiT's joint attention, chosen by name like diffusers' attention dispatcher.

* ``sdpa``: torch's scaled_dot_product_attention, cuDNN first on CUDA (``acceleration.attention_kernels``);
  always available, and the reference the others are checked against.
* ``fa3``: FlashAttention-3's Hopper forward kernel in bf16 (the ``fa3-fwd`` wheel: ``pip install
  lensrun[hopper]``), sm_90 only.
* ``fa3-fp8``: the same kernel as ``fa3`` on e4m3 inputs: the fp8 mode's attention. Inside the DiT q and k
  come already quantized from ``lensrun.joint_qkv`` (scales from their RMSNorm's bound, which nothing exceeds;
  v's from its amax per (batch, head)); called here on bf16 tensors, each of q/k/v gets amax / 448 per (batch,
  head).
* ``sage``: SageAttention 1.x (``pip install 'lensrun[sage]'``: Triton, INT8 Q·K), made for Ada/Ampere GPUs such
  as the RTX 4090; on an H200 it was slower than cuDNN's SDPA (docs/performance.md).

``auto`` takes the fastest backend that is installed, runs on this GPU and passes a numeric check against SDPA
at the Lens shape on first use (the verdict is cached per GPU, torch and kernel version): ``fa3`` for bf16
runs, ``fa3-fp8`` for ``--quantize fp8`` runs, else ``sdpa``; ``sage`` only when asked, until it is measured on
the GPUs it is made for. Layouts: lensrun's tensors are [B, H, L, D]; FlashAttention's are [B, L, H, D].
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import json
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lensrun.errors import LensrunError
from lensrun.request import ATTENTION_BACKENDS

BACKENDS = ATTENTION_BACKENDS
CHOICES = ("auto", *BACKENDS)
FLASH = ("fa3", "fa3-fp8")  # FlashAttention-3: [B, L, H, D], Hopper only, the wheel lensrun[hopper]
# Largest |difference| from fp32 attention allowed at the check's shape (unit-variance q/k/v, 24 heads of 64):
# bf16 kernels measured 5-6e-4, fp8 1.8e-2 with unit scales (2026-11-28), sage 4.8e-3 (2026-11-29, H200).
TOLERANCE = {"fa3": 2e-3, "fa3-fp8": 6e-2, "sage": 1e-2}


class Package(NamedTuple):
    """An optional backend's package: the module to import, its distribution (whose version keys the cached
    numeric check) and what to install."""

    module: str
    distribution: str
    install: str


_FA3 = Package("fa3_fwd_interface", "fa3-fwd", "the fa3-fwd kernels: pip install 'lensrun[hopper]'")
PACKAGES = {
    "fa3": _FA3,
    "fa3-fp8": _FA3,
    "sage": Package("sageattention", "sageattention", "sageattention: pip install 'lensrun[sage]'"),
}
E4M3_MAX = 448.0
HALF_DTYPES = (torch.bfloat16, torch.float16)  # what FlashAttention-3 computes in (fp8 inputs come from these)


# diffusers' attention-dispatcher names for the same kernels (``ModelMixin.set_attention_backend``).
DIFFUSERS_NAMES = {"native": "sdpa", "_native_cudnn": "sdpa", "_flash_3": "fa3"}


def check(name: str) -> str:
    if name not in CHOICES:
        raise LensrunError(f"attention backend '{name}' is not one of {', '.join(CHOICES)}")
    return name


def backend_name(name: str) -> str:
    """A backend for ``set_attention_backend``: lensrun's name, or diffusers' name for the same kernel."""
    name = DIFFUSERS_NAMES.get(name, name)
    if name not in BACKENDS:
        raise LensrunError(
            f"attention backend '{name}' is not one of {', '.join(BACKENDS)} (or diffusers' {', '.join(DIFFUSERS_NAMES)})"
        )
    return name


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor | None, backend: str) -> torch.Tensor:
    """[B, H, L, D] attention through ``backend``. ``keys``: None (every key), a bool mask [B, 1, 1, L] (always
    through SDPA), or how many leading keys count per batch row, int32 [B] (FlashAttention only: text padded to
    a fixed length, see ``pipeline.LensPipeline.bucket_text``)."""
    counts = keys if is_counts(keys) else None
    if counts is not None and backend not in FLASH:
        raise ValueError(f"key counts (padded text) need a FlashAttention backend; {backend} takes exact lengths")
    if backend == "sdpa" or (keys is not None and counts is None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keys)
    if backend == "sage":
        from sageattention import sageattn

        return sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if backend == "fa3":
        return flash(q, k, v, counts=counts).transpose(1, 2)
    (q8, qs), (k8, ks), (v8, vs) = (to_fp8(t) for t in (q, k, v))
    return flash(q8, k8, v8, (qs, ks, vs), q.dtype, counts).transpose(1, 2)


def is_counts(keys: torch.Tensor | None) -> bool:
    """Whether ``attend``'s ``keys`` are counts of leading keys (int32 [B]) rather than None or a bool mask."""
    return keys is not None and keys.dtype == torch.int32


def flash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    descales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """FlashAttention-3 on [B, L, H, D]: half-precision inputs, or e4m3 ones with their descales [B, H] (q, k,
    v); only the first ``counts`` [B] (int32) keys of each row when given (FlashAttention's ``seqused_k``, which
    its ``flash_attn_func`` does not take, so the op behind it is called); the output in ``dtype`` (default: the
    inputs')."""
    from fa3_fwd_interface import _flash_attn_forward

    q_descale, k_descale, v_descale = descales if descales is not None else (None, None, None)
    out = _flash_attn_forward(
        q, k, v, seqused_k=counts, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
        softmax_scale=q.shape[-1] ** -0.5,
    )[0]  # fmt: skip
    return out.to(dtype or q.dtype)


def to_fp8(x: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, H, D] → e4m3 values and the fp32 descale per (batch, head): amax / 448 of that head's values
    (``amax`` [B, H] when already known)."""
    amax = x.abs().amax(dim=(1, 3)) if amax is None else amax
    scale = (amax.float() / E4M3_MAX).clamp_min(1e-12)
    return (x / scale[:, None, :, None].to(x.dtype)).to(torch.float8_e4m3fn), scale


def installed(backend: str) -> bool:
    """Whether ``backend``'s package imports here (False for a name this lensrun does not know, e.g. from a
    PNG made by another version)."""
    if backend == "sdpa":
        return True
    try:
        importlib.import_module(PACKAGES[backend].module)
    except (ImportError, KeyError):
        return False
    return True


def supported(backend: str, device: torch.device) -> bool:
    """FlashAttention-3's kernels are built for Hopper (sm_90) only; SageAttention's Triton kernels need an
    NVIDIA GPU from Ampere (sm_80) on."""
    if backend == "sdpa":
        return True
    if device.type != "cuda":
        return False
    capability = torch.cuda.get_device_capability(device)
    return capability == (9, 0) if backend in FLASH else capability >= (8, 0)


def resolve(asked: str, precision: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> tuple[str, str]:
    """The backend a run uses for ``asked`` (``auto`` or a name) and why, for a DiT computing in ``dtype``; an
    asked backend that cannot run here is an error naming what is missing."""
    check(asked)
    half = dtype in HALF_DTYPES
    if asked != "auto":
        if asked != "sdpa" and not half:
            raise LensrunError(f"--attention {asked} computes in bf16 or fp16; this run's dtype is {str(dtype).removeprefix('torch.')}: use sdpa")
        if not installed(asked):
            raise LensrunError(f"--attention {asked} needs {PACKAGES[asked].install}")
        if not supported(asked, device):
            gpus = "Hopper GPUs (sm_90) only" if asked in FLASH else "NVIDIA GPUs from Ampere (sm_80) on"
            raise LensrunError(f"--attention {asked} runs on {gpus}; use sdpa")
        return asked, f"attention {asked}: asked with --attention"
    preferred = "fa3-fp8" if precision == "fp8" else "fa3"
    if not half:
        return "sdpa", f"attention sdpa: FlashAttention-3 computes in bf16/fp16, this run in {str(dtype).removeprefix('torch.')}"
    if not installed(preferred):
        return "sdpa", "attention sdpa: fa3-fwd is not installed (pip install 'lensrun[hopper]' on Hopper GPUs)"
    if not supported(preferred, device):
        return "sdpa", "attention sdpa: FlashAttention-3 runs on Hopper GPUs only"
    error = verified_error(preferred, device)
    if error > TOLERANCE[preferred]:
        return "sdpa", f"attention sdpa: {preferred} differs from fp32 by {error:.1e} here (limit {TOLERANCE[preferred]:.0e})"
    return preferred, f"attention {preferred}: fastest installed, max |error| {error:.1e} against fp32 on this GPU"


def verified_error(backend: str, device: torch.device) -> float:
    """The backend's largest |difference| from fp32 attention at a Lens shape, measured once per GPU, torch and
    kernel version (kept in lensrun's cache folder)."""
    from lensrun.metadata import write_atomic
    from lensrun.prompt_cache import default_cache_dir

    name = torch.cuda.get_device_name(device)
    key = f"{backend}|{name}|{torch.__version__}|{_kernel_version(backend)}"
    path = default_cache_dir() / "attention-checks.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    if key not in known:
        known[key] = measure_error(backend, device)
        write_atomic(path, lambda f: f.write(json.dumps(known, indent=1).encode()))
    return known[key]


def measure_error(backend: str, device: torch.device, tokens: int = 4196, heads: int = 24, head_dim: int = 64) -> float:
    """Max |backend − fp32 SDPA| on unit-variance inputs of a 1024² Lens sequence (4096 image + 100 text)."""
    gen = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, head_dim, generator=gen, device=device) for _ in range(3))
    reference = F.scaled_dot_product_attention(q, k, v)
    with torch.inference_mode():
        out = attend(*(t.to(torch.bfloat16) for t in (q, k, v)), None, backend)
    return float((out.float() - reference).abs().max())


@functools.cache
def _kernel_version(backend: str) -> str:
    try:
        return importlib.metadata.version(PACKAGES[backend].distribution)
    except importlib.metadata.PackageNotFoundError:
        return "none"
