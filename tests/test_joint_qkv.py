"""The one-pass attention inputs (``lensrun.joint_qkv``) against the eager path they replace: q/k RMSNorm, RoPE,
[image; text] concatenation, in FlashAttention's layout, and their fp8 form. Runs on the GPU where there is one,
else through Triton's CPU interpreter, which truncates where a GPU rounds to nearest when it narrows a float (so
there the comparison allows a few units in the last place, and fp8 values are compared on a GPU only)."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()  # without it, conftest.py has put Triton in interpreter mode

from lensrun.joint_qkv import joint_qkv
from lensrun.models.transformer_lens import LensJointAttention, lens_rope

DEVICE = "cuda" if CUDA else "cpu"
HEADS, DIM = 3, 64
ULPS = 2 if CUDA else 8  # bf16 units in the last place


def _inputs(batch: int, grid: tuple[int, int], text: int, seed: int = 0):
    """QKV projections of ``batch`` images and ``text`` tokens, a joint attention with random norm weights (its
    ``joint_inputs`` is the eager path), and the RoPE tables."""
    gen = torch.Generator().manual_seed(seed)
    width = 3 * HEADS * DIM
    img = (torch.randn(batch, grid[0] * grid[1], width, generator=gen) * 3).to(DEVICE, torch.bfloat16)
    txt = torch.randn(batch, text, width, generator=gen).to(DEVICE, torch.bfloat16)
    attn = LensJointAttention(HEADS * DIM, HEADS, DIM).to(DEVICE, torch.bfloat16)
    for norm in _norms(attn):
        norm.weight.data = (torch.rand(DIM, generator=gen) * 2 + 0.1).to(DEVICE, torch.bfloat16)
    cos, sin = lens_rope(grid, text, (8, 28, 28), device=DEVICE)
    return img, txt, attn, cos, sin


def _norms(attn: LensJointAttention) -> tuple:
    """Its q/k norms in ``joint_qkv``'s order: image q, image k, text q, text k."""
    return attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k


def _weights(attn: LensJointAttention) -> tuple[torch.Tensor, ...]:
    return tuple(norm.weight for norm in _norms(attn))


def _close(fused: torch.Tensor, eager: torch.Tensor, ulps: float) -> bool:
    """Within ``ulps`` bf16 units of each head vector's largest value (the rotation mixes a pair, so an element's
    error scales with its pair, not with itself)."""
    a, b = fused.float(), eager.float()
    return bool(((a - b).abs() <= ulps * 2**-8 * b.abs().amax(-1, keepdim=True)).all())


@pytest.mark.parametrize(("batch", "grid", "text"), [(1, (5, 7), 9), (2, (9, 15), 70), (1, (6, 11), 0)])
def test_one_pass_equals_norm_rope_and_concatenation(batch, grid, text):
    """Odd token counts, a sequence across several 64-token tiles, two images, and the empty negative prompt."""
    img, txt, attn, cos, sin = _inputs(batch, grid, text)
    with torch.no_grad():
        qk, v, descale, v_amax = joint_qkv(img, txt, _weights(attn), (cos, sin), 1e-6, HEADS, False)
        q, k, v_ref = attn.joint_inputs(img, txt, cos, sin)
    assert qk.shape == (2, batch, grid[0] * grid[1] + text, HEADS, DIM) and qk.dtype == torch.bfloat16
    assert torch.equal(v, v_ref.transpose(1, 2))
    assert _close(qk[0], q.transpose(1, 2), ULPS) and _close(qk[1], k.transpose(1, 2), ULPS)
    assert not descale.any() and not v_amax.any()  # only fp8 fills them


def test_fp8_scales_come_from_the_norm_weights_and_v_keeps_its_amax():
    img, txt, attn, cos, sin = _inputs(2, (7, 9), 13, seed=1)
    with torch.no_grad():
        qk, v, descale, v_amax = joint_qkv(img, txt, _weights(attn), (cos, sin), 1e-6, HEADS, True)
        q, k, v_ref = attn.joint_inputs(img, txt, cos, sin)
    assert qk.dtype == torch.float8_e4m3fn and descale.shape == (2, 2, HEADS)
    pairs = ((q, attn.norm_q, attn.norm_added_q), (k, attn.norm_k, attn.norm_added_k))
    for which, (reference, image_norm, text_norm) in enumerate(pairs):
        bound = DIM**0.5 * (1 + 2**-6) * max(image_norm.weight.abs().max(), text_norm.weight.abs().max()).float()
        assert torch.allclose(descale[which], (bound / 448).expand(2, HEADS))
        assert reference.abs().max() <= bound  # the bound holds: nothing was clipped
        if CUDA:  # the interpreter's e4m3 narrowing is not faithful (126.6 becomes 64), a GPU's is
            values = qk[which].float() * descale[which][:, None, :, None]
            assert _close(values, reference.transpose(1, 2), 2**4)  # e4m3 keeps 3 mantissa bits
    assert torch.equal(v, v_ref.transpose(1, 2))
    assert torch.equal(v_amax, v_ref.abs().amax(dim=(2, 3)).float())


@pytest.mark.parametrize("backend", ["fa3", "fa3-fp8"])
def test_the_fused_attention_block_equals_the_unfused_one(backend, monkeypatch):
    """``LensJointAttention`` through ``_fused`` (FlashAttention stood in for by SDPA on its layout and
    descales) against the same block unfused through SDPA."""
    import lensrun.models.transformer_lens as model

    def flash(q, k, v, descales=None, dtype=None, counts=None):
        assert counts is None
        if descales is not None:
            q, k, v = (t.float() * s[:, None, :, None] for t, s in zip((q, k, v), descales, strict=True))
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v)))
        return out.transpose(1, 2).to(dtype or q.dtype)

    torch.manual_seed(2)
    attn = LensJointAttention(HEADS * DIM, HEADS, DIM).to(DEVICE, torch.bfloat16)
    x = torch.randn(1, 35, HEADS * DIM, device=DEVICE, dtype=torch.bfloat16)
    c = torch.randn(1, 6, HEADS * DIM, device=DEVICE, dtype=torch.bfloat16)
    cos, sin = lens_rope((5, 7), 6, (8, 28, 28), device=DEVICE)
    with torch.no_grad():
        reference = attn(x, c, cos, sin, None)
        monkeypatch.setattr(model, "flash", flash)
        monkeypatch.setattr(LensJointAttention, "_fuses", lambda self, x, keys: True)
        attn.backend = backend
        fused = attn(x, c, cos, sin, None)
    limit = 0.05 if backend == "fa3" else 0.25  # bf16 roundings / e4m3 q, k, v
    for a, b in zip(fused, reference, strict=True):
        assert a.shape == b.shape and (a.float() - b.float()).abs().max() <= limit * b.float().abs().max()


@pytest.mark.skipif(not CUDA, reason="Inductor calls the kernel on a GPU")
def test_compiled_with_changing_token_counts_equals_eager():
    """Inside a compiled region (as in the DiT's blocks) with dynamic token counts: the same outputs."""
    compiled = torch.compile(joint_qkv, dynamic=True, fullgraph=True)
    for grid, text in (((6, 11), 17), ((9, 15), 70), ((6, 11), 0)):
        img, txt, attn, cos, sin = _inputs(1, grid, text)
        for fp8 in (False, True):
            args = (img, txt, _weights(attn), (cos, sin), 1e-6, HEADS, fp8)
            with torch.no_grad():
                for a, b in zip(compiled(*args), joint_qkv(*args), strict=True):
                    assert torch.equal(_bits(a), _bits(b))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
