"""ComfyUI's single files at full size, against the diffusers folder they would replace, in one run.

From the full-size random checkpoint this writes, in ComfyUI's layouts (../shared/COMFY_FORMATS.md), the
`gpt_oss_20b_nvfp4` text encoder (OpenAI's MXFP4 experts decoded and re-quantized to NVFP4 as the format
describes: per-expert fp32 scale amax/(6·448), e4m3 block scales per 16 inputs in the cuBLAS block layout, codes
high nibble first) and the `lens_mxfp8` DiT (block linears to MXFP8: E8M0 per 32 inputs, e4m3 values). Then:

1. encoder, 512 tokens: the MXFP4 folder's and the NVFP4 file's experts through the Triton kernel — time,
   weight bytes, peak memory — and the distance between their features (the four selected layers);
2. image PSNR at 1024² (20 steps, CFG 5, same seed): NVFP4 encoder vs MXFP4 encoder, MXFP8 DiT vs bf16 DiT;
3. load time of the DiT: folder bf16 vs the mxfp8 file (dequantized at load);
4. the single-file set under a 24 GiB budget: the plan and the measured peak.

    python benchmarks/single_files.py --root /tmp/lens-full --json single_files.json
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

PROMPTS = ["a red fox in fresh snow, morning light", "a lighthouse on a cliff at dusk, oil painting"]


def to_blocked(m: torch.Tensor) -> torch.Tensor:
    """cuBLAS's block layout of a [128·i, 4·j] scale matrix (the layout ComfyUI stores)."""
    rows, cols = m.shape
    blocks = m.view(rows // 128, 128, cols // 4, 4).permute(0, 2, 1, 3)
    return blocks.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(-1, 32, 16).flatten().view(rows, cols)


def padded_blocked(logical: torch.Tensor) -> torch.Tensor:
    """[R, C] uint8 scales padded to [roundup(R, 128), roundup(C, 4)], then swizzled."""
    rows, cols = logical.shape
    out = torch.zeros(-(-rows // 128) * 128, -(-cols // 4) * 4, dtype=torch.uint8, device=logical.device)
    out[:rows, :cols] = logical
    return to_blocked(out)


def write_nvfp4_encoder(root: Path, path: Path) -> None:
    from lensrun import mxfp4, nvfp4

    out: dict[str, torch.Tensor] = {}
    for file in sorted((root / "text_encoder").glob("*.safetensors")):
        with safe_open(file, "pt", device="cuda") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no iterator
                if key == "lm_head.weight" or key.endswith("_scales"):
                    continue
                name = key.removeprefix("model.")
                m = re.match(r"(layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)_(blocks|bias)$", name)
                if m is None:
                    out[name] = f.get_tensor(key).to(torch.bfloat16).cpu()
                elif m[3] == "bias":
                    out[f"{m[1]}.{m[2]}.bias"] = f.get_tensor(key).to(torch.bfloat16).cpu()
                else:
                    w = mxfp4.dequantize(f.get_tensor(key), f.get_tensor(key.replace("_blocks", "_scales")), torch.float32)
                    packed, logical, g = nvfp4.quantize(w)
                    del w
                    bank = f"{m[1]}.{m[2]}"
                    scales = torch.stack([padded_blocked(s.view(torch.uint8)) for s in logical])
                    out[bank + ".weight"], out[bank + ".weight_scale_2"] = packed.cpu(), g.cpu()
                    out[bank + ".weight_scale"] = scales.view(torch.float8_e4m3fn).cpu()
                    out[bank + ".comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    tokenizer = (root / "tokenizer" / "tokenizer.json").read_bytes()
    out["tokenizer_json"] = torch.tensor(list(tokenizer), dtype=torch.uint8)
    save_file(out, path)


def quantize_mxfp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's MXFP8 of a [R, C] weight: (e4m3 values padded to multiples of 32, swizzled E8M0 scales)."""
    rows, cols = w.shape
    pr, pc = -(-rows // 32) * 32, -(-cols // 32) * 32
    padded = torch.zeros(pr, pc, device=w.device)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(pr, pc // 32, 32)
    exponents = (torch.ceil(torch.log2(blocks.abs().amax(-1).clamp_min(2.0**-126) / 448.0)) + 127).clamp(0, 254)
    values = (blocks / torch.exp2(exponents - 127).unsqueeze(-1)).view(pr, pc).to(torch.float8_e4m3fn)
    return values, padded_blocked(exponents.to(torch.uint8))


def write_mxfp8_dit(root: Path, path: Path) -> None:
    prefix = "model.diffusion_model."
    out: dict[str, torch.Tensor] = {}
    for file in sorted((root / "transformer").glob("*.safetensors")):
        with safe_open(file, "pt", device="cuda") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no iterator
                t = f.get_tensor(key)
                layer = key.rsplit(".", 1)[0]
                if key.startswith("transformer_blocks.") and key.endswith(".weight") and t.dim() == 2 and "_mod" not in key:
                    values, scales = quantize_mxfp8(t)
                    out[prefix + key], out[prefix + layer + ".weight_scale"] = values.cpu(), scales.cpu()
                    out[prefix + layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "mxfp8"}'), dtype=torch.uint8)
                else:
                    out[prefix + key] = t.to(torch.bfloat16).cpu()
    save_file(out, path)


def load(root: Path, **files) -> tuple[object, float]:
    from lensrun import LensPipeline

    torch.cuda.synchronize()
    start = time.perf_counter()
    pipe = LensPipeline.from_pretrained(root, dtype=torch.bfloat16, device="cuda", files=files)
    torch.cuda.synchronize()
    return pipe, time.perf_counter() - start


def encoder_numbers(pipe, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    te = pipe.text_encoder
    weight_bytes = sum(p.numel() * p.element_size() for p in te.parameters())
    with torch.inference_mode():
        for _ in range(2):
            te(ids, mask)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(5):
            features = te(ids, mask)
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 5
    return {"seconds": seconds, "weight_gib": weight_bytes / 2**30, "peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
            "fused": all(layer.mlp.experts.fused for layer in te.layers)}, features  # fmt: skip


def image(pipe, prompt: str) -> np.ndarray:
    out = pipe(prompt, height=1024, width=1024, seed=5, output_type="np")
    return np.asarray(out.images[0], dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    scale = 255.0 if a.max() > 1.5 else 1.0
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(scale**2 / mse)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/lens-full")
    ap.add_argument("--comfy", default="/tmp/comfy")
    ap.add_argument("--json", default="single_files.json")
    args = ap.parse_args()
    from lensrun.random_checkpoint import ensure_checkpoint

    root, comfy = Path(args.root), Path(args.comfy)
    ensure_checkpoint(root, device="cuda")
    te_file, dit_file = comfy / "text_encoders" / "gpt_oss_20b_nvfp4.safetensors", comfy / "diffusion_models" / "lens_mxfp8.safetensors"
    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    for path, write in ((te_file, write_nvfp4_encoder), (dit_file, write_mxfp8_dit)):
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        if not path.exists():
            write(root, path)
        result[f"write_{path.stem}_s"] = time.perf_counter() - start
        result[f"{path.stem}_gib"] = path.stat().st_size / 2**30

    def save() -> None:
        Path(args.json).write_text(json.dumps(result, indent=1))

    folder, result["load_folder_s"] = load(root)
    nv, result["load_nvfp4_encoder_s"] = load(root, text_encoder=te_file)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200000, (1, 512), generator=g).cuda()
    mask = torch.ones(1, 512, dtype=torch.long, device="cuda")
    result["encoder_mxfp4"], fa = encoder_numbers(folder, ids, mask)
    result["encoder_nvfp4"], fb = encoder_numbers(nv, ids, mask)
    result["features"] = [
        {"layer": i, "cosine": torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item(),
         "relative_l2": ((a.float() - b.float()).norm() / a.float().norm()).item()}
        for i, (a, b) in enumerate(zip(fa, fb, strict=True))
    ]  # fmt: skip
    save()
    reference = {p: image(folder, p) for p in PROMPTS}
    result["psnr_nvfp4_encoder_db"] = [psnr(reference[p], image(nv, p)) for p in PROMPTS]
    del nv
    torch.cuda.empty_cache()
    save()
    mx, result["load_mxfp8_dit_s"] = load(root, transformer=dit_file)
    result["psnr_mxfp8_dit_db"] = [psnr(reference[p], image(mx, p)) for p in PROMPTS]
    del mx, folder
    torch.cuda.empty_cache()
    save()
    from lensrun import api

    files = {"model": str(root), "transformer": str(dit_file), "text_encoder": str(te_file)}
    result["plan_24gib"] = api.plan_report(vram="24GB", height=1024, width=1024, compile=False, **files)
    start = time.perf_counter()
    png = api.generate(PROMPTS[0], out="/tmp/single24", vram="24GB", height=1024, width=1024, seed=5, **files)[0]
    from lensrun.metadata import read_report

    result["run_24gib"] = {"seconds": time.perf_counter() - start, **read_report(png)}
    save()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
