"""Where loading goes: importing the model code, reading the weights onto the GPU, and the whole load.

Each stage runs in a fresh process (imports are paid once per process), weights already in the page cache.

    python benchmarks/load_breakdown.py --root /tmp/lens-full --json $OUT/load.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

STAGES = {
    "import torch": "import torch",
    "import model code": (
        "import torch; import time; t=time.perf_counter(); "
        "import diffusers.models.autoencoders.autoencoder_kl_flux2, transformers; "
        "import lensrun.models.transformer_lens, lensrun.models.text_encoder; print(time.perf_counter()-t)"
    ),
    "read weights to GPU": (
        "import torch, time; from pathlib import Path; from lensrun.loading import TensorReader; r=Path('{root}'); "
        "t=time.perf_counter(); names=('transformer','text_encoder','vae'); "
        "x=TensorReader({{n: r/n for n in names}}, torch.device('cuda')); [x.take(n) for n in names]; "
        "torch.cuda.synchronize(); print(time.perf_counter()-t)"
    ),
    "LensPipeline.from_pretrained (cuda)": (
        "import torch, time; t=time.perf_counter(); from lensrun import LensPipeline; "
        "LensPipeline.from_pretrained('{root}', device='cuda'); torch.cuda.synchronize(); print(time.perf_counter()-t)"
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/tmp/lens-full")
    ap.add_argument("--json", default="load.json")
    args = ap.parse_args()
    rows = []
    for name, code in STAGES.items():
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code.format(root=args.root)], capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
        inner = float(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else None
        rows.append({"stage": name, "process_s": wall, "stage_s": inner})
        print(f"{name:40s} process {wall:6.2f} s   stage {inner if inner is None else round(inner, 2)} s", flush=True)
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
