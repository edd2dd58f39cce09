"""pissa.get_peft_model against peft's own PiSSA initialisation: the same split (exact method, per
module, compared through products), the original model's outputs at initialisation, a saved
adapter that loads onto the saved residual model, per-layer ranks and alphas, GPT-2's Conv1D
(fan_in_fan_out), and seeded reproducibility recorded in the saved adapter's metadata."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft import get_peft_model as peft_get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import pissa
from conftest import GPT2_TARGETS, LLAMA_TARGETS, make_gpt2, make_llama, peft_lora_modules, rel_err, \
    set_decaying_spectra, token_batch


def base_weights(peft_model) -> dict[str, torch.Tensor]:
    return {k.removeprefix("base_model.model.").replace(".base_layer", ""): v.detach().clone()
            for k, v in peft_model.state_dict().items() if "lora_" not in k}


def split_like_peft(init_lora_weights: str, spectra: bool):
    """pissa.get_peft_model and peft.get_peft_model on copies of one tiny Llama with the same
    config; checks that every module's s B A and residual agree (relative 2e-5) and that pissa's
    model still gives the original logits. Returns pissa's PeftModel."""
    config = dict(r=4, lora_alpha=8, target_modules=list(LLAMA_TARGETS), init_lora_weights=init_lora_weights)
    model = make_llama()
    if spectra:
        set_decaying_spectra(model, LLAMA_TARGETS)
    tokens = token_batch(128)
    with torch.no_grad():
        expected = model(tokens).logits
    ref_model = make_llama()
    ref_model.load_state_dict(model.state_dict())
    ours = pissa.get_peft_model(model, LoraConfig(**config))
    theirs = peft_get_peft_model(ref_model, LoraConfig(**config))
    a_mods, b_mods = peft_lora_modules(ours), peft_lora_modules(theirs)
    assert sorted(a_mods) == sorted(b_mods) and len(a_mods) == 2 * len(LLAMA_TARGETS)
    for name, (A, B, s) in a_mods.items():
        pA, pB, ps = b_mods[name]
        assert s == ps
        assert rel_err(s * B @ A, ps * pB @ pA) < 2e-5, name
    ours_base, theirs_base = base_weights(ours), base_weights(theirs)
    for name in a_mods:
        assert rel_err(ours_base[name + ".weight"], theirs_base[name + ".weight"]) < 2e-5, name
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).logits, expected, atol=2e-5, rtol=1e-4)
    return ours


def test_exact_split_equals_peft():
    ours = split_like_peft("pissa", spectra=True)
    # Saving must not make a later load decompose the residual again.
    assert ours.peft_config["default"].init_lora_weights is True


def test_saved_adapter_loads_on_saved_residual_and_is_reproducible(tmp_path):
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa_niter_4")
    model = make_llama()
    tokens = token_batch(128)
    with torch.no_grad():
        expected = model(tokens).logits
    peft_model = pissa.get_peft_model(model, config, seed=42)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.unload().save_pretrained(tmp_path / "residual")

    residual = AutoModelForCausalLM.from_pretrained(tmp_path / "residual")
    loaded = PeftModel.from_pretrained(residual, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, expected, atol=2e-5, rtol=1e-4)

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert meta["pissa.init_lora_weights"] == "pissa_niter_4" and meta["pissa.seed"] == "42"
    assert meta["pissa.version"] == pissa.__version__ and "module_seed" in meta["pissa.seed_rule"]

    # The same call on the same model gives the same bytes.
    again = pissa.get_peft_model(make_llama(), config, seed=42)
    again.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    other = pissa.get_peft_model(make_llama(), config, seed=43)
    other.save_pretrained(tmp_path / "other")
    assert (tmp_path / "other" / "adapter_model.safetensors").read_bytes() != \
        (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.mark.filterwarnings("ignore:Using Rank-Stabilized LoRA with rank_pattern")
def test_rank_and_alpha_patterns_rslora_and_bfloat16():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}, init_lora_weights="pissa")
    model = make_llama().to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = pissa.get_peft_model(model, config)
    base = base_weights(peft_model)
    for name, (A, B, s) in peft_lora_modules(peft_model).items():
        r = 2 if name.endswith("down_proj") else 4
        alpha = 3 if name.endswith("v_proj") else 8
        assert A.shape[0] == r and s == pytest.approx(alpha / r ** 0.5)
        W = before[name + ".weight"].float()
        W_res = base[name + ".weight"]
        assert W_res.dtype == torch.bfloat16
        # The residual is rounded to bfloat16 once: W_res + s B A == W to bfloat16 precision.
        assert rel_err(W_res.float() + s * B @ A, W) < 1e-2, name


def test_gpt2_conv1d_fan_in_fan_out():
    config = LoraConfig(r=4, lora_alpha=4, target_modules=list(GPT2_TARGETS), fan_in_fan_out=True,
                        init_lora_weights="pissa_niter_2")
    model = make_gpt2()
    set_decaying_spectra(model, GPT2_TARGETS)
    tokens = token_batch(128)
    with torch.no_grad():
        expected = model(tokens).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = pissa.get_peft_model(model, config, seed=1)
    base = base_weights(peft_model)
    for name, (A, B, s) in peft_lora_modules(peft_model).items():
        stored = before[name + ".weight"]  # [in, out]
        assert A.shape == (4, stored.shape[0]) and B.shape == (stored.shape[1], 4)
        torch.testing.assert_close(base[name + ".weight"] + s * (B @ A).T, stored, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(tokens).logits, expected, atol=2e-5, rtol=1e-4)


def test_olora_equals_peft(tmp_path):
    """init_lora_weights="olora": the same s B A and residual as peft's olora_init, per module; the
    original logits at initialisation; the saved adapter names the method."""
    ours = split_like_peft("olora", spectra=False)
    ours.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["pissa.init"] == "olora" and meta["pissa.init_lora_weights"] == "olora" and meta["pissa.niter"] == ""


def test_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="pissa_niter_K"):
        pissa.get_peft_model(make_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="gaussian"))
    with pytest.raises(ValueError, match="pissa_niter_K"):
        pissa.get_peft_model(make_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
