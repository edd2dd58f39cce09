"""adapter_config.json as peft writes it. The reference for `pissa init` is the PiSSA workflow in
peft: get_peft_model(model, LoraConfig(..., init_lora_weights="pissa...")), then init_lora_weights
set to True and save_pretrained (so loading the adapter on the residual model does not split again).

Ours is loaded with LoraConfig.from_pretrained and compared field by field with peft's own config
for the same settings (peft fills the fields ours leaves out with its defaults); every field ours
writes is one peft writes, with peft's value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModel, AutoModelForCausalLM

# Fields that name where or by what the adapter was written, not what it is.
PROVENANCE = {"base_model_name_or_path", "revision", "peft_version"}
# List fields peft holds as sets.
UNORDERED = ("target_modules", "exclude_modules")


def peft_reference_config(model_dir, out_dir, auto_cls=AutoModelForCausalLM, **lora_kwargs):
    model = auto_cls.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(out_dir)
    return out_dir


def normalised(config: LoraConfig) -> dict:
    d = {k: v for k, v in config.to_dict().items() if k not in PROVENANCE}
    for key in UNORDERED:  # peft keeps these as sets and saves them in set order
        if isinstance(d.get(key), (set, list, tuple)):
            d[key] = sorted(d[key])
    return d


def compare_configs(ours_dir, peft_dir, ignore=()):
    ours = {k: v for k, v in normalised(LoraConfig.from_pretrained(ours_dir)).items() if k not in ignore}
    theirs = {k: v for k, v in normalised(LoraConfig.from_pretrained(peft_dir)).items() if k not in ignore}
    differ = {k: (ours.get(k), theirs.get(k)) for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)}
    assert not differ, f"LoraConfig fields (ours, peft): {differ}"
    # Both name the model the adapter was split from (the original, not the residual folder).
    assert (Path(LoraConfig.from_pretrained(ours_dir).base_model_name_or_path).resolve()
            == Path(LoraConfig.from_pretrained(peft_dir).base_model_name_or_path).resolve())
    raw_ours = json.loads((ours_dir / "adapter_config.json").read_text())
    raw_peft = json.loads((peft_dir / "adapter_config.json").read_text())
    assert set(raw_ours) <= set(raw_peft), f"fields peft does not write: {set(raw_ours) - set(raw_peft)}"
    for k, v in raw_ours.items():
        if k in PROVENANCE or k in ignore:
            continue
        pv = raw_peft[k]
        if k in UNORDERED and isinstance(v, list):
            v, pv = sorted(v), sorted(pv)
        assert v == pv, f"{k}: ours {v!r}, peft {pv!r}"


@pytest.mark.parametrize(
    "kind, args, lora_kwargs",
    [
        pytest.param("llama", ["--rank", "8"],
                     dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa_niter_4"),
                     id="llama-defaults"),
        pytest.param("llama", ["--rank", "4", "--alpha", "16", "--rslora", "--exact", "--targets", "q_proj,o_proj,up_proj"],
                     dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "o_proj", "up_proj"],
                          init_lora_weights="pissa"),
                     id="llama-rslora-alpha16"),
        pytest.param("llama", ["--rank", "4", "--alpha", "2.5", "--targets", "k_proj"],
                     dict(r=4, lora_alpha=2.5, target_modules=["k_proj"], init_lora_weights="pissa_niter_4"),
                     id="llama-fractional-alpha"),
        pytest.param("gpt2", ["--rank", "4", "--fan-in-fan-out", "--targets", "c_attn,c_proj"],
                     dict(r=4, lora_alpha=4, fan_in_fan_out=True, target_modules=["c_attn", "c_proj"],
                          init_lora_weights="pissa_niter_4"),
                     id="gpt2-fan-in-fan-out"),
    ],
)
def test_init_config_matches_peft(pissa, tiny_llama, tiny_gpt2, tmp_path, kind, args, lora_kwargs):
    model_dir = tiny_llama() if kind == "llama" else tiny_gpt2()
    out = tmp_path / "ours"
    pissa.run("init", model_dir, "--out", out, *args)
    reference = peft_reference_config(model_dir, tmp_path / "peft", task_type="CAUSAL_LM", **lora_kwargs)
    compare_configs(out / "pissa_init", reference)


def test_target_regex_selects_what_peft_selects(pissa, tiny_llama, tmp_path):
    """--target-regex is written as target_modules: a string, which peft full-matches against module
    names; the adapter's modules are the ones peft's own LoraConfig picks with that regex."""
    model_dir = tiny_llama()
    regex = r".*\.layers\.1\..*_proj"
    out = tmp_path / "ours"
    pissa.run("init", model_dir, "--out", out, "--rank", 4, "--target-regex", regex)
    assert json.loads((out / "pissa_init" / "adapter_config.json").read_text())["target_modules"] == regex
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "pissa_init")
    peft_own = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                              LoraConfig(r=4, target_modules=regex, init_lora_weights=False))

    def adapted(m):
        return sorted(n.removeprefix("base_model.model.") for n, mod in m.named_modules() if isinstance(mod, LoraLayer))

    assert adapted(loaded) == adapted(peft_own)
    assert len(adapted(loaded)) == 7  # layer 1's q, k, v, o, gate, up, down


def test_encoder_config_matches_peft(pissa, minilm_dir, tmp_path):
    """all-MiniLM-L6-v2 (BertModel), peft's default task_type. auto_mapping, which peft adds for a
    null task_type (AutoPeftModel uses it to find the base class), is left out of the comparison."""
    out = tmp_path / "ours"
    pissa.run("init", minilm_dir, "--out", out, "--rank", 4, "--targets", "query,value")
    reference = peft_reference_config(minilm_dir, tmp_path / "peft", auto_cls=AutoModel, r=4, lora_alpha=4,
                                      target_modules=["query", "value"], init_lora_weights="pissa_niter_4")
    compare_configs(out / "pissa_init", reference, ignore={"auto_mapping"})


def test_adapter_weights_file_matches_peft_layout(pissa, tiny_llama, tmp_path):
    """adapter_model.safetensors: the same keys, shapes and dtype (float32) as peft's for the same model."""
    from conftest import load_safetensors_dir

    model_dir = tiny_llama()
    out = tmp_path / "ours"
    pissa.run("init", model_dir, "--out", out, "--rank", 4, "--targets", "q_proj,down_proj")
    reference = peft_reference_config(model_dir, tmp_path / "peft", task_type="CAUSAL_LM", r=4, lora_alpha=4,
                                      target_modules=["q_proj", "down_proj"], init_lora_weights="pissa_niter_4")
    ours = load_safetensors_dir(out / "pissa_init" / "adapter_model.safetensors")
    theirs = load_safetensors_dir(reference / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert (ours[k].shape, ours[k].dtype) == (theirs[k].shape, theirs[k].dtype) == (ours[k].shape, torch.float32), k


def test_embedding_target_refused_as_peft_does_not_split_it(pissa, tiny_llama, tmp_path):
    """peft applies PiSSA to Linear layers only: an nn.Embedding target keeps LoRA's init (a zero
    product, lora_embedding_A = 0) and its base weight unchanged. pissa refuses the target instead of
    writing an adapter that would load as something else."""
    model_dir = tiny_llama()
    proc = pissa.run("init", model_dir, "--out", tmp_path / "ours", "--targets", "embed_tokens,q_proj", check=False)
    assert proc.returncode != 0 and "embedding" in proc.stderr
    assert not (tmp_path / "ours").exists()
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    before = base.model.embed_tokens.weight.detach().clone()
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights="pissa"))
    layer = peft_model.base_model.model.model.embed_tokens
    assert torch.equal(layer.base_layer.weight, before)
    delta = layer.lora_embedding_B["default"] @ layer.lora_embedding_A["default"]
    assert torch.count_nonzero(delta) == 0
