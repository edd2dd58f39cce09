"""`pissa init` output loads with transformers + peft and gives the original model back:
PeftModel.from_pretrained(AutoModel.from_pretrained(OUT), OUT/pissa_init) computes what the
original model computes, for Llama (Linear), GPT-2 (Conv1D, fan_in_fan_out) and all-MiniLM-L6-v2
(BERT), float32 and bfloat16, single-file and sharded checkpoints, rsLoRA and a non-default alpha.
The residual folder keeps the input's files, keys and dtypes, and every non-target tensor as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModel, AutoModelForCausalLM

from conftest import adapter_config, adapter_modules, load_safetensors_dir, rel_err, token_batch

# ||y - y0|| / ||y0|| allowed between the original model's outputs and residual + adapter: float32
# rounding, or one bfloat16 rounding of W_res (2^-9 relative) propagated through 2 layers.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def safetensors_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def check_residual_folder(model_dir: Path, out: Path, targets: tuple[str, ...]) -> None:
    """Same files, keys, dtypes and shapes; tensors of non-target modules unchanged; targets changed."""
    assert safetensors_names(out) == safetensors_names(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        assert json.loads((out / index.name).read_text())["weight_map"] == json.loads(index.read_text())["weight_map"]
    before, after = load_safetensors_dir(model_dir), load_safetensors_dir(out)
    assert sorted(before) == sorted(after)
    changed = 0
    for key, t in before.items():
        u = after[key]
        assert (u.dtype, u.shape) == (t.dtype, t.shape), key
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and module.rsplit(".", 1)[-1] in targets:
            assert not torch.equal(u, t), f"{key}: target weight unchanged"
            changed += 1
        else:
            assert torch.equal(u, t), f"{key}: non-target tensor changed"
    assert changed > 0


def check_adapter_covers(out: Path, targets: tuple[str, ...], rank: int) -> None:
    mods = adapter_modules(out / "pissa_init")
    assert mods and all(name.rsplit(".", 1)[-1] in targets for name in mods)
    for name, (a, b) in mods.items():
        assert a.shape[0] == rank and b.shape[1] == rank, name
    assert adapter_config(out / "pissa_init")["init_lora_weights"] is True


def outputs(model, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=batch)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


def check_identity(auto_cls, model_dir: Path, out: Path, dtype: torch.dtype, vocab: int, config=None) -> float:
    batch = token_batch(vocab)
    original = auto_cls.from_pretrained(model_dir, dtype=dtype).eval()
    y0 = outputs(original, batch)
    base = auto_cls.from_pretrained(out, dtype=dtype).eval()
    # The residual alone is not the original model: the adapter carries the top-r part.
    y_res = outputs(base, batch)
    assert rel_err(y_res, y0) > TOLERANCE[dtype]
    kwargs = {"config": config} if config is not None else {}
    model = PeftModel.from_pretrained(base, out / "pissa_init", **kwargs).eval()
    err = rel_err(outputs(model, batch), y0)
    assert err < TOLERANCE[dtype], f"residual + adapter differ from the original model by {err:.3g}"
    return err


@pytest.mark.parametrize(
    "dtype, shard, extra",
    [
        pytest.param(torch.float32, None, [], id="f32-single-file-niter4"),
        pytest.param(torch.float32, "40KB", ["--exact", "--rslora", "--alpha", "32"], id="f32-sharded-exact-rslora-alpha32"),
        pytest.param(torch.bfloat16, None, ["--alpha", "4"], id="bf16-single-file-alpha4"),
        pytest.param(torch.bfloat16, "40KB", ["--niter", "2", "--rslora"], id="bf16-sharded-niter2-rslora"),
    ],
)
def test_llama_init_loads_as_original(pissa, tiny_llama, tmp_path, dtype, shard, extra):
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    model_dir = tiny_llama(dtype=dtype, max_shard_size=shard)
    if shard:
        assert len(safetensors_names(model_dir)) > 1, "the model was meant to be sharded"
    out = tmp_path / "out"
    pissa.run("init", model_dir, "--out", out, "--rank", 8, "--targets", ",".join(targets), *extra)
    check_residual_folder(model_dir, out, targets)
    check_adapter_covers(out, targets, 8)
    check_identity(AutoModelForCausalLM, model_dir, out, dtype, vocab=128)


@pytest.mark.parametrize(
    "dtype, shard",
    [pytest.param(torch.float32, None, id="f32-single-file"), pytest.param(torch.bfloat16, "40KB", id="bf16-sharded")],
)
def test_gpt2_conv1d_init_loads_as_original(pissa, tiny_gpt2, tmp_path, dtype, shard):
    targets = ("c_attn", "c_proj", "c_fc")
    model_dir = tiny_gpt2(dtype=dtype, max_shard_size=shard)
    out = tmp_path / "out"
    pissa.run("init", model_dir, "--out", out, "--rank", 8, "--targets", ",".join(targets), "--fan-in-fan-out")
    check_residual_folder(model_dir, out, targets)
    check_adapter_covers(out, targets, 8)
    assert adapter_config(out / "pissa_init")["fan_in_fan_out"] is True
    # Conv1D stores [in, out]: A is [r, in], B [out, r] as for Linear.
    weights = load_safetensors_dir(model_dir)
    for name, (a, b) in adapter_modules(out / "pissa_init").items():
        w = weights[name + ".weight"]
        assert (a.shape[1], b.shape[0]) == (w.shape[0], w.shape[1]), name
    check_identity(AutoModelForCausalLM, model_dir, out, dtype, vocab=128)


def test_gpt2_without_fan_in_fan_out_is_not_the_original(pissa, tiny_gpt2, tmp_path):
    """Splitting Conv1D weights as if they were [out, in] gives an adapter of the wrong shape:
    peft refuses to load it, which is why --fan-in-fan-out exists."""
    model_dir = tiny_gpt2()
    out = tmp_path / "out"
    pissa.run("init", model_dir, "--out", out, "--rank", 8, "--targets", "c_fc")
    base = AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(Exception, match="size mismatch|shape"):
        PeftModel.from_pretrained(base, out / "pissa_init")


@pytest.fixture(scope="module")
def minilm_init(pissa, minilm_dir, tmp_path_factory):
    """all-MiniLM-L6-v2 split once for the tests below."""
    targets = ("query", "key", "value", "dense")
    out = tmp_path_factory.mktemp("minilm") / "out"
    summary = pissa.json("init", minilm_dir, "--out", out, "--rank", 8, "--targets", ",".join(targets),
                         "--alpha", "16")
    # 6 layers x (query, key, value, attention.output.dense, intermediate.dense, output.dense) + pooler.dense
    assert len(summary["modules"]) == 6 * 6 + 1
    check_residual_folder(minilm_dir, out, targets)
    check_adapter_covers(out, targets, 8)
    return out


def test_minilm_bert_init_gives_original(minilm_dir, minilm_init):
    """The split of an encoder is right: loaded with task_type None (peft's default), residual +
    adapter compute what all-MiniLM-L6-v2 computes."""
    config = LoraConfig.from_pretrained(minilm_init / "pissa_init")
    config.task_type = None
    check_identity(AutoModel, minilm_dir, minilm_init, torch.float32, vocab=30522, config=config)


def test_minilm_bert_adapter_loads_as_written(minilm_dir, minilm_init):
    check_identity(AutoModel, minilm_dir, minilm_init, torch.float32, vocab=30522)


def test_sharded_input_gives_sharded_output_and_index(pissa, tiny_llama, tmp_path):
    model_dir = tiny_llama(max_shard_size="40KB")
    out = tmp_path / "out"
    pissa.run("init", model_dir, "--out", out, "--rank", 4)
    assert (out / "model.safetensors.index.json").is_file()
    assert (out / "config.json").read_text() == (model_dir / "config.json").read_text()
    base = AutoModelForCausalLM.from_pretrained(out)
    keys = set(base.state_dict())
    assert {k for k in load_safetensors_dir(out)} <= keys
