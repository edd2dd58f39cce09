"""`pissa export-gguf` against llama.cpp's own gguf-py (the `gguf` package): every file is read with
gguf.GGUFReader; keys and the architecture name come from gguf-py's constants, tensor names from its
Hugging Face -> GGUF name map (gguf.get_tensor_name_map(...).get_name(..., try_suffixes=(".weight",))).
Values: the delta llama.cpp adds, scale * B' @ A with scale = adapter.lora.alpha / rank (rank =
lora_b's ne[0]), must equal the adapter's s * B @ A after the row permutation llama.cpp's converter
applies to the base q_proj / k_proj weights of a Llama / Mistral model (LlamaModel.permute in
convert_hf_to_gguf.py, written out below from its definition); s comes from peft where peft can load
the adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import LLAMA_TARGETS, adapter_config, adapter_modules, make_llama, scaling_of

TARGETS = ",".join((*LLAMA_TARGETS, "lm_head"))
HEADS, KV_HEADS = 4, 2

GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}


def make_model(arch: str, seed: int = 0):
    """A tiny random model of the family: hidden 64, 4 heads of 16, 2 key/value heads, 2 layers."""
    if arch == "llama":
        return make_llama(seed=seed)
    torch.manual_seed(seed)
    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, vocab_size=128, max_position_embeddings=128, tie_word_embeddings=False)
    if arch == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        return MistralForCausalLM(MistralConfig(**kwargs)).eval()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**kwargs)).eval()


def save_model(arch: str, path: Path) -> Path:
    make_model(arch).save_pretrained(path)
    return path


def llama_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py, LlamaModel.permute: the q/k row order llama.cpp's rope expects."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_b(arch: str, module: str, b: np.ndarray) -> np.ndarray:
    """B as llama.cpp's converter lays out the base weight's rows (convert_lora_to_gguf.py permutes lora_B only)."""
    if arch == "qwen2":
        return b
    if module.endswith("q_proj"):
        return llama_permute(b, HEADS, HEADS)
    if module.endswith("k_proj"):
        return llama_permute(b, HEADS, KV_HEADS)
    return b


def field(reader: gguf.GGUFReader, key: str):
    f = reader.fields[key]
    return f.contents(), f.types


def file_fields(reader: gguf.GGUFReader) -> dict:
    """Every key/value of the file except the reader's pseudo-fields (GGUF.version, ...)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def tensors_of(reader: gguf.GGUFReader) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in reader.tensors}


def check_file(path: Path, arch: str, modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]], n_blocks: int,
               qtype=gguf.GGMLQuantizationType.F32, tol: float = 1e-6) -> gguf.GGUFReader:
    """Checks an exported file against the adapter's modules (name -> (A, B, s))."""
    reader = gguf.GGUFReader(path)
    assert reader.fields["GGUF.version"].contents() == 3
    assert reader.alignment == 32
    fields = file_fields(reader)
    assert set(fields) == {gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.TYPE, gguf.Keys.General.NAME,
                           gguf.Keys.Adapter.TYPE, gguf.Keys.Adapter.LORA_ALPHA, gguf.Keys.General.ALIGNMENT}
    assert fields[gguf.Keys.General.ARCHITECTURE] == gguf.MODEL_ARCH_NAMES[GGUF_ARCH[arch]]
    assert fields[gguf.Keys.General.TYPE] == gguf.GGUFType.ADAPTER
    assert fields[gguf.Keys.Adapter.TYPE] == "lora"
    assert reader.fields[gguf.Keys.Adapter.LORA_ALPHA].types == [gguf.GGUFValueType.FLOAT32]
    assert reader.fields[gguf.Keys.General.ALIGNMENT].types == [gguf.GGUFValueType.UINT32]
    assert fields[gguf.Keys.General.ALIGNMENT] == 32
    alpha = float(fields[gguf.Keys.Adapter.LORA_ALPHA])

    name_map = gguf.get_tensor_name_map(GGUF_ARCH[arch], n_blocks)
    tensors = tensors_of(reader)
    expected_names = set()
    for module, (a, b, s) in modules.items():
        base = name_map.get_name(module + ".weight", try_suffixes=(".weight",))
        assert base is not None, module
        expected_names |= {base + ".lora_a", base + ".lora_b"}
        ta, tb = tensors[base + ".lora_a"], tensors[base + ".lora_b"]
        assert ta.tensor_type == qtype and tb.tensor_type == qtype
        r, n_in = a.shape
        n_out = b.shape[0]
        # ggml order; llama_adapter_lora_init_impl: W ne [in, out], a ne [in, r], b ne [r, out]
        assert list(ta.shape) == [n_in, r] and list(tb.shape) == [r, n_out]
        a_file = np.asarray(ta.data, dtype=np.float64).reshape(r, n_in)
        b_file = np.asarray(tb.data, dtype=np.float64).reshape(n_out, r)
        scale = alpha / tb.shape[0] if alpha != 0 else 1.0  # llama-graph.cpp build_lora_mm
        got = scale * b_file @ a_file
        want = s * expected_b(arch, module, b.double().numpy()) @ a.double().numpy()
        assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want), module
    assert set(tensors) == expected_names
    return reader


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_pissa_init_then_export(pissa, tmp_path, arch):
    original = save_model(arch, tmp_path / arch)
    res = tmp_path / "residual"
    pissa.run("init", original, "--out", res, "--rank", 4, "--alpha", 8, "--targets", TARGETS)
    adapter = res / "pissa_init"
    out = tmp_path / "adapter.gguf"
    summary = pissa.json("export-gguf", adapter, "--arch", arch, "--out", out)
    assert set(summary) == {"command", "out", "architecture", "dtype", "alpha", "folded", "base", "bytes", "modules",
                            "skipped"}
    assert all(set(m) == {"name", "tensor", "rank", "scaling", "fold", "qk_heads"} for m in summary["modules"])
    assert summary["bytes"] == out.stat().st_size and summary["skipped"] == []
    assert summary["architecture"] == ("qwen2" if arch == "qwen2" else "llama")
    assert summary["alpha"] == 8 and summary["folded"] is False
    assert Path(summary["base"]).resolve() == original.resolve()  # from base_model_name_or_path
    config = adapter_config(adapter)
    modules = {name: (a, b, scaling_of(config)) for name, (a, b) in adapter_modules(adapter).items()}
    assert len(modules) == 2 * 7 + 1
    reader = check_file(out, arch, modules, n_blocks=2)
    assert file_fields(reader)[gguf.Keys.General.NAME] == "pissa_init"
    # B is written as it is, apart from the q/k row permutation of llama and mistral
    tensors = tensors_of(reader)
    b = modules["model.layers.1.mlp.down_proj"][1].numpy()
    assert np.array_equal(np.asarray(tensors["blk.1.ffn_down.weight.lora_b"].data), b)
    b_q = modules["model.layers.0.self_attn.q_proj"][1].numpy()
    assert np.array_equal(np.asarray(tensors["blk.0.attn_q.weight.lora_b"].data), expected_b(arch, "q_proj", b_q))
    if arch != "qwen2":
        assert not np.array_equal(expected_b(arch, "q_proj", b_q), b_q)


