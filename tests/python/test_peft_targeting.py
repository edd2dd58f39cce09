"""peft's module selection at `pissa init`: "all-linear", exclude_modules, layers_to_transform /
layers_pattern, rank_pattern / alpha_pattern. peft is the oracle twice: its own get_peft_model with
the same LoraConfig must write the same adapter_config.json (target lists compared as sets, as peft
saves them from a set) and adapt the same modules with the same ranks and scalings; and our adapter,
loaded by peft on our residual model, must reproduce the original model's weights."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM,
                          AutoModelForSequenceClassification)

from conftest import load_safetensors_dir, rel_err
from test_peft_config import compare_configs, peft_reference_config


def adapted(peft_model) -> dict[str, tuple[int, float]]:
    """module name -> (rank, scaling) of every LoRA layer of a peft model."""
    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            out[name.removeprefix("base_model.model.")] = (module.r["default"], float(module.scaling["default"]))
    return out


def save_tiny(model, path):
    model.save_pretrained(path)
    return path


def tiny_qwen2(path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    return save_tiny(Qwen2ForCausalLM(config).eval(), path)


def tiny_bert_classifier(path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                        vocab_size=100, max_position_embeddings=64, num_labels=3)
    return save_tiny(BertForSequenceClassification(config).eval(), path)


def tiny_t5(path):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, vocab_size=100,
                      decoder_start_token_id=0)
    return save_tiny(T5ForConditionalGeneration(config).eval(), path)


def tiny_opt(path):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4, vocab_size=100,
                       max_position_embeddings=64, word_embed_proj_dim=32)
    return save_tiny(OPTForCausalLM(config).eval(), path)


@pytest.mark.parametrize("kind", ["llama", "llama-3-layers", "gpt2", "qwen2", "bert-seq-cls", "minilm", "t5", "opt"])
def test_all_linear_matches_peft(pissa, tiny_llama, tiny_gpt2, minilm_dir, tmp_path, kind):
    """--targets all-linear adapts exactly peft's all-linear modules (no output layer, no
    classification head, no embedding) and writes peft's target list: the full names below 20
    modules, peft's condensed suffixes from 20 on (Llama with 3 layers: 21; MiniLM: 37)."""
    auto, task, extra = AutoModelForCausalLM, "CAUSAL_LM", []
    if kind == "llama":
        model_dir = tiny_llama()
    elif kind == "llama-3-layers":
        model_dir = tiny_llama(layers=3)
    elif kind == "gpt2":
        model_dir, extra = tiny_gpt2(), ["--fan-in-fan-out"]
    elif kind == "qwen2":
        model_dir = tiny_qwen2(tmp_path / "qwen2")
    elif kind == "bert-seq-cls":
        model_dir, auto, task = tiny_bert_classifier(tmp_path / "bert"), AutoModelForSequenceClassification, "SEQ_CLS"
    elif kind == "minilm":
        model_dir, auto, task = minilm_dir, AutoModel, None
    elif kind == "t5":
        model_dir, auto, task = tiny_t5(tmp_path / "t5"), AutoModelForSeq2SeqLM, "SEQ_2_SEQ_LM"
    else:
        model_dir = tiny_opt(tmp_path / "opt")
    out = tmp_path / "ours"
    summary = pissa.json("init", model_dir, "--out", out, "--rank", 2, "--targets", "all-linear", *extra)
    lora = dict(r=2, lora_alpha=2, target_modules="all-linear", init_lora_weights="pissa_niter_4",
                fan_in_fan_out=bool(extra))
    reference = peft_reference_config(model_dir, tmp_path / "peft", auto_cls=auto, task_type=task, **lora)
    # peft's SEQ_CLS wrapper adds its heads to modules_to_save, in its own config and again whenever
    # it loads an adapter; the split does not depend on it.
    # auto_mapping: what peft adds for a null task_type (AutoPeftModel's base class).
    ignore = {"modules_to_save"} if task == "SEQ_CLS" else {"auto_mapping"} if task is None else set()
    compare_configs(out / "pissa_init", reference, ignore=ignore)
    theirs = adapted(get_peft_model(auto.from_pretrained(model_dir), LoraConfig(task_type=task, **lora)))
    assert sorted(m["name"] for m in summary["modules"]) == sorted(theirs)
    written = json.loads((out / "pissa_init" / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(written, list) and "all-linear" not in written
    if len(theirs) >= 20:
        assert len(written) < len(theirs), "peft condenses 20 or more targets to suffixes"


SELECTIONS = [
    pytest.param(["--targets", "q_proj,v_proj,down_proj", "--exclude", "model.layers.1.self_attn.q_proj"],
                 dict(target_modules=["q_proj", "v_proj", "down_proj"],
                      exclude_modules=["model.layers.1.self_attn.q_proj"]),
                 id="exclude-list"),
    pytest.param(["--targets", "all-linear", "--exclude-regex", r".*\.mlp\..*"],
                 dict(target_modules="all-linear", exclude_modules=r".*\.mlp\..*"),
                 id="all-linear-exclude-regex"),
    pytest.param(["--targets", "q_proj,k_proj,up_proj", "--layers", "0,2"],
                 dict(target_modules=["q_proj", "k_proj", "up_proj"], layers_to_transform=[0, 2]),
                 id="layers"),
    pytest.param(["--targets", "q_proj,model.layers.1.self_attn.v_proj", "--layers", "2", "--layers-pattern", "layers"],
                 dict(target_modules=["q_proj", "model.layers.1.self_attn.v_proj"], layers_to_transform=[2],
                      layers_pattern="layers"),
                 id="layers-pattern-full-name-kept"),
    pytest.param(["--targets", "q_proj,v_proj,o_proj,down_proj", "--rank-pattern", r"v_proj=2,layers\.0\.self_attn\.o_proj=6",
                  "--alpha-pattern", "down_proj=16,o_proj=3"],
                 dict(target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                      rank_pattern={"v_proj": 2, r"layers\.0\.self_attn\.o_proj": 6},
                      alpha_pattern={"down_proj": 16, "o_proj": 3}),
                 id="rank-alpha-patterns"),
    pytest.param(["--targets", "q_proj,v_proj", "--rslora", "--alpha", "8", "--rank-pattern", "v_proj=2"],
                 dict(target_modules=["q_proj", "v_proj"], use_rslora=True, lora_alpha=8, rank_pattern={"v_proj": 2}),
                 id="rslora-rank-pattern"),
]


@pytest.mark.parametrize("args, lora_kwargs", SELECTIONS)
def test_selection_matches_peft(pissa, tiny_llama, tmp_path, args, lora_kwargs):
    """The same config as peft's own, the same modules with the same ranks and scalings, and the
    adapter reproduces the original weights on the residual model (per-module s B A)."""
    model_dir = tiny_llama(layers=3, spectra=True)
    out = tmp_path / "ours"
    args = list(args)
    if "--alpha" not in args:
        args += ["--alpha", "4"]
    pissa.run("init", model_dir, "--out", out, "--rank", 4, *args)
    lora = dict(r=4, lora_alpha=4, init_lora_weights="pissa_niter_4")
    lora.update(lora_kwargs)
    reference = peft_reference_config(model_dir, tmp_path / "peft", task_type="CAUSAL_LM", **lora)
    compare_configs(out / "pissa_init", reference)

    theirs = adapted(get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                    LoraConfig(task_type="CAUSAL_LM", **lora)))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "pissa_init")
    ours = adapted(loaded)
    assert ours.keys() == theirs.keys()
    for name, (r, s) in theirs.items():
        assert ours[name][0] == r, name
        assert ours[name][1] == pytest.approx(s, rel=1e-6), name
    assert len(set(r for r, _ in theirs.values())) >= 1
    merged = loaded.merge_and_unload().state_dict()
    original = load_safetensors_dir(model_dir)
    for name in theirs:
        key = name + ".weight"
        assert rel_err(merged[key], original[key]) < 1e-5, key


