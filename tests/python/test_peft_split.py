"""The split of `pissa init` against peft's own PiSSA initialisation of the same model.

Exact SVD (`--exact`, peft's init_lora_weights="pissa"): per module, the scaled product s B A, the
residual W - s B A, and the sign-free Gram matrices A^T A and B B^T (which pin the balanced
sqrt(S_r / s) split) agree to float tolerance. Singular vectors themselves are never compared: their
signs, and any basis of a repeated singular value, are arbitrary.

Randomized SVD (peft's "pissa_niter_K", torch.svd_lowrank): the two use different random numbers,
so the captured energy ||s B A||_F^2 / ||W||_F^2 is compared as a distribution over seeds, on a
weight whose spectrum decays slowly enough that the number of power iterations shows."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from conftest import (GPT2_TARGETS, LLAMA_TARGETS, adapter_config, adapter_modules, load_safetensors_dir,
                      peft_lora_modules, rel_err, scaling_of)


def compare_split_with_peft(pissa, model_dir, tmp_path, targets, rank, alpha, dtype, rslora=False,
                            fan_in_fan_out=False):
    out = tmp_path / "ours"
    args = ["init", model_dir, "--out", out, "--exact", "--rank", rank, "--alpha", alpha,
            "--targets", ",".join(targets)]
    if rslora:
        args.append("--rslora")
    if fan_in_fan_out:
        args.append("--fan-in-fan-out")
    pissa.run(*args)

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights="pissa",
                        use_rslora=rslora, fan_in_fan_out=fan_in_fan_out)
    theirs = get_peft_model(base, config)
    peft_mods = peft_lora_modules(theirs)
    peft_state = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v
                  for k, v in theirs.state_dict().items() if "lora_" not in k}

    ours = adapter_modules(out / "pissa_init")
    s = scaling_of(adapter_config(out / "pissa_init"))
    residual = load_safetensors_dir(out)
    assert sorted(ours) == sorted(peft_mods)
    # float32: both are LAPACK-grade SVDs of the same float32 matrix. bfloat16: both round the
    # residual to bfloat16, and peft also rounds A and B to bfloat16 values after the split (pissa
    # keeps them float32), so products and residuals agree to bfloat16 precision only.
    prod_tol = 2e-5 if dtype == torch.float32 else 1e-2
    res_tol = 2e-5 if dtype == torch.float32 else 1e-2
    weights = load_safetensors_dir(model_dir)
    for name, (a, b) in ours.items():
        pa, pb, ps = peft_mods[name]
        assert ps == pytest.approx(s, rel=1e-12), name
        assert rel_err(s * b @ a, ps * pb @ pa) < prod_tol, name
        assert rel_err(a.T @ a, pa.T @ pa) < prod_tol, f"{name}: A^T A"
        assert rel_err(b @ b.T, pb @ pb.T) < prod_tol, f"{name}: B B^T"
        w_ours, w_peft = residual[name + ".weight"], peft_state[name + ".weight"]
        assert w_ours.dtype == w_peft.dtype == dtype
        w0 = weights[name + ".weight"].double()
        # Relative to ||W||: the residual is what is left after the top-r part, possibly small.
        assert float((w_ours.double() - w_peft.double()).norm() / w0.norm()) < res_tol, name
        # W_res + s B A gives W back, to the storage precision of W_res, and no worse than peft's.
        delta = (lambda a_, b_, s_: s_ * b_.double() @ a_.double()) if not fan_in_fan_out else \
                (lambda a_, b_, s_: (s_ * b_.double() @ a_.double()).T)
        ours_gap = rel_err(w_ours.double() + delta(a, b, s), w0)
        peft_gap = rel_err(w_peft.double() + delta(pa, pb, ps), w0)
        assert ours_gap <= 1.01 * peft_gap + 1e-6, f"{name}: ours {ours_gap:.3g}, peft {peft_gap:.3g}"


@pytest.mark.parametrize(
    "dtype, rank, alpha, rslora",
    [
        pytest.param(torch.float32, 8, 16, False, id="f32-r8-alpha16"),
        pytest.param(torch.float32, 4, 32, True, id="f32-r4-alpha32-rslora"),
        pytest.param(torch.bfloat16, 8, 8, False, id="bf16-r8"),
    ],
)
def test_exact_split_equals_peft_pissa_llama(pissa, tiny_llama, tmp_path, dtype, rank, alpha, rslora):
    model_dir = tiny_llama(dtype=dtype, spectra=True)
    compare_split_with_peft(pissa, model_dir, tmp_path, LLAMA_TARGETS, rank, alpha, dtype, rslora=rslora)


def test_exact_split_equals_peft_pissa_gpt2_conv1d(pissa, tiny_gpt2, tmp_path):
    model_dir = tiny_gpt2(spectra=True)
    compare_split_with_peft(pissa, model_dir, tmp_path, GPT2_TARGETS, 8, 8, torch.float32, fan_in_fan_out=True)


# ---------------------------------------------------------------------------------------------
# Randomized SVD: captured energy over seeds

M, N, RANK, SEEDS = 256, 192, 8, 12


def slow_decay_weight() -> torch.Tensor:
    """[M, N] with singular values 0.97^i: the top 8 hold 39% of the energy, and svd_lowrank without
    oversampling falls short of it by a margin that shrinks with every power iteration."""
    g = torch.Generator().manual_seed(7)
    u, _ = torch.linalg.qr(torch.randn(M, N, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    s = 0.97 ** torch.arange(N, dtype=torch.float64)
    return ((u * s) @ v.T).float()


class OneLinear(torch.nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(w)


def energy(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> float:
    return float((s * b.double() @ a.double()).norm() ** 2 / w.double().norm() ** 2)


def welch_z(x: list[float], y: list[float]) -> float:
    tx, ty = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    se = math.sqrt(float(tx.var() / len(x) + ty.var() / len(y)))
    return abs(float(tx.mean() - ty.mean())) / max(se, 1e-12)


@pytest.mark.parametrize("niter", [1, 4])
def test_randomized_energy_matches_peft_pissa_niter(pissa, tmp_path, niter):
    w = slow_decay_weight()
    path = tmp_path / "w.safetensors"
    save_file({"layer.weight": w.contiguous()}, str(path))
    ours, theirs, residual_gap = [], [], []
    for seed in range(SEEDS):
        out = tmp_path / f"ours{seed}"
        pissa.run("init", path, "--out", out, "--rank", RANK, "--targets", "layer", "--niter", niter,
                  "--seed", seed)
        a, b = adapter_modules(out / "pissa_init")["layer"]
        ours.append(energy(w, a, b, 1.0))
        w_res = load_safetensors_dir(out)["layer.weight"]
        residual_gap.append(rel_err(w_res + b @ a, w))

        torch.manual_seed(seed)
        model = get_peft_model(OneLinear(w), LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["layer"],
                                                        init_lora_weights=f"pissa_niter_{niter}"))
        pa, pb, ps = peft_lora_modules(model)["layer"]
        theirs.append(energy(w, pa, pb, ps))

    optimum = float((0.97 ** torch.arange(N, dtype=torch.float64))[:RANK].pow(2).sum()
                    / (0.97 ** torch.arange(N, dtype=torch.float64)).pow(2).sum())
    # The residual is W - s B A of the adapter written beside it (s = 1 here).
    assert max(residual_gap) < 1e-5
    # Neither beats the truncated SVD; both fall short of it (the test sees niter).
    assert max(ours) <= optimum + 1e-6 and max(theirs) <= optimum + 1e-6
    mean_theirs = sum(theirs) / SEEDS
    assert mean_theirs < optimum - 0.005
    z = welch_z(ours, theirs)
    assert z < 4.0, (f"niter {niter}: mean energy ours {sum(ours) / SEEDS:.5f}, peft {mean_theirs:.5f} "
                     f"(optimum {optimum:.5f}), z = {z:.2f}")


def test_randomized_niter_changes_energy(pissa, tmp_path):
    """Our niter 1 and niter 4 differ as peft's do (the power iterations are applied)."""
    w = slow_decay_weight()
    path = tmp_path / "w.safetensors"
    save_file({"layer.weight": w.contiguous()}, str(path))
    means = {}
    for niter in (0, 4):
        values = []
        for seed in range(6):
            out = tmp_path / f"n{niter}s{seed}"
            pissa.run("init", path, "--out", out, "--rank", RANK, "--targets", "layer", "--niter", niter,
                      "--seed", seed)
            a, b = adapter_modules(out / "pissa_init")["layer"]
            values.append(energy(w, a, b, 1.0))
        means[niter] = sum(values) / len(values)
    assert means[4] > means[0] + 0.05, means
