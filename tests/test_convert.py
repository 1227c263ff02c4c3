"""``lensrun convert``: the tiny diffusers checkpoint as ComfyUI's single files, loaded back by lensrun (the
files' values are the folder's, in the file formats' precision), resumable, and the BFL names exactly the
reference mapping's."""

import torch
from safetensors.torch import load_file

from lensrun import LensPipeline, mxfp4, nvfp4, single_file
from lensrun.cli import main
from lensrun.convert import bfl_name, to_comfy


def _folder_state(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_converted_files_load_with_the_folders_values(tiny_checkpoint, tmp_path):
    files = to_comfy(str(tiny_checkpoint), tmp_path / "models")
    assert [single_file.kind(files[p]) for p in ("transformer", "vae", "text_encoder")] == ["dit", "vae", "text_encoder"]
    assert files["transformer"].name == "lens_bf16.safetensors"
    # The files alone (the folder only lends its configs: a ComfyUI folder would take the published full-size ones).
    pipe = LensPipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32, device="cpu", files=files)
    dit = _folder_state(tiny_checkpoint / "transformer")
    assert all(torch.equal(v, dit[k].to(torch.bfloat16).float()) for k, v in pipe.transformer.state_dict().items())
    vae = _folder_state(tiny_checkpoint / "vae")
    assert all(torch.equal(v, vae[k]) for k, v in pipe.vae.state_dict().items() if k != "bn.num_batches_tracked")
    encoder = _folder_state(tiny_checkpoint / "text_encoder")
    experts = pipe.text_encoder.layers[1].mlp.experts
    original = mxfp4.dequantize(
        encoder["model.layers.1.mlp.experts.down_proj_blocks"], encoder["model.layers.1.mlp.experts.down_proj_scales"], torch.float32
    )
    assert torch.equal(experts.decoded("down_proj", slice(0, 4), torch.float32), nvfp4.dequantize(*nvfp4.quantize(original), torch.float32))
    assert pipe.tokenizer("a heron")["input_ids"] == LensPipeline.from_pretrained(tiny_checkpoint, device="cpu").tokenizer("a heron")["input_ids"]
    assert torch.isfinite(pipe("a heron", height=32, width=32, num_inference_steps=2, seed=1, output_type="pt").images).all()


def test_mxfp8_dit_and_resume(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "models"
    assert main(["convert", str(tiny_checkpoint), "--out", str(out), "--dit-format", "mxfp8"]) == 0
    dit = out / "diffusion_models" / "lens_mxfp8.safetensors"
    loaded = LensPipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32, device="cpu", files={"transformer": dit})
    folder = _folder_state(tiny_checkpoint / "transformer")
    w = loaded.transformer.state_dict()["transformer_blocks.0.img_mlp.w1.weight"]
    assert (w - folder["transformer_blocks.0.img_mlp.w1.weight"]).abs().max() <= folder["transformer_blocks.0.img_mlp.w1.weight"].abs().max() / 8
    capsys.readouterr()
    with open(out / "vae" / "flux2-vae.safetensors", "r+b") as f:  # an interrupted write left a torn file
        f.truncate(1000)
    assert main(["convert", str(tiny_checkpoint), "--out", str(out), "--dit-format", "mxfp8"]) == 0
    said = capsys.readouterr().err
    assert said.count("already converted") == 2 and "writing" in said and "flux2-vae" in said
    assert single_file.kind(out / "vae" / "flux2-vae.safetensors") == "vae"
    assert not list(out.rglob("*.partial"))


def test_bfl_names_follow_the_format_and_round_trip():
    """COMFY_FORMATS.md §4's mapping, one example per rule, and the loader's mapping undoes it for every key."""
    from lensrun.configs import FULL_VAE_CONFIG, vae_meta_state

    examples = {
        "encoder.conv_norm_out.weight": "encoder.norm_out.weight",
        "quant_conv.weight": "encoder.quant_conv.weight",
        "post_quant_conv.bias": "decoder.post_quant_conv.bias",
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down_blocks.2.downsamplers.0.conv.weight": "encoder.down.2.downsample.conv.weight",
        "decoder.up_blocks.0.resnets.1.conv1.weight": "decoder.up.3.block.1.conv1.weight",
        "decoder.up_blocks.2.upsamplers.0.conv.weight": "decoder.up.1.upsample.conv.weight",
        "decoder.mid_block.resnets.1.norm2.weight": "decoder.mid.block_2.norm2.weight",
        "encoder.mid_block.attentions.0.to_out.0.weight": "encoder.mid.attn_1.proj_out.weight",
        "decoder.mid_block.attentions.0.group_norm.bias": "decoder.mid.attn_1.norm.bias",
        "decoder.mid_block.attentions.0.to_k.weight": "decoder.mid.attn_1.k.weight",
        "bn.running_mean": "bn.running_mean",
    }
    assert {k: bfl_name(k, 4) for k in examples} == examples
    names = list(vae_meta_state(FULL_VAE_CONFIG))
    assert all(single_file.vae_name(bfl_name(k, 4), 4) == k for k in names)


def test_comfy_files_back_to_a_diffusers_folder(tiny_checkpoint, tmp_path, capsys):
    """And back: DiT and VAE as the files hold them, the encoder's NVFP4 experts re-quantized to MXFP4, tokenizer
    from the file; the folder loads, and a resumed conversion writes only what is missing."""
    from lensrun.convert import to_diffusers

    files = to_comfy(str(tiny_checkpoint), tmp_path / "models")
    back = to_diffusers(files, tmp_path / "Lens-back", configs_from=tiny_checkpoint)
    single = LensPipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32, device="cpu", files=files)
    folder = LensPipeline.from_pretrained(back, dtype=torch.float32, device="cpu")
    for a, b in ((single.transformer, folder.transformer), (single.vae, folder.vae)):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    nv = single.text_encoder.layers[0].mlp.experts.decoded("gate_up_proj", slice(0, 4), torch.float32)
    mx = folder.text_encoder.layers[0].mlp.experts.decoded("gate_up_proj", slice(0, 4), torch.float32)
    assert ((nv - mx).norm() / nv.norm()) < 0.15  # two 4-bit formats: one re-quantization apart
    assert single.tokenizer("a heron")["input_ids"] == folder.tokenizer("a heron")["input_ids"]
    import shutil

    shutil.rmtree(back / "vae")
    (back / "model_index.json").unlink()
    capsys.readouterr()
    to_diffusers(files, back, configs_from=tiny_checkpoint, notify=print)
    said = capsys.readouterr().out
    assert said.count("already converted") == 4 and "vae" in said.split("writing")[1]
    assert (back / "model_index.json").is_file() and not list(back.glob(".*.partial"))
