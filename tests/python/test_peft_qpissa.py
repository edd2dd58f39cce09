"""QPiSSA (`pissa init --quantize nf4`) against bitsandbytes' NF4 (quant_type "nf4", blocksize 64,
no double quantisation), on the CPU where the installed bitsandbytes runs it there:
- the residual written is a fixed point of bitsandbytes' NF4: quantize_4bit + dequantize_4bit of
  it gives it back bit for bit in float32 (it is made of NF4 codes times float32 block absmax), to
  bfloat16 rounding in bfloat16;
- it is bitsandbytes' deq(NF4(W - s B A)) of our own adapter: the same codes but for the rare
  element whose scaled value lies within rounding of a code boundary, and the same block scales to
  float32 rounding (s B A is summed in another order in C++, which moves a block's absmax by an ulp);
- its error ||W - deq(Q) - s B A|| is below QLoRA's ||W - deq(NF4(W))|| on a weight with a decaying spectrum."""

from __future__ import annotations

import pytest
import torch

from conftest import adapter_config, adapter_modules, load_safetensors_dir, scaling_of

BLOCK = 64


@pytest.fixture(scope="module")
def nf4():
    """(quantize, dequantize) of bitsandbytes' NF4 on the CPU, or a skip naming why it cannot run."""
    try:
        import bitsandbytes
        import bitsandbytes.functional as F
    except Exception as exc:  # noqa: BLE001 - any import failure means no oracle
        pytest.skip(f"bitsandbytes does not import: {exc!r}")
    try:
        probe = torch.randn(4, BLOCK)
        q, state = F.quantize_4bit(probe, blocksize=BLOCK, quant_type="nf4", compress_statistics=False)
        F.dequantize_4bit(q, state)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"bitsandbytes {bitsandbytes.__version__}: NF4 quantize_4bit/dequantize_4bit do not run on "
                    f"the CPU: {exc!r}")

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        q, state = F.quantize_4bit(x.float().contiguous(), blocksize=BLOCK, quant_type="nf4",
                                   compress_statistics=False)
        return F.dequantize_4bit(q, state).reshape(x.shape)

    return roundtrip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_qpissa_residual_is_bitsandbytes_nf4(pissa, nf4, tiny_llama, tmp_path, dtype):
    model_dir = tiny_llama(dtype=dtype, spectra=True)
    out = tmp_path / "out"
    targets = ("q_proj", "v_proj", "down_proj")
    pissa.run("init", model_dir, "--out", out, "--rank", 8, "--exact", "--targets", ",".join(targets),
              "--quantize", "nf4")
    weights, residual = load_safetensors_dir(model_dir), load_safetensors_dir(out)
    s = scaling_of(adapter_config(out / "pissa_init"))
    mods = adapter_modules(out / "pissa_init")
    assert sorted(m.rsplit(".", 1)[-1] for m in mods) == sorted(targets * 2)
    for name, (a, b) in mods.items():
        w = weights[name + ".weight"].float()
        r_ours = residual[name + ".weight"]
        assert r_ours.dtype == dtype
        if dtype == torch.float32:
            assert torch.equal(nf4(r_ours), r_ours), f"{name}: not a fixed point of bitsandbytes' NF4"
        else:
            # bfloat16 rounds code * absmax; requantising keeps every code (bnb loading it with
            # load_in_4bit gets our Q back to bfloat16 precision).
            again = nf4(r_ours).to(dtype)
            assert float((again.float() - r_ours.float()).abs().max()) <= 2 ** -7 * float(r_ours.float().abs().max())
        x = w - s * b @ a
        theirs = nf4(x).to(dtype).float()
        absmax = x.reshape(-1, BLOCK).abs().amax(dim=1, keepdim=True)
        # A code flip moves an element by at least 0.07 absmax (the closest NF4 values); an ulp of
        # the scale by about 1e-7 of it.
        moved = ((theirs - r_ours.float()).abs().reshape(-1, BLOCK) / absmax)
        scale_tol = 1e-5 if dtype == torch.float32 else 1e-2
        flips = float((moved > scale_tol).float().mean())
        assert flips < 2e-3, f"{name}: {flips:.2%} of the elements differ from bitsandbytes' NF4 codes"
        err_qpissa = float((w - r_ours.float() - s * b @ a).norm())
        err_qlora = float((w - nf4(w)).norm())
        assert err_qpissa < err_qlora, f"{name}: QPiSSA {err_qpissa:.4g} not below QLoRA {err_qlora:.4g}"


def test_qpissa_leaves_non_targets_untouched(pissa, nf4, tiny_llama, tmp_path):
    model_dir = tiny_llama()
    out = tmp_path / "out"
    pissa.run("init", model_dir, "--out", out, "--rank", 4, "--quantize", "nf4")
    before, after = load_safetensors_dir(model_dir), load_safetensors_dir(out)
    for key, t in before.items():
        if key.endswith(("q_proj.weight", "v_proj.weight")):
            assert not torch.equal(after[key], t)
        else:
            assert torch.equal(after[key], t), key
