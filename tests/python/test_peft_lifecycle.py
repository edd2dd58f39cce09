"""The PiSSA lifecycle with peft as the trainer and the oracle:
`pissa init` -> a few optimizer steps of peft on random tokens -> save the trained adapter; then
- `pissa convert` gives a rank-2r LoRA that, loaded by peft on the ORIGINAL model, computes what the
  trained model computes, and equals peft's own conversion
  (save_pretrained(..., path_initial_model_for_weight_conversion=...)) module by module (products
  s' B' A') and in adapter_config.json's r and lora_alpha;
- `pissa merge RESIDUAL TRAINED` equals peft's merge_and_unload(), and `pissa merge ORIGINAL CONVERTED`
  gives the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from conftest import (GPT2_TARGETS, adapter_config, adapter_modules, load_safetensors_dir, rel_err, scaling_of,
                      token_batch)

STEPS, LR = 4, 1e-2


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch).logits.float()


def train(model, vocab: int) -> None:
    """A few AdamW steps of next-token loss on random tokens: enough to move A and B well away from init."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=LR)
    for step in range(STEPS):
        batch = token_batch(vocab, batch=4, length=16, seed=100 + step)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize(
    "kind, extra",
    [
        pytest.param("llama", ["--alpha", "16"], id="llama-alpha16"),
        pytest.param("llama", ["--alpha", "8", "--rslora", "--exact"], id="llama-rslora-exact"),
        pytest.param("gpt2", ["--fan-in-fan-out"], id="gpt2-conv1d"),
    ],
)
def test_train_convert_merge_against_peft(pissa, tiny_llama, tiny_gpt2, tmp_path, kind, extra):
    vocab = 128
    if kind == "llama":
        original_dir, targets = tiny_llama(), "q_proj,v_proj,down_proj"
    else:
        original_dir, targets = tiny_gpt2(), ",".join(GPT2_TARGETS)
    res = tmp_path / "residual"
    pissa.run("init", original_dir, "--out", res, "--rank", 4, "--targets", targets, *extra)

    torch.manual_seed(0)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(res), res / "pissa_init",
                                      is_trainable=True)
    train(model, vocab)
    batch = token_batch(vocab, seed=99)
    y_trained = logits(model, batch)
    trained, peft_converted = tmp_path / "trained", tmp_path / "peft_converted"
    model.save_pretrained(trained)
    model.save_pretrained(peft_converted, path_initial_model_for_weight_conversion=str(res / "pissa_init"))

    # The adapter did move: the trained model is not the original one.
    original = AutoModelForCausalLM.from_pretrained(original_dir).eval()
    y_original = logits(original, batch)
    assert rel_err(y_trained, y_original) > 1e-3

    # pissa convert: applies to the original model.
    converted = tmp_path / "converted"
    pissa.run("convert", "--initial", res / "pissa_init", "--trained", trained, "--out", converted)
    on_original = PeftModel.from_pretrained(original, converted).eval()
    err = rel_err(logits(on_original, batch), y_trained)
    assert err < 1e-4, f"converted adapter on the original model differs from the trained model by {err:.3g}"

    # ... and equals peft's conversion: config fields and each module's product.
    ours_cfg, peft_cfg = adapter_config(converted), adapter_config(peft_converted)
    for field in ("r", "lora_alpha", "use_rslora", "fan_in_fan_out", "init_lora_weights", "target_modules"):
        ours_v, peft_v = ours_cfg[field], peft_cfg[field]
        if field == "target_modules":
            ours_v, peft_v = sorted(ours_v), sorted(peft_v)
        if field == "lora_alpha":
            assert ours_v == pytest.approx(peft_v, rel=1e-12)
        else:
            assert ours_v == peft_v, field
    skip = {"base_model_name_or_path", "revision", "peft_version"}
    ours_full = {k: v for k, v in LoraConfig.from_pretrained(converted).to_dict().items() if k not in skip}
    peft_full = {k: v for k, v in LoraConfig.from_pretrained(peft_converted).to_dict().items() if k not in skip}
    assert ours_full == peft_full, {k: (ours_full.get(k), peft_full.get(k)) for k in set(ours_full) | set(peft_full)
                                    if ours_full.get(k) != peft_full.get(k)}
    # Both name the original model, the one the converted LoRA applies to.
    assert Path(ours_cfg["base_model_name_or_path"]).resolve() == Path(peft_cfg["base_model_name_or_path"]).resolve()
    ours_mods, peft_mods = adapter_modules(converted), adapter_modules(peft_converted)
    assert sorted(ours_mods) == sorted(peft_mods)
    s_ours, s_peft = scaling_of(ours_cfg), scaling_of(peft_cfg)
    for name, (a, b) in ours_mods.items():
        pa, pb = peft_mods[name]
        assert a.shape == pa.shape and b.shape == pb.shape, name
        assert rel_err(s_ours * b @ a, s_peft * pb @ pa) < 1e-6, name

    # pissa merge RESIDUAL TRAINED against peft's merge_and_unload().
    merged = tmp_path / "merged"
    pissa.run("merge", res, trained, "--out", merged)
    peft_merged = {k: v for k, v in model.merge_and_unload().state_dict().items()}
    ours_merged = load_safetensors_dir(merged)
    adapted = {name + ".weight" for name in ours_mods}
    for key, t in ours_merged.items():
        if key in adapted:
            assert rel_err(t, peft_merged[key]) < 1e-6, key
        else:
            assert torch.equal(t, load_safetensors_dir(res)[key]), key

    # pissa merge ORIGINAL CONVERTED: the same fine-tuned weights from the other side.
    merged_from_original = tmp_path / "merged_from_original"
    pissa.run("merge", original_dir, converted, "--out", merged_from_original)
    other = load_safetensors_dir(merged_from_original)
    for key in adapted:
        assert rel_err(other[key], ours_merged[key]) < 1e-5, key
    y_merged = logits(AutoModelForCausalLM.from_pretrained(merged).eval(), batch)
    assert rel_err(y_merged, y_trained) < 1e-4


def test_merge_bfloat16_against_peft(pissa, tiny_llama, tmp_path):
    """bfloat16: `pissa merge` computes W + s B A in float32 and rounds once; it is within a
    bfloat16 rounding of peft's merge_and_unload() (peft also sums in float32: equal here) and at
    least as close to the exact sum."""
    original_dir = tiny_llama(dtype=torch.bfloat16)
    res = tmp_path / "residual"
    pissa.run("init", original_dir, "--out", res, "--rank", 4, "--targets", "q_proj,up_proj")
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(res, dtype=torch.bfloat16),
                                      res / "pissa_init", is_trainable=True)
    with torch.no_grad():  # a stand-in for training: move every A and B
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * p.abs().mean() * torch.randn_like(p))
    trained = tmp_path / "trained"
    model.save_pretrained(trained)
    merged = tmp_path / "merged"
    pissa.run("merge", res, trained, "--out", merged)
    ours = load_safetensors_dir(merged)
    residual = load_safetensors_dir(res)
    s = scaling_of(adapter_config(trained))
    peft_merged = model.merge_and_unload().state_dict()
    for name, (a, b) in adapter_modules(trained).items():
        key = name + ".weight"
        exact = residual[key].double() + s * b.double() @ a.double()
        assert ours[key].dtype == torch.bfloat16
        assert rel_err(ours[key], peft_merged[key]) < 1e-3, key
        assert rel_err(ours[key], exact) <= rel_err(peft_merged[key], exact) * 1.001 + 1e-7, key