def peft_lora(tmp_path: Path, **config) -> tuple[Path, Path, dict]:
    """A trained-looking peft LoRA (random A and B) on a tiny Llama, saved with peft; returns the
    base folder, the adapter folder and peft's modules (name -> (A, B, scaling))."""
    from peft import LoraConfig, get_peft_model

    from conftest import peft_lora_modules

    base = save_model("llama", tmp_path / "base")
    model = make_model("llama")
    peft_model = get_peft_model(model, LoraConfig(target_modules=list(LLAMA_TARGETS), **config))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    adapter = tmp_path / "lora"
    peft_model.save_pretrained(adapter)
    return base, adapter, peft_lora_modules(peft_model)


@pytest.mark.parametrize(
    "config, alpha, folded",
    [
        pytest.param(dict(r=4, lora_alpha=8, rank_pattern={"v_proj": 2}), 8, False, id="rank_pattern"),
        pytest.param(dict(r=4, lora_alpha=8, alpha_pattern={"o_proj": 32}), 8, True, id="alpha_pattern"),
        pytest.param(dict(r=4, lora_alpha=8, use_rslora=True), 16, False, id="rslora"),
        pytest.param(dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"down_proj": 9}), 16, True,
                     id="rslora-rank_pattern"),
    ],
)
def test_per_module_scaling_against_peft(pissa, tmp_path, config, alpha, folded):
    base, adapter, modules = peft_lora(tmp_path, **config)
    out = tmp_path / "lora.gguf"
    summary = pissa.json("export-gguf", adapter, "--arch", "llama", "--base", base, "--out", out)
    assert summary["alpha"] == pytest.approx(alpha) and summary["folded"] is folded
    reader = check_file(out, "llama", modules, n_blocks=2)
    assert reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents() == pytest.approx(alpha, rel=1e-6)
    # Unfolded modules keep B bit for bit (up to the q/k permutation)
    tensors = tensors_of(reader)
    for m in summary["modules"]:
        if m["fold"] == 1:
            b = modules[m["name"]][1].numpy()
            assert np.array_equal(np.asarray(tensors[m["tensor"] + ".weight.lora_b"].data),
                                  expected_b("llama", m["name"], b))


