"""Which packages the model code's imports spend their time in (``python -X importtime``, self time summed per
top-level package), in a fresh process after ``import torch``.

    python benchmarks/import_profile.py --json $OUT/imports.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CODE = (
    "import torch; import diffusers.models.autoencoders.autoencoder_kl_flux2; "
    "import diffusers.schedulers.scheduling_flow_match_euler_discrete; import transformers; "
    "import lensrun.models.transformer_lens, lensrun.models.text_encoder"
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="imports.json")
    args = ap.parse_args()
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", CODE], capture_output=True, text=True, check=True).stderr
    per_package: dict[str, float] = {}
    torch_done = False
    for line in err.splitlines():
        if not line.startswith("import time:") or "[us]" in line:
            continue
        self_us, cumulative_us, name = line[len("import time:") :].split("|")
        if name.strip() == "torch" and not name.startswith("  "):
            torch_done = True
            per_package["torch (import torch)"] = int(cumulative_us) / 1e6
            continue
        if torch_done:
            package = name.strip().split(".")[0]
            per_package[package] = per_package.get(package, 0.0) + int(self_us) / 1e6
    rows = sorted(per_package.items(), key=lambda kv: -kv[1])
    after_torch = sum(v for k, v in rows if not k.startswith("torch (import"))
    for name, seconds in rows[:15]:
        print(f"{name:28s} {seconds:6.2f} s")
    print(f"{'all after import torch':28s} {after_torch:6.2f} s")
    with open(args.json, "w") as f:
        json.dump({"packages": dict(rows), "after_torch_s": after_torch}, f, indent=1)


if __name__ == "__main__":
    main()