def test_python_package_selection_matches_the_tool(pissa, tiny_llama, tmp_path):
    """pissa.init_checkpoint takes the same selection arguments (peft's field names and forms) and
    writes the same bytes as the tool."""
    import pissa as pkg

    model_dir = tiny_llama(layers=3)
    pissa.run("init", model_dir, "--out", tmp_path / "tool", "--rank", 4, "--targets", "q_proj,v_proj,up_proj",
              "--exclude-regex", r".*\.1\..*", "--layers", "0,1,2", "--rank-pattern", "v_proj=2",
              "--alpha-pattern", "up_proj=8")
    report = pkg.init_checkpoint(model_dir, tmp_path / "package", rank=4, target_modules=["q_proj", "v_proj", "up_proj"],
                                 exclude_modules=r".*\.1\..*", layers_to_transform=[0, 1, 2],
                                 rank_pattern={"v_proj": 2}, alpha_pattern={"up_proj": 8})
    assert sorted(m.name for m in report.modules) == sorted(
        f"model.layers.{i}.{m}" for i in (0, 2) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj"))
    assert {m.name: m.rank for m in report.modules}["model.layers.0.self_attn.v_proj"] == 2
    for f in ("pissa_init/adapter_model.safetensors", "model.safetensors"):
        assert (tmp_path / "tool" / f).read_bytes() == (tmp_path / "package" / f).read_bytes(), f
    tool_config = json.loads((tmp_path / "tool" / "pissa_init" / "adapter_config.json").read_text())
    package_config = json.loads((tmp_path / "package" / "pissa_init" / "adapter_config.json").read_text())
    assert tool_config == package_config
    linear = pkg.init_checkpoint(model_dir, tmp_path / "all", rank=2, target_modules="all-linear")
    assert len(linear.modules) == 21


@pytest.mark.parametrize("args, message", [
    (["--targets", "all-linear", "--layers", "0"], "string target_modules"),
    (["--target-regex", ".*q_proj", "--layers", "0"], "string target_modules"),
    (["--layers-pattern", "layers"], "needs --layers"),
    (["--targets", "q_proj", "--exclude", "q_proj"], "match no 2-D float weight"),
    (["--targets", "q_proj", "--layers", "7"], "match no 2-D float weight"),
    (["--rank-pattern", "v_proj=1000"], "larger than min(out, in)"),
    (["--rank-pattern", "v_proj"], "is not KEY=VALUE"),
    (["--alpha-pattern", "v_proj=-1"], "is not a number > 0"),
    (["--layers", "a"], "is not a layer number"),
    (["--rank-pattern", "v_proj=0"], "is not an integer in [1, 1048576]"),
    (["--exclude-regex", "(q"], "--exclude-regex is not a valid regular expression"),
    (["--layers", "0", "--layers-pattern", "la[yers"], "--layers-pattern is not a valid regular expression"),
    (["--exclude", "x", "--exclude-regex", "y"], "exclude each other"),
])
def test_selection_refusals(pissa, tiny_llama, tmp_path, args, message):
    """Selections peft refuses, or that select nothing, exit 2 with a message and write nothing."""
    out = tmp_path / "ours"
    proc = pissa.run("init", tiny_llama(), "--out", out, *args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".ours*"))
