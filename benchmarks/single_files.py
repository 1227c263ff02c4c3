"""ComfyUI's single files at full size, against the diffusers folder they would replace, in one run.

From the full-size random checkpoint `lensrun convert` (``lensrun.convert.to_comfy``) writes, in ComfyUI's
layouts (../shared/COMFY_FORMATS.md), the `gpt_oss_20b_nvfp4` text encoder (OpenAI's MXFP4 experts decoded and
re-quantized to NVFP4 as the format describes) and the `lens_mxfp8` DiT (block linears to MXFP8). Then:

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
import time
from pathlib import Path

import numpy as np
import torch
from quality import psnr

PROMPTS = ["a red fox in fresh snow, morning light", "a lighthouse on a cliff at dusk, oil painting"]


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/lens-full")
    ap.add_argument("--comfy", default="/tmp/comfy")
    ap.add_argument("--json", default="single_files.json")
    args = ap.parse_args()
    from lensrun.convert import to_comfy
    from lensrun.random_checkpoint import ensure_checkpoint

    root, comfy = Path(args.root), Path(args.comfy)
    ensure_checkpoint(root, device="cuda")
    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    start = time.perf_counter()
    files = to_comfy(str(root), comfy, dit="mxfp8", device="cuda")  # `lensrun convert`
    result["convert_s"] = time.perf_counter() - start
    te_file, dit_file = files["text_encoder"], files["transformer"]
    for path in (te_file, dit_file):
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
    result["psnr_nvfp4_encoder_db"] = [psnr(reference[p], image(nv, p), 1.0) for p in PROMPTS]
    del nv
    torch.cuda.empty_cache()
    save()
    mx, result["load_mxfp8_dit_s"] = load(root, transformer=dit_file)
    result["psnr_mxfp8_dit_db"] = [psnr(reference[p], image(mx, p), 1.0) for p in PROMPTS]
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
