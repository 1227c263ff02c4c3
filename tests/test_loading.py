"""Loading real-layout checkpoints (folder, sharded, Hub cache) and refusing bad ones with specific errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lensrun import LensPipeline, LensrunError, LensTransformer2DModel
from lensrun.loading import resolve_model


def test_transformer_from_pretrained_subfolder(tiny_checkpoint):
    files = sorted((tiny_checkpoint / "transformer").glob("*.safetensors"))
    assert len(files) > 1 and (tiny_checkpoint / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    model = LensTransformer2DModel.from_pretrained(tiny_checkpoint, subfolder="transformer", torch_dtype=torch.bfloat16)
    assert model.img_in.weight.dtype == torch.bfloat16
    on_disk = {}
    for f in files:
        on_disk.update(load_file(f))
    assert on_disk["img_in.weight"].dtype == torch.float32
    assert torch.equal(model.img_in.weight, on_disk["img_in.weight"].to(torch.bfloat16))


def test_pipeline_from_folder_generates(tiny_checkpoint):
    pipe = LensPipeline.from_pretrained(tiny_checkpoint, dtype=torch.float32, device="cpu")
    assert pipe.variant == "lens"
    out = pipe("a lighthouse at dusk", seed=7, height=64, width=96, num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 64, 96, 3)
    assert 0.0 <= out.images.min() and out.images.max() <= 1.0 and out.images.std() > 0
    assert set(out.timings) == {"encode", "denoise", "decode"}


def _copy(src, tmp_path, name="Lens-Copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_hub_repo_id_from_offline_cache(tiny_checkpoint, tmp_path, monkeypatch):
    """A mirror repo id resolves from the local Hub cache with HF_HUB_OFFLINE=1; the variant comes from its name."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--SomeMirror--Lens-Turbo-Diffusers"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert constants.HF_HUB_OFFLINE
    assert resolve_model("SomeMirror/Lens-Turbo-Diffusers") == repo / "snapshots" / commit
    pipe = LensPipeline.from_pretrained("SomeMirror/Lens-Turbo-Diffusers", dtype=torch.float32, device="cpu")
    assert pipe.variant == "turbo"


def test_uncached_repo_id_offline_is_clear(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(LensrunError, match="not in the Hugging Face cache"):
        resolve_model("microsoft/Lens")


def test_missing_model_path():
    with pytest.raises(LensrunError, match="model folder not found: ./no/such/folder"):
        LensPipeline.from_pretrained("./no/such/folder")


def test_missing_subfolder(tiny_checkpoint, tmp_path):
    root = _copy(tiny_checkpoint, tmp_path)
    shutil.rmtree(root / "vae")
    with pytest.raises(LensrunError, match=r"missing subfolder 'vae/'"):
        LensPipeline.from_pretrained(root)


def test_missing_model_index(tiny_checkpoint, tmp_path):
    root = _copy(tiny_checkpoint, tmp_path)
    (root / "model_index.json").unlink()
    with pytest.raises(LensrunError, match="no model_index.json"):
        LensPipeline.from_pretrained(root)


def test_pickle_weights_refused(tiny_checkpoint, tmp_path):
    root = _copy(tiny_checkpoint, tmp_path)
    for f in (root / "vae").glob("*.safetensors"):
        f.unlink()
    (root / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(LensrunError, match=r"refusing to load .*diffusion_pytorch_model\.bin: .*safetensors weights only"):
        LensPipeline.from_pretrained(root)


def test_shape_mismatch_names_key_and_shapes(tiny_checkpoint, tmp_path):
    root = _copy(tiny_checkpoint, tmp_path)
    index = json.loads((root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = root / "transformer" / index["weight_map"]["proj_out.weight"]
    tensors = load_file(shard)
    tensors["proj_out.weight"] = torch.zeros(64, 128)
    save_file(tensors, shard)
    with pytest.raises(LensrunError, match=r"'proj_out.weight' has shape \[64, 128\] .* expects \[128, 128\]"):
        LensPipeline.from_pretrained(root)


def test_missing_key_named(tiny_checkpoint, tmp_path):
    root = _copy(tiny_checkpoint, tmp_path)
    victim = "model.layers.0.self_attn.q_proj.weight"
    shard = next(f for f in (root / "text_encoder").glob("*.safetensors") if victim in load_file(f))
    tensors = load_file(shard)
    del tensors[victim]
    save_file(tensors, shard)
    with pytest.raises(LensrunError, match=f"weight '{victim}' is missing"):
        LensPipeline.from_pretrained(root)


def test_ensure_checkpoint_reuses_only_a_complete_folder(tmp_path):
    """model_index.json is written last, so a folder cut short while writing is written again, not loaded."""
    from lensrun.random_checkpoint import ensure_checkpoint

    root = tmp_path / "ck"
    assert ensure_checkpoint(root, size="tiny")
    stamp = (root / "vae" / "config.json").stat().st_mtime_ns
    assert not ensure_checkpoint(root, size="tiny")
    assert (root / "vae" / "config.json").stat().st_mtime_ns == stamp
    (root / "model_index.json").unlink()  # as if the writer had been killed before finishing
    assert ensure_checkpoint(root, size="tiny")
    assert LensPipeline.from_pretrained(root, dtype=torch.float32, device="cpu").transformer is not None
