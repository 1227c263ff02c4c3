"""ComfyUI single files written in exactly the layouts of COMFY_FORMATS.md (tiny model): the DiT in bf16 and
MXFP8, the FLUX.2 VAE under BFL names; loaded where the diffusers-layout load puts them, and refused clearly
when they are not what they claim."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lensrun import LensPipeline, single_file
from lensrun.cli import main
from lensrun.convert import bfl_name

SMALL = {"height": 32, "width": 48, "num_inference_steps": 2}


def _state(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def to_blocked(m: torch.Tensor) -> torch.Tensor:
    """cuBLAS's block layout of a [128·i, 4·j] scale matrix, written the way torchao builds it (reference for
    the index formula the loader uses)."""
    rows, cols = m.shape
    blocks = m.view(rows // 128, 128, cols // 4, 4).permute(0, 2, 1, 3)
    return blocks.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(-1, 32, 16).flatten().view(rows, cols)


def quantize_mxfp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ComfyUI's MXFP8: rows/cols padded to multiples of 32, E = clamp(ceil(log2(amax/448)) + 127, 0, 254) per 32
    inputs, e4m3 values, scales swizzled to [roundup(rows,128), roundup(cols/32,4)]. Returns (weight, stored
    scale, logical exponents)."""
    rows, cols = w.shape
    pr, pc = -(-rows // 32) * 32, -(-cols // 32) * 32
    padded = torch.zeros(pr, pc)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(pr, pc // 32, 32)
    amax = blocks.abs().amax(-1).clamp_min(2.0**-126)
    exponents = (torch.ceil(torch.log2(amax / 448.0)) + 127).clamp(0, 254)
    values = (blocks / torch.exp2(exponents - 127).unsqueeze(-1)).view(pr, pc).to(torch.float8_e4m3fn)
    sr, sc = -(-pr // 128) * 128, -(-(pc // 32) // 4) * 4
    logical = torch.zeros(sr, sc, dtype=torch.uint8)
    logical[:pr, : pc // 32] = exponents.to(torch.uint8)
    return values, to_blocked(logical), exponents.to(torch.uint8)


def reference_mxfp8(values: torch.Tensor, exponents: torch.Tensor, shape) -> torch.Tensor:
    """Plain decode, block by block: e4m3 × 2^(E − 127), E = 0 → 0."""
    out = torch.empty(values.shape)
    for r in range(values.shape[0]):
        for b in range(values.shape[1] // 32):
            e = int(exponents[r, b])
            out[r, b * 32 : (b + 1) * 32] = values[r, b * 32 : (b + 1) * 32].float() * (0.0 if e == 0 else 2.0 ** (e - 127))
    return out[: shape[0], : shape[1]]


def test_unswizzle_inverts_the_cublas_block_layout():
    logical = torch.randint(0, 255, (256, 8), dtype=torch.uint8)
    assert torch.equal(single_file.unswizzle(to_blocked(logical), 256, 8), logical)
    padded = torch.zeros(256, 8, dtype=torch.uint8)
    padded[:200, :5] = logical[:200, :5]
    assert torch.equal(single_file.unswizzle(to_blocked(padded), 200, 5), logical[:200, :5])


def test_mxfp8_dequantization_is_exact():
    w = torch.randn(200, 341) * 0.05
    w[3, :32] = 0.0  # an all-zero block: exponent 0 decodes to zeros
    values, stored, exponents = quantize_mxfp8(w)
    got = single_file.dequantize_mxfp8(values, stored, (200, 341))
    assert torch.equal(got, reference_mxfp8(values, exponents, (200, 341)))
    assert (got - w).abs().max() < 0.02 and torch.equal(got[3, :32], torch.zeros(32))  # e4m3: 3 mantissa bits


def _dit_file(tiny_checkpoint, path, fmt="bf16", prefix="model.diffusion_model."):
    """The tiny DiT as ComfyUI writes it: bare diffusers names under a prefix; block linears (not the
    modulation) in MXFP8 with a comfy_quant record for 'mxfp8'."""
    state = _state(tiny_checkpoint / "transformer")
    out, refs = {"__metadata_marker__": torch.zeros(1)}, {}
    for key, t in state.items():
        layer = key.rsplit(".", 1)[0]
        quantize = fmt == "mxfp8" and key.endswith(".weight") and t.dim() == 2 and key.startswith("transformer_blocks.")
        if quantize and "_mod" not in key:
            values, stored, exponents = quantize_mxfp8(t)
            out[prefix + key] = values
            out[prefix + layer + ".weight_scale"] = stored
            out[prefix + layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "mxfp8"}).encode()), dtype=torch.uint8)
            refs[key] = reference_mxfp8(values, exponents, t.shape)
        else:
            out[prefix + key] = t.to(torch.bfloat16)
    save_file(out, path)
    return refs


def _vae_file(tiny_checkpoint, path):
    state = _state(tiny_checkpoint / "vae")
    up = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks."))
    out = {}
    for key, t in state.items():
        if key == "bn.num_batches_tracked":
            continue  # ComfyUI's file may lack it; the loader fills it in
        if ".attentions.0.to_" in key and key.endswith("weight"):
            t = t[:, :, None, None]  # BFL's attention projections are 1×1 convolutions
        out[bfl_name(key, up)] = t
    save_file(out, path)
    assert "encoder.down.0.block.0.conv1.weight" in out and "decoder.up.0.block.0.conv1.weight" in out


def test_bf16_dit_and_bfl_vae_land_where_the_folder_load_puts_them(tiny_checkpoint, tmp_path):
    _dit_file(tiny_checkpoint, tmp_path / "lens_bf16.safetensors")
    _vae_file(tiny_checkpoint, tmp_path / "flux2-vae.safetensors")
    files = {"transformer": tmp_path / "lens_bf16.safetensors", "vae": tmp_path / "flux2-vae.safetensors"}
    folder = LensPipeline.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16, device="cpu")
    single = LensPipeline.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16, device="cpu", files=files)
    for a, b in ((folder.transformer, single.transformer), (folder.vae, single.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert single.weights_id != folder.weights_id
    expected = folder("a heron", seed=2, output_type="pt", **SMALL).images
    assert torch.equal(single("a heron", seed=2, output_type="pt", **SMALL).images, expected)


def test_mxfp8_dit_is_dequantized_exactly(tiny_checkpoint, tmp_path):
    refs = _dit_file(tiny_checkpoint, tmp_path / "lens_mxfp8.safetensors", fmt="mxfp8", prefix="")
    pipe = LensPipeline.from_pretrained(
        tiny_checkpoint, dtype=torch.float32, device="cpu", files={"transformer": tmp_path / "lens_mxfp8.safetensors"}
    )
    state = pipe.transformer.state_dict()
    assert refs and all(torch.equal(state[k], ref) for k, ref in refs.items())
    assert state["transformer_blocks.0.img_mod.1.weight"].dtype == torch.float32  # modulation stayed unquantized
    assert torch.isfinite(pipe("a heron", seed=2, output_type="pt", **SMALL).images).all()


def test_mxfp8_dit_loads_exactly_in_bf16(tiny_checkpoint, tmp_path):
    """e4m3 × 2^k fits bf16 exactly: a bf16 run reads the file's values unchanged, one tensor at a time."""
    refs = _dit_file(tiny_checkpoint, tmp_path / "lens_mxfp8.safetensors", fmt="mxfp8")
    pipe = LensPipeline.from_pretrained(
        tiny_checkpoint, dtype=torch.bfloat16, device="cpu", files={"transformer": tmp_path / "lens_mxfp8.safetensors"}
    )
    state = pipe.transformer.state_dict()
    assert all(state[k].dtype == torch.bfloat16 and torch.equal(state[k].float(), ref) for k, ref in refs.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torchao fp8 needs a CUDA GPU")
def test_mxfp8_dit_quantized_to_fp8_while_loading_equals_the_bf16_route(tiny_checkpoint, tmp_path):
    """precision='fp8' quantizes each block as it is read: the same fp8 weights as loading in bf16 and
    quantizing afterwards, without the whole DiT ever in bf16 (the tiny model's odd widths leave its MLPs bf16:
    torchao quantizes only widths that are multiples of 16)."""
    pytest.importorskip("torchao")
    _dit_file(tiny_checkpoint, tmp_path / "lens_mxfp8.safetensors", fmt="mxfp8")
    files = {"transformer": tmp_path / "lens_mxfp8.safetensors"}
    direct = LensPipeline.from_pretrained(tiny_checkpoint, device="cuda", files=files, precision="fp8")
    detour = LensPipeline.from_pretrained(tiny_checkpoint, device="cuda", files=files).optimize(precision="fp8")
    assert direct.precision == detour.precision == "fp8"
    a, b = direct.transformer.transformer_blocks[0].attn.img_qkv.weight, detour.transformer.transformer_blocks[0].attn.img_qkv.weight
    assert type(a) is type(b) and type(a) not in (torch.Tensor, torch.nn.Parameter)  # a torchao fp8 tensor
    assert torch.equal(a.dequantize(), b.dequantize())



@pytest.mark.skipif(not torch.cuda.is_available(), reason="torchao fp8 needs a CUDA GPU")
def test_engine_loads_an_mxfp8_dit_straight_to_fp8_for_an_fp8_plan(tiny_checkpoint, tmp_path):
    """The engine passes its first plan's precision to the load: the DiT file arrives quantized and the run
    needs no second quantization (which would refuse: the DiT is quantized once per process)."""
    pytest.importorskip("torchao")
    from lensrun.engine import Engine, Task
    from lensrun.request import EngineOptions, GenerationRequest

    _dit_file(tiny_checkpoint, tmp_path / "lens_mxfp8.safetensors", fmt="mxfp8")
    options = EngineOptions(model=str(tiny_checkpoint), transformer=str(tmp_path / "lens_mxfp8.safetensors"),
                            quantize="fp8", device="cuda", compile=False)  # fmt: skip
    request = GenerationRequest.build(prompt="a heron", seed=2, height=32, width=48, steps=2)
    engine = Engine.load(options, first=[request])
    assert engine.pipe.precision == "fp8"
    weight = engine.pipe.transformer.transformer_blocks[0].attn.img_qkv.weight
    assert type(weight) not in (torch.Tensor, torch.nn.Parameter)  # quantized while loading
    [result] = engine.run([Task(request)])
    assert result.ok and result.config["quantize"] == "fp8"

def test_cli_mixes_a_folder_with_single_files_and_replays(tiny_checkpoint, tmp_path, capsys):
    _dit_file(tiny_checkpoint, tmp_path / "lens.safetensors")
    _vae_file(tiny_checkpoint, tmp_path / "vae.safetensors")
    _te_file(tiny_checkpoint, tmp_path / "te.safetensors")
    argv = ["generate", "--prompt", "a heron", "--seed", "4", "--model", str(tiny_checkpoint), "--height", "32",
            "--width", "48", "--steps", "2", "--transformer", str(tmp_path / "lens.safetensors"), "--vae",
            str(tmp_path / "vae.safetensors"), "--text-encoder", str(tmp_path / "te.safetensors"),
            "--out", str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 0
    png = capsys.readouterr().out.split()[0]
    config = json.loads(Image.open(png).text["lensrun"])
    assert config["transformer"].endswith("lens.safetensors") and config["vae"].endswith("vae.safetensors")
    assert config["text_encoder"].endswith("te.safetensors")
    assert main(["replay", png, "--check", "--out", str(tmp_path / "r")]) == 0
    assert "check: identical" in capsys.readouterr().err


@pytest.mark.parametrize(
    "damage, option, message",
    [
        ("not-lens", "--transformer", "not a Lens DiT, GPT-OSS text encoder or FLUX.2 VAE file"),
        ("truncated", "--transformer", "not a readable safetensors file"),
        ("renamed", "--transformer", "weight 'transformer_blocks.1.attn.img_qkv.weight' is missing"),
        ("wrong-part", "--vae", "that file holds another component"),
        ("pickle", "--transformer", "reads .safetensors files only"),
    ],
)
def test_bad_single_files_are_refused_before_any_work(tiny_checkpoint, tmp_path, capsys, damage, option, message):
    path = tmp_path / ("file.bin" if damage == "pickle" else "file.safetensors")
    if damage == "not-lens":
        save_file({"model.layers.0.weight": torch.zeros(2, 2)}, path)
    elif damage == "pickle":
        path.write_bytes(b"\x80\x04not really a pickle")
    else:
        _dit_file(tiny_checkpoint, path)
        if damage == "truncated":
            path.write_bytes(path.read_bytes()[:1000])
        elif damage == "renamed":
            state = load_file(path)
            key = "model.diffusion_model.transformer_blocks.1.attn.img_qkv.weight"
            state[key.replace("img_qkv", "img_qkv_renamed")] = state.pop(key)
            save_file(state, path)
    argv = ["generate", "--prompt", "x", "--model", str(tiny_checkpoint), option, str(path), "--out", str(tmp_path / "o")]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and str(path.name) in err
    assert not (tmp_path / "o").exists()


def test_vae_file_gives_the_folder_image_in_fp32(tiny_checkpoint, tmp_path):
    """Same pixels whether the VAE comes from the folder or from its BFL-named single file (fp32 both)."""
    _vae_file(tiny_checkpoint, tmp_path / "vae.safetensors")
    folder = LensPipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32, device="cpu")
    single = LensPipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32, device="cpu", files={"vae": tmp_path / "vae.safetensors"})
    a = np.asarray(folder("a heron", seed=5, **SMALL).images[0])
    b = np.asarray(single("a heron", seed=5, **SMALL).images[0])
    assert np.array_equal(a, b)


def reference_nvfp4(packed, scales_logical, g):
    """Plain decode of one expert bank: high nibble first, E2M1 × e4m3 block scale × fp32 expert scale."""
    from lensrun.mxfp4 import FP4_VALUES

    e, rows, half = packed.shape
    out = torch.empty(e, rows, 2 * half)
    for x in range(e):
        for r in range(rows):
            for j in range(half):
                byte = int(packed[x, r, j])
                for k, code in ((2 * j, byte >> 4), (2 * j + 1, byte & 0x0F)):
                    out[x, r, k] = FP4_VALUES[code] * float(scales_logical[x, r, k // 16].float()) * float(g[x])
    return out


def _swizzle_banks(logical: torch.Tensor) -> torch.Tensor:
    """Per expert, the logical [R, K/16] scales padded to [roundup(R,128), roundup(K/16,4)] in the block layout."""
    e, rows, cols = logical.shape
    padded = torch.zeros(e, -(-rows // 128) * 128, -(-cols // 4) * 4, dtype=torch.float8_e4m3fn)
    padded[:, :rows, :cols] = logical
    return torch.stack([to_blocked(p.view(torch.uint8)).view(torch.float8_e4m3fn) for p in padded])


def test_nvfp4_dequantization_is_exact():
    from lensrun import nvfp4

    w = torch.randn(2, 130, 64) * 0.1
    packed, logical, g = nvfp4.quantize(w)
    stored = _swizzle_banks(logical)
    assert stored.shape == (2, 256, 4)  # 130 rows padded to 256 by the block layout
    unswizzled = single_file.unswizzle(stored.view(torch.uint8), 130, 4).view(torch.float8_e4m3fn)
    assert torch.equal(unswizzled.view(torch.uint8), logical.view(torch.uint8))
    got = nvfp4.dequantize(packed, unswizzled, g, torch.float32)
    assert torch.equal(got, reference_nvfp4(packed, logical, g))
    assert ((got - w).norm() / w.norm()) < 0.12  # 4-bit codes: a rough copy, as the format is


def _te_file(tiny_checkpoint, path, damage=None):
    """ComfyUI's gpt_oss_20b_nvfp4 layout from the tiny MXFP4 encoder: no `model.` prefix, experts re-quantized
    to NVFP4 (codes, swizzled e4m3 scales, fp32 per-expert scales, comfy_quant), the rest bf16, tokenizer inside."""
    from lensrun import mxfp4, nvfp4
    from lensrun.random_checkpoint import tiny_tokenizer

    state = _state(tiny_checkpoint / "text_encoder")
    out, refs = {}, {}
    for key, t in state.items():
        if key == "lm_head.weight":
            continue
        name = key.removeprefix("model.")
        m = re.match(r"(layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)_(blocks|scales|bias)$", name)
        if m is None:
            out[name] = t.to(torch.bfloat16)
            continue
        bank = f"{m[1]}.{m[2]}"
        if m[3] == "bias":
            out[bank + ".bias"] = t.to(torch.bfloat16)
        elif m[3] == "blocks":
            w = mxfp4.dequantize(t, state[key.replace("_blocks", "_scales")], torch.float32)
            packed, logical, g = nvfp4.quantize(w)
            out[bank + ".weight"], out[bank + ".weight_scale"], out[bank + ".weight_scale_2"] = packed, _swizzle_banks(logical), g
            out[bank + ".comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4", "num_experts": 4}'), dtype=torch.uint8)
            refs[bank] = reference_nvfp4(packed, logical, g)
    if damage == "scale-shape":
        key = next(k for k in out if k.endswith("down_proj.weight_scale"))
        out[key] = out[key][:, :64].contiguous()
    out["tokenizer_json"] = torch.tensor(list(tiny_tokenizer().backend_tokenizer.to_str().encode()), dtype=torch.uint8)
    save_file(out, path)
    return refs


def test_nvfp4_text_encoder_file_with_its_tokenizer(tiny_checkpoint, tmp_path):
    refs = _te_file(tiny_checkpoint, tmp_path / "gpt_oss_20b_nvfp4.safetensors")
    folder = LensPipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32, device="cpu")
    single = LensPipeline.from_pretrained(
        tiny_checkpoint, dtype=torch.float32, device="cpu", files={"text_encoder": tmp_path / "gpt_oss_20b_nvfp4.safetensors"}
    )
    for bank, ref in refs.items():  # the experts are kept packed and decode exactly
        layer, part = int(bank.split(".")[1]), bank.rsplit(".", 1)[1]
        experts = single.text_encoder.layers[layer].mlp.experts
        assert torch.equal(experts.decoded(part, slice(0, 4), torch.float32), ref)
    prompt = "a heron in the reeds"
    assert folder.tokenizer(prompt)["input_ids"] == single.tokenizer(prompt)["input_ids"]
    a, b = folder.encode_one(prompt), single.encode_one(prompt)
    cos = torch.nn.functional.cosine_similarity(torch.cat(a, -1).flatten(), torch.cat(b, -1).flatten(), dim=0)
    assert a[0].shape == b[0].shape and cos > 0.9  # NVFP4 is a re-quantization of the MXFP4 weights: close, not equal
    assert torch.isfinite(single("a heron", seed=2, output_type="pt", **SMALL).images).all()


def test_nvfp4_file_with_a_wrong_scale_shape_is_refused(tiny_checkpoint, tmp_path, capsys):
    _te_file(tiny_checkpoint, tmp_path / "te.safetensors", damage="scale-shape")
    argv = ["generate", "--prompt", "x", "--model", str(tiny_checkpoint), "--text-encoder", str(tmp_path / "te.safetensors"),
            "--out", str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "down_proj.weight_scale' has shape [4, 64, 4]; the model expects [4, 128, 4]" in err and "Traceback" not in err


def test_planner_counts_the_nvfp4_encoder():
    from lensrun import configs, memory

    nvfp4 = memory.ComponentSizes.from_configs(
        configs.FULL_TRANSFORMER_CONFIG, configs.FULL_TEXT_ENCODER_CONFIG, configs.FULL_VAE_CONFIG, experts="nvfp4"
    )
    total = (nvfp4.encoder_body + nvfp4.encoder_embedding) / memory.GIB
    assert 12.2 < total < 12.4  # COMFY_FORMATS: the file is ≈ 13.2 GB = 12.3 GiB
    graphs = memory.predict(memory.Plan(), nvfp4, 1024, 1024, fused_experts=False)
    assert graphs.phases["encode"] > memory.predict(memory.Plan(), memory.ComponentSizes.lens(), 1024, 1024).phases["encode"]


@pytest.fixture
def comfy_folder(tiny_checkpoint, tmp_path, monkeypatch):
    """A ComfyUI models folder of tiny files (the 'published' configs patched to the tiny ones), with another
    model's file beside them."""
    from lensrun import configs

    for part in ("TRANSFORMER", "TEXT_ENCODER", "VAE"):
        monkeypatch.setattr(configs, f"FULL_{part}_CONFIG", getattr(configs, f"TINY_{part}_CONFIG"))
    models = tmp_path / "ComfyUI" / "models"
    for sub in ("diffusion_models", "text_encoders", "vae"):
        (models / sub).mkdir(parents=True)
    _dit_file(tiny_checkpoint, models / "diffusion_models" / "lens_bf16.safetensors")
    save_file({"input_blocks.0.0.weight": torch.zeros(2, 2)}, models / "diffusion_models" / "sdxl.safetensors")
    _te_file(tiny_checkpoint, models / "text_encoders" / "gpt_oss_20b_nvfp4.safetensors")
    _vae_file(tiny_checkpoint, models / "vae" / "flux2-vae.safetensors")
    return models


def test_a_comfyui_models_folder_is_a_model(comfy_folder, tmp_path, capsys):
    import shutil

    from lensrun.engine import Engine

    Engine._shared.clear()
    argv = ["generate", "--prompt", "a heron", "--seed", "1", "--model", str(comfy_folder.parent), "--height", "32",
            "--width", "48", "--steps", "2", "--out", str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    png = capsys.readouterr().out.split()[0]
    config = json.loads(Image.open(png).text["lensrun"])
    assert config["variant"] == "lens" and config["transformer"].endswith("lens_bf16.safetensors")
    assert config["text_encoder"].endswith("gpt_oss_20b_nvfp4.safetensors")
    # Lens-Turbo beside it: the Lens file is still the default; alone, Turbo's name gives Turbo's preset.
    turbo = comfy_folder / "diffusion_models" / "lens_turbo_bf16.safetensors"
    shutil.copy(comfy_folder / "diffusion_models" / "lens_bf16.safetensors", turbo)
    (comfy_folder / "diffusion_models" / "lens_bf16.safetensors").unlink()
    Engine._shared.clear()
    argv = ["generate", "--prompt", "a heron", "--model", str(comfy_folder), "--height", "32", "--width", "48",
            "--out", str(tmp_path / "t")]  # fmt: skip
    assert main(argv) == 0
    config = json.loads(Image.open(capsys.readouterr().out.split()[0]).text["lensrun"])
    assert (config["variant"], config["steps"], config["cfg"]) == ("turbo", 4, 1.0)
    shutil.copy(turbo, comfy_folder / "diffusion_models" / "lens_turbo_copy.safetensors")
    assert main(argv) == 2
    assert "several candidates (lens_turbo_bf16.safetensors, lens_turbo_copy.safetensors)" in capsys.readouterr().err
    Engine._shared.clear()


# ------------------------------------------------------------------------------ full size, header-only (sparse)
SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float32: "F32", torch.uint8: "U8", torch.float8_e4m3fn: "F8_E4M3", torch.int64: "I64"}
DTYPE_BYTES = {"BF16": 2, "F32": 4, "U8": 1, "F8_E4M3": 1, "I64": 8}


def _sparse_safetensors(path, spec: dict) -> None:
    """A safetensors file with ``spec``'s names, dtypes and shapes whose data is a hole (zeros, no disk used)."""
    import struct

    head, offset = {}, 0
    for name, (dtype, shape) in spec.items():
        size = int(np.prod(shape)) * DTYPE_BYTES[dtype]
        head[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(head).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)


def _up(n: int, m: int) -> int:
    return -(-n // m) * m


def _full_dit_spec(rename: str | None = None) -> dict:
    """ComfyUI's lens_mxfp8 at full size: block linears e4m3 (padded to 32), swizzled E8M0 scales, records."""
    from lensrun.configs import FULL_TRANSFORMER_CONFIG, transformer_meta_state

    spec, p = {}, "model.diffusion_model."
    for name, t in transformer_meta_state({k: v for k, v in FULL_TRANSFORMER_CONFIG.items() if not k.startswith("_")}).items():
        layer = name.rsplit(".", 1)[0]
        if name.startswith("transformer_blocks.") and name.endswith(".weight") and t.dim() == 2 and "_mod" not in name:
            rows, cols = _up(t.shape[0], 32), _up(t.shape[1], 32)
            spec[p + name] = ("F8_E4M3", (rows, cols))
            spec[p + layer + ".weight_scale"] = ("U8", (_up(rows, 128), _up(cols // 32, 4)))
            spec[p + layer + ".comfy_quant"] = ("U8", (19,))
        else:
            spec[p + name] = ("BF16", tuple(t.shape))
    if rename:  # one key renamed, as a damaged or foreign file would have it
        spec[p + rename] = spec.pop(p + "transformer_blocks.7.attn.norm_added_q.weight")
    return spec


def _full_encoder_spec(scale_rows: int | None = None) -> dict:
    """ComfyUI's gpt_oss_20b_nvfp4 at full size: the NVFP4 module's names, scales in the block layout."""
    from lensrun.configs import FULL_TEXT_ENCODER_CONFIG
    from lensrun.models.text_encoder import LensTextEncoder, gpt_oss_config
    from lensrun.nvfp4 import scale_shape

    cfg = gpt_oss_config(FULL_TEXT_ENCODER_CONFIG)
    spec = {"tokenizer_json": ("U8", (1024,))}
    for name, t in LensTextEncoder._build_meta(cfg, (23,), experts="nvfp4").state_dict().items():
        shape = tuple(t.shape)
        if name.endswith(".weight_scale"):
            shape = (shape[0], *scale_shape(shape[1], shape[2] * 16))
            if scale_rows is not None and "layers.3.mlp.experts.down_proj" in name:
                shape = (shape[0], scale_rows, shape[2])
            spec[name.rsplit(".", 1)[0] + ".comfy_quant"] = ("U8", (19,))
        wide = t.dtype in (torch.bfloat16, torch.float32) and not name.endswith("weight_scale_2")
        spec[name] = ("BF16" if wide else SAFETENSORS_DTYPE[t.dtype], shape)
    return spec


def _full_vae_spec() -> dict:
    from lensrun.configs import FULL_VAE_CONFIG, vae_meta_state

    state = vae_meta_state(FULL_VAE_CONFIG)
    up = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks."))
    spec = {}
    for name, t in state.items():
        if name == "bn.num_batches_tracked":
            continue
        shape = (*t.shape, 1, 1) if ".attentions.0.to_" in name and name.endswith("weight") else tuple(t.shape)
        spec[bfl_name(name, up)] = ("F32", shape)
    return spec


@pytest.fixture(scope="module")
def full_size_files(tmp_path_factory):
    """ComfyUI's models folder at full size (sparse: ~0 bytes on disk), as COMFY_FORMATS.md lays it out."""
    root = tmp_path_factory.mktemp("ComfyUI") / "models"
    for folder, name, spec in (
        ("diffusion_models", "lens_mxfp8.safetensors", _full_dit_spec()),
        ("text_encoders", "gpt_oss_20b_nvfp4.safetensors", _full_encoder_spec()),
        ("vae", "flux2-vae.safetensors", _full_vae_spec()),
    ):
        (root / folder).mkdir(parents=True)
        _sparse_safetensors(root / folder / name, spec)
    return root


def test_full_size_files_are_recognised_and_checked_from_their_headers(full_size_files):
    from lensrun.configs import (
        FULL_TEXT_ENCODER_CONFIG,
        FULL_TRANSFORMER_CONFIG,
        FULL_VAE_CONFIG,
        transformer_meta_state,
        vae_meta_state,
    )
    from lensrun.models.text_encoder import LensTextEncoder, gpt_oss_config

    dit = full_size_files / "diffusion_models" / "lens_mxfp8.safetensors"
    te = full_size_files / "text_encoders" / "gpt_oss_20b_nvfp4.safetensors"
    vae = full_size_files / "vae" / "flux2-vae.safetensors"
    assert dit.stat().st_size > 5 * 2**30 and te.stat().st_size > 12 * 2**30  # full size, but holes on disk
    assert [single_file.kind(p) for p in (dit, te, vae)] == ["dit", "text_encoder", "vae"]
    meta = transformer_meta_state({k: v for k, v in FULL_TRANSFORMER_CONFIG.items() if not k.startswith("_")})
    assert len(single_file.check_dit(dit, meta)) == 48 * 10  # every block linear but the modulation, in MXFP8
    encoder = LensTextEncoder._build_meta(gpt_oss_config(FULL_TEXT_ENCODER_CONFIG), (5, 11, 17, 23), experts="nvfp4")
    single_file.check_text_encoder(te, encoder.state_dict())
    vae_state = single_file.read_vae(vae, vae_meta_state(FULL_VAE_CONFIG))  # 336 MB: read whole, names mapped
    assert vae_state["decoder.mid_block.attentions.0.to_q.weight"].shape == (512, 512)
    parts = single_file.comfy_parts(full_size_files, None, {"transformer": None, "text_encoder": None, "vae": None})
    assert parts == {"transformer": dit, "text_encoder": te, "vae": vae}


def test_lensrun_plan_reads_a_full_size_comfyui_folder(full_size_files, capsys):
    assert main(["plan", "--vram", "24GB", "--model", str(full_size_files)]) == 0
    with_files = capsys.readouterr().out
    assert main(["plan", "--vram", "24GB"]) == 0
    folder = capsys.readouterr().out
    def encode_peak(out: str, plan: str = "phased+bf16+emb-cpu") -> float:
        """The encode phase of a plan that holds only the encoder then."""
        return next(float(line.split()[2]) for line in out.splitlines() if line[2:].split()[:1] == [plan])

    assert encode_peak(with_files) > encode_peak(folder)  # NVFP4 experts: 12.30 GiB against MXFP4's 11.7


@pytest.mark.parametrize(
    ("folder", "name", "spec", "message"),
    [
        ("diffusion_models", "lens_mxfp8.safetensors", lambda: _full_dit_spec(rename="transformer_blocks.7.attn.norm_added_k2.weight"),
         "weight 'transformer_blocks.7.attn.norm_added_q.weight' is missing"),
        ("text_encoders", "gpt_oss_20b_nvfp4.safetensors", lambda: _full_encoder_spec(scale_rows=128),
         "layers.3.mlp.experts.down_proj.weight_scale' has shape"),
    ],
)  # fmt: skip
def test_full_size_damage_is_named_before_any_weight_is_read(tmp_path, folder, name, spec, message):
    from lensrun.configs import FULL_TEXT_ENCODER_CONFIG, FULL_TRANSFORMER_CONFIG, transformer_meta_state
    from lensrun.models.text_encoder import LensTextEncoder, gpt_oss_config

    path = tmp_path / name
    _sparse_safetensors(path, spec())
    with pytest.raises(single_file.LensrunError, match=re.escape(message)):
        if folder == "diffusion_models":
            single_file.check_dit(path, transformer_meta_state({k: v for k, v in FULL_TRANSFORMER_CONFIG.items() if not k.startswith("_")}))
        else:
            encoder = LensTextEncoder._build_meta(gpt_oss_config(FULL_TEXT_ENCODER_CONFIG), (23,), experts="nvfp4")
            single_file.check_text_encoder(path, encoder.state_dict())


def test_a_truncated_full_size_file_is_refused(tmp_path):
    path = tmp_path / "lens_mxfp8.safetensors"
    _sparse_safetensors(path, _full_dit_spec())
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 4096)
    with pytest.raises(single_file.LensrunError, match="truncated or corrupt"):
        single_file.kind(path)