def test_f16(pissa, tmp_path):
    base, adapter, modules = peft_lora(tmp_path, r=4, lora_alpha=8, alpha_pattern={"o_proj": 32})
    pissa.run("export-gguf", adapter, "--arch", "llama", "--base", base, "--out", tmp_path / "f32.gguf")
    pissa.run("export-gguf", adapter, "--arch", "llama", "--base", base, "--out", tmp_path / "f16.gguf",
              "--dtype", "f16")
    check_file(tmp_path / "f16.gguf", "llama", modules, n_blocks=2, qtype=gguf.GGMLQuantizationType.F16, tol=2e-3)
    f32 = tensors_of(gguf.GGUFReader(tmp_path / "f32.gguf"))
    f16 = tensors_of(gguf.GGUFReader(tmp_path / "f16.gguf"))
    assert f32.keys() == f16.keys()
    for name, t in f16.items():
        assert t.data.dtype == np.float16
        assert np.array_equal(t.data, np.asarray(f32[name].data).astype(np.float16)), name


def assert_refused(pissa, out: Path, *args, message: str) -> None:
    before = sorted(p.name for p in out.parent.iterdir())
    proc = pissa.run("export-gguf", *args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == before  # nothing written, no temporary file


def test_refusals(pissa, tiny_gpt2, tmp_path):
    base, adapter, _ = peft_lora(tmp_path, r=4, lora_alpha=8)
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "a.gguf"
    assert_refused(pissa, out, tmp_path / "missing", "--arch", "llama", "--out", out,
                   message="not an adapter folder")
    assert_refused(pissa, out, adapter, "--arch", "gpt2", "--out", out, message="'gpt2' is not supported")
    assert_refused(pissa, out, adapter, "--arch", "llama", "--out", out, "--dtype", "bf16", message="--dtype")
    assert_refused(pissa, out, adapter, "--arch", "llama", "--out", out, "--base", tmp_path / "nowhere",
                   message="not a model folder with a config.json")
    # q_proj / k_proj of a Llama need the head counts: base_model_name_or_path is not a local folder
    assert_refused(pissa, out, adapter, "--arch", "llama", "--out", out, message="--base MODEL_DIR")
    # the base config says another family
    assert_refused(pissa, out, adapter, "--arch", "qwen2", "--base", base, "--out", out,
                   message="model_type 'llama', not 'qwen2'")
    # a malformed adapter
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    (broken / "adapter_config.json").write_text("{not json")
    assert_refused(pissa, out, broken, "--arch", "llama", "--base", base, "--out", out,
                   message="adapter_config.json")
    # a module of the file that target_modules does not select is skipped, as peft skips it
    extra = tmp_path / "extra"
    shutil.copytree(adapter, extra)
    weights = load_file(extra / "adapter_model.safetensors")
    weights.update({k.replace("self_attn.v_proj", "self_attn.qkv_proj"): v.clone() for k, v in weights.items()
                    if "self_attn.v_proj" in k})
    save_file(weights, extra / "adapter_model.safetensors")
    proc = pissa.run("export-gguf", extra, "--arch", "llama", "--base", base, "--out", outdir / "extra.gguf", "--json",
                     check=True)
    assert json.loads(proc.stdout)["skipped"] == ["model.layers.0.self_attn.qkv_proj",
                                                  "model.layers.1.self_attn.qkv_proj"]
    assert "not selected by target_modules" in proc.stderr
    assert not any("qkv" in t.name for t in gguf.GGUFReader(outdir / "extra.gguf").tensors)
    (outdir / "extra.gguf").unlink()
    # a module with no GGUF name
    renamed = tmp_path / "renamed"
    shutil.copytree(adapter, renamed)
    weights = load_file(renamed / "adapter_model.safetensors")
    save_file({k.replace("self_attn.v_proj", "self_attn.qkv_proj"): v for k, v in weights.items()},
              renamed / "adapter_model.safetensors")
    config = json.loads((renamed / "adapter_config.json").read_text())
    config["target_modules"] = [*config["target_modules"], "qkv_proj"]
    (renamed / "adapter_config.json").write_text(json.dumps(config))
    assert_refused(pissa, out, renamed, "--arch", "llama", "--base", base, "--out", out,
                   message="module 'model.layers.0.self_attn.qkv_proj' has no GGUF tensor name")
    # GPT-2 Conv1D (fan_in_fan_out)
    res = tmp_path / "gpt2-residual"
    pissa.run("init", tiny_gpt2(), "--out", res, "--rank", 4, "--targets", "c_attn", "--fan-in-fan-out")
    assert_refused(pissa, out, res / "pissa_init", "--arch", "llama", "--out", out, message="fan_in_fan_out")
    # an existing output is kept without --force, replaced with it
    out.write_bytes(b"keep")
    assert_refused(pissa, out, adapter, "--arch", "llama", "--base", base, "--out", out,
                   message="already exists; pass --force")
    assert out.read_bytes() == b"keep"
    pissa.run("export-gguf", adapter, "--arch", "llama", "--base", base, "--out", out, "--force")
    assert gguf.GGUFReader(out).fields[gguf.Keys.General.TYPE].contents() == "adapter"
    assert sorted(p.name for p in outdir.iterdir()) == ["a.gguf"]
