"""PiSSA's siblings that need only the weight, at `pissa init`: OLoRA (`--init olora`) against peft's
own init_lora_weights="olora" on the same model, and MiLoRA (`--components minor`) against the
minor singular subspace torch.linalg.svd finds. Products (s B A, W_res) are compared, not factors:
a QR's or an SVD's signs are a convention."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import LLAMA_TARGETS, adapter_modules, load_safetensors_dir, peft_lora_modules, rel_err


def metadata(adapter_dir):
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        return f.metadata()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_olora_matches_peft(pissa, tiny_llama, tmp_path, dtype):
    """The same s B A and the same residual as peft's olora_init, module by module; the adapter
    names the method and reproduces the original weights on the residual model."""
    model_dir = tiny_llama(dtype=dtype, spectra=True)
    out = tmp_path / "ours"
    targets = ",".join(LLAMA_TARGETS)
    summary = pissa.json("init", model_dir, "--out", out, "--rank", 4, "--alpha", 8, "--init", "olora",
                         "--targets", targets)
    assert summary["init"] == "olora" and summary["method"] == "qr" and summary["niter"] is None
    meta = metadata(out / "pissa_init")
    assert meta["pissa.init"] == "olora" and meta["pissa.init_lora_weights"] == "olora"

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
                                LoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA_TARGETS),
                                           init_lora_weights="olora"))
    theirs = peft_lora_modules(peft_model)
    ours = adapter_modules(out / "pissa_init")
    assert ours.keys() == theirs.keys()
    residual = load_safetensors_dir(out)
    peft_base = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v
                 for k, v in peft_model.state_dict().items() if ".base_layer." in k}
    # peft rounds a bfloat16 model's A and B to bfloat16 (docs/peft-compatibility.md); pissa keeps float32.
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, (A, B) in ours.items():
        A0, B0, s = theirs[name]
        assert s == pytest.approx(2.0)
        assert rel_err(s * B @ A, s * B0 @ A0) < tol, name
        # Orthonormal B (the Q factor), upper-triangular A with a non-negative diagonal (our convention).
        assert rel_err(B.T @ B, torch.eye(4)) < 1e-5, name
        assert torch.all(torch.diagonal(A) >= 0) and torch.all(torch.tril(A, -1) == 0), name
        key = name + ".weight"
        assert residual[key].dtype == dtype
        assert rel_err(residual[key].float(), peft_base[key].float()) < tol, name

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32),
                                       out / "pissa_init")
    merged = loaded.merge_and_unload().state_dict()
    original = load_safetensors_dir(model_dir)
    for name in ours:
        assert rel_err(merged[name + ".weight"], original[name + ".weight"].float()) < max(tol, 1e-5), name


def test_olora_conv1d_is_the_qr_of_the_out_in_view(pissa, tiny_gpt2, tmp_path):
    """GPT-2's Conv1D weights are stored [in, out]; OLoRA factors the [out, in] view, so that A and B
    have peft's shapes for the layer ([r, in], [out, r]) and s B A is the projection of W onto its
    first r columns. (peft's own olora_init factors the stored tensor as it lies, whose Q has the
    wrong number of rows for a Conv1D's B; it is no oracle here.)"""
    model_dir = tiny_gpt2(spectra=True)
    out = tmp_path / "ours"
    pissa.run("init", model_dir, "--out", out, "--rank", 3, "--init", "olora", "--fan-in-fan-out",
              "--targets", "c_attn,c_fc")
    original = load_safetensors_dir(model_dir)
    residual = load_safetensors_dir(out)
    for name, (A, B) in adapter_modules(out / "pissa_init").items():
        W = original[name + ".weight"].double().T  # [out, in]
        Q, _ = torch.linalg.qr(W[:, :3])
        projection = Q @ Q.T @ W
        assert rel_err((B @ A).double(), projection) < 1e-5, name
        assert rel_err(residual[name + ".weight"].double().T + (B @ A).double(), W) < 1e-6, name


def test_milora_keeps_the_minor_triplets(pissa, tiny_llama, tmp_path):
    """--components minor: s B A is the part of W on its r smallest singular triplets, W_res the
    rest; the summary's energy fraction is theirs; metadata and summary name MiLoRA."""
    model_dir = tiny_llama(spectra=True)
    out = tmp_path / "ours"
    summary = pissa.json("init", model_dir, "--out", out, "--rank", 4, "--alpha", 16, "--components", "minor",
                         "--targets", "q_proj,down_proj")
    assert summary["init"] == "milora" and summary["method"] == "exact"
    meta = metadata(out / "pissa_init")
    assert meta["pissa.init"] == "milora" and meta["pissa.method"] == "exact"
    assert meta["pissa.init_lora_weights"] == ""  # peft has no equivalent
    config = json.loads((out / "pissa_init" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True
    original = load_safetensors_dir(model_dir)
    residual = load_safetensors_dir(out)
    rows = {m["name"]: m for m in summary["modules"]}
    s = 16 / 4
    for name, (A, B) in adapter_modules(out / "pissa_init").items():
        W = original[name + ".weight"].double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        minor = U[:, -4:] @ torch.diag(S[-4:]) @ Vh[-4:]
        # The minor triplets are as accurate as float32 allows relative to ||W|| (they are tiny).
        assert float((s * (B @ A).double() - minor).norm() / W.norm()) < 1e-5, name
        kept = torch.linalg.svdvals((B @ A).double())[:4] * s
        assert float((kept - S[-4:]).abs().max() / S[0]) < 1e-5, name
        assert rel_err(residual[name + ".weight"].double() + s * (B @ A).double(), W) < 1e-6, name
        assert rows[name]["energy_fraction"] == pytest.approx(float((S[-4:] ** 2).sum() / (S ** 2).sum()), rel=1e-3)


@pytest.mark.parametrize("args, message", [
    (["--init", "olora", "--exact"], "takes no SVD option"),
    (["--init", "olora", "--components", "minor"], "takes no SVD option"),
    (["--components", "minor", "--niter", "2"], "needs the exact SVD"),
    (["--init", "milora"], "--init must be pissa or olora"),
    (["--components", "smallest"], "--components must be principal or minor"),
])
def test_sibling_option_refusals(pissa, tiny_llama, tmp_path, args, message):
    out = tmp_path / "ours"
    proc = pissa.run("init", tiny_llama(), "--out", out, *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not out.exists()


def test_python_package_siblings(pissa, tiny_llama, tmp_path):
    """pissa.init_checkpoint(init="olora") and (components="minor") write the tool's bytes."""
    import pissa as pkg

    model_dir = tiny_llama()
    for name, args, kwargs in [("olora", ["--init", "olora"], dict(init="olora")),
                               ("milora", ["--components", "minor"], dict(components="minor"))]:
        pissa.run("init", model_dir, "--out", tmp_path / f"tool-{name}", "--rank", 2, *args)
        report = pkg.init_checkpoint(model_dir, tmp_path / f"package-{name}", rank=2, **kwargs)
        assert len(report.modules) == 4
        for f in ("pissa_init/adapter_model.safetensors", "model.safetensors"):
            assert (tmp_path / f"tool-{name}" / f).read_bytes() == (tmp_path / f"package-{name}" / f).read_bytes()


def test_python_init_siblings_match_the_checkpoint_job(tiny_llama, tmp_path):
    """pissa.init(W, init="olora") and (components="minor") on one weight give the factors the
    checkpoint job wrote for it (same library call, same bits)."""
    import pissa as pkg

    model_dir = tiny_llama()
    weight = load_safetensors_dir(model_dir)["model.layers.0.self_attn.q_proj.weight"]
    for kwargs in (dict(init="olora"), dict(components="minor")):
        report = pkg.init_checkpoint(model_dir, tmp_path / next(iter(kwargs.values())), rank=3, lora_alpha=6,
                                     target_modules=["model.layers.0.self_attn.q_proj"], **kwargs)
        split = pkg.init(weight, rank=3, lora_alpha=6, **kwargs)
        A, B = adapter_modules(report.adapter)["model.layers.0.self_attn.q_proj"]
        assert torch.equal(torch.as_tensor(split.A).float(), A) and torch.equal(torch.as_tensor(split.B).float(), B)
        assert rel_err(torch.as_tensor(split.residual) + split.scaling * torch.as_tensor(split.B @ split.A), weight) < 1e-6
    assert len(pkg.init(weight, rank=3, init="olora").singular_values) == 0
    with pytest.raises(ValueError, match="exact decomposition"):
        pkg.init(weight, rank=3, components="minor", method="randomized")
    with pytest.raises(ValueError, match="init must be 'pissa' or 'olora'"):
        pkg.init(weight, rank=3, init="milora")
    with pytest.raises(ValueError, match="components must be 'principal' or 'minor'"):
        pkg.init_checkpoint(model_dir, tmp_path / "bad", rank=3, components="smallest")
    assert not (tmp_path / "bad").exists()
