"""The pissa Python package: its arithmetic against the exact math, its array handling (NumPy,
ml_dtypes, torch; 16-bit storage; bad input), the same bits as the C++ library through the CLI for
the same seed, and the checkpoint jobs' callbacks and all-or-nothing output."""

from __future__ import annotations

import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

import pissa
from conftest import LLAMA_TARGETS, load_safetensors_dir


def random_weight(m=48, n=40, seed=0, decay=0.9, dtype=np.float64):
    """U diag(decay^i) V^T: distinct singular values, so truncations are well defined."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
    v, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
    s = decay ** np.arange(min(m, n))
    return ((u * s) @ v.T).astype(dtype)


def test_version_is_the_headers():
    header = (Path(__file__).parents[2] / "include/pissa/version.hpp").read_text()
    parts = [re.search(rf"PISSA_VERSION_{p} (\d+)", header).group(1) for p in ("MAJOR", "MINOR", "PATCH")]
    assert pissa.__version__ == ".".join(parts)


@pytest.mark.parametrize("rslora", [False, True])
def test_exact_split_is_the_eckart_young_optimum(rslora):
    W = random_weight()
    r, alpha = 6, 12.0
    split = pissa.init(W, rank=r, lora_alpha=alpha, method="exact", use_rslora=rslora)
    s = alpha / (np.sqrt(r) if rslora else r)
    assert split.scaling == pytest.approx(s, rel=1e-15)
    assert split.A.shape == (r, 40) and split.B.shape == (48, r) and split.residual.dtype == np.float64
    sigma = np.linalg.svd(W, compute_uv=False)
    np.testing.assert_allclose(split.singular_values, sigma[:r], rtol=1e-12)
    low_rank = s * split.B @ split.A
    np.testing.assert_allclose(split.residual + low_rank, W, atol=1e-13)
    # Eckart-Young: W_res is the optimal rank-r error, ||W_res||_F^2 = sum of the tail sigma^2.
    assert np.linalg.norm(split.residual) ** 2 == pytest.approx((sigma[r:] ** 2).sum(), rel=1e-10)
    # The balanced split: A A^T = B^T B = diag(S_r / s).
    np.testing.assert_allclose(split.A @ split.A.T, np.diag(sigma[:r] / s), atol=1e-12)
    np.testing.assert_allclose(split.B.T @ split.B, np.diag(sigma[:r] / s), atol=1e-12)
    q = split.quality
    assert q.weight_norm == pytest.approx(np.linalg.norm(W), rel=1e-12)
    assert q.residual_norm == pytest.approx(np.linalg.norm(split.residual), rel=1e-12)
    assert q.adapter_energy_fraction == pytest.approx((sigma[:r] ** 2).sum() / (sigma ** 2).sum(), rel=1e-10)


def test_randomized_split_is_seeded_and_reconstructs():
    W = random_weight(seed=1, dtype=np.float32)
    a = pissa.init(W, rank=4, seed=11)
    b = pissa.init(W, rank=4, seed=11)
    c = pissa.init(W, rank=4, seed=12)
    assert np.array_equal(a.A, b.A) and np.array_equal(a.B, b.B) and np.array_equal(a.residual, b.residual)
    assert not np.array_equal(a.A, c.A)
    np.testing.assert_allclose(a.residual + a.scaling * a.B @ a.A, W, atol=1e-6)
    # peft's spelling of the method is the same call.
    d = pissa.init(W, rank=4, seed=11, method="pissa_niter_4")
    assert np.array_equal(a.residual, d.residual)


def test_fan_in_fan_out_is_the_transpose():
    W = random_weight()
    split = pissa.init(W, rank=5, method="exact")
    stored = pissa.init(np.ascontiguousarray(W.T), rank=5, method="exact", fan_in_fan_out=True)
    np.testing.assert_allclose(stored.residual, split.residual.T, atol=1e-13)
    np.testing.assert_allclose(stored.B @ stored.A, split.B @ split.A, atol=1e-13)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_sixteen_bit_storage(dtype):
    W32 = random_weight(dtype=np.float32)
    W = W32.astype(dtype)
    split = pissa.init(W, rank=4, method="exact")
    assert split.residual.dtype == np.dtype(dtype) and split.residual.shape == W.shape
    assert split.A.dtype == np.float32 and split.B.dtype == np.float32
    # Decomposed in float32, the residual rounded once to the storage type (as peft does).
    wide = W.astype(np.float32)
    ref = pissa.init(wide, rank=4, method="exact")
    expected = (wide - ref.scaling * ref.B @ ref.A).astype(dtype)
    np.testing.assert_allclose(split.residual.astype(np.float32), expected.astype(np.float32), atol=2e-2)
    # Storage type and float32 round trip: W_res + s B A == W to the storage precision.
    rebuilt = split.residual.astype(np.float32) + split.scaling * split.B @ split.A
    np.testing.assert_allclose(rebuilt, wide, atol=1e-2)


def test_bfloat16_products_option():
    # products="float32" multiplies as torch does; "auto"/"bfloat16" may round the skinny operand to
    # bfloat16 (where the CPU has the instructions): the split stays as accurate.
    W = (random_weight(m=300, n=200, dtype=np.float32) * 10).astype(ml_dtypes.bfloat16)
    wide = W.astype(np.float64)
    splits = {p: pissa.init(W, rank=8, seed=1, products=p) for p in ("auto", "float32", "bfloat16")}
    errors = {p: np.linalg.norm(wide - s.scaling * (s.B.astype(np.float64) @ s.A.astype(np.float64)))
              for p, s in splits.items()}
    for p in ("auto", "bfloat16"):
        assert abs(errors[p] - errors["float32"]) / errors["float32"] < 1e-3
    # A float32 W (values bfloat16 cannot hold): "bfloat16" multiplies its bfloat16 copy in all but
    # the last two products, and is as accurate; float16 is multiplied in float32 (the same bits).
    W32 = random_weight(m=300, n=200, dtype=np.float32) * 10
    wide32 = W32.astype(np.float64)
    errors32 = {p: np.linalg.norm(wide32 - s.scaling * (s.B.astype(np.float64) @ s.A.astype(np.float64)))
                for p, s in ((p, pissa.init(W32, rank=8, seed=1, products=p)) for p in ("float32", "bfloat16"))}
    assert abs(errors32["bfloat16"] - errors32["float32"]) / errors32["float32"] < 1e-3
    W16 = W32.astype(np.float16)
    assert np.array_equal(pissa.init(W16, rank=8, products="bfloat16").A, pissa.init(W16, rank=8, products="float32").A)
    with pytest.raises(ValueError, match="products must be auto, float32 or bfloat16"):
        pissa.init(W, rank=8, products="fp8")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_torch_tensors_in_and_out(dtype):
    W = torch.from_numpy(random_weight(dtype=np.float32)).to(dtype)
    split = pissa.init(W, rank=4, seed=3)
    assert isinstance(split.residual, torch.Tensor) and split.residual.dtype == dtype
    assert isinstance(split.A, torch.Tensor)
    assert split.A.dtype == (dtype if dtype in (torch.float32, torch.float64) else torch.float32)
    # The same bits as the NumPy path.
    if dtype == torch.bfloat16:
        as_numpy = W.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
        as_numpy = W.numpy()
    ref = pissa.init(as_numpy, rank=4, seed=3)
    assert np.array_equal(split.residual.view(torch.int16).numpy() if W.element_size() == 2 else split.residual.numpy(),
                          ref.residual.view(np.int16) if W.element_size() == 2 else ref.residual)
    # A tensor that requires grad is read, not differentiated.
    assert pissa.init(W.clone().requires_grad_(dtype.is_floating_point), rank=2).A.shape == (2, 40)


def test_non_contiguous_input_is_copied_not_misread():
    W = random_weight(m=48, n=80)
    view = W[:, ::2]
    assert not view.flags.c_contiguous
    a = pissa.init(view, rank=4, method="exact")
    b = pissa.init(np.ascontiguousarray(view), rank=4, method="exact")
    assert np.array_equal(a.residual, b.residual)
    t = torch.from_numpy(W).T  # a transposed torch view
    c = pissa.init(t, rank=4, method="exact")
    np.testing.assert_allclose(c.residual.numpy(), pissa.init(np.ascontiguousarray(W.T), rank=4, method="exact").residual)


def test_bad_input_is_a_clear_error():
    W = random_weight(dtype=np.float32)
    with pytest.raises(TypeError, match="int64 is not supported"):
        pissa.init(np.arange(12).reshape(3, 4), rank=1)
    with pytest.raises(ValueError, match="rank"):
        pissa.init(W, rank=0)
    with pytest.raises(ValueError, match="rank"):
        pissa.init(W, rank=41)
    with pytest.raises(ValueError, match="lora_alpha"):
        pissa.init(W, rank=2, lora_alpha=-1)
    with pytest.raises(ValueError, match="method"):
        pissa.init(W, rank=2, method="svd")
    with pytest.raises(ValueError, match="2-D"):
        pissa.init(W[0], rank=1)
    bad = W.copy()
    bad[3, 5] = np.nan
    with pytest.raises(ValueError, match=r"non-finite value \(nan\) at row 3, column 5"):
        pissa.init(bad, rank=2)
    bad[3, 5] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        pissa.init(bad, rank=2, method="exact")
    with pytest.raises(ValueError, match=r"x must be \[batch, in\]"):
        pissa.lora_forward(np.ones((2, 3), np.float32), W, np.ones((2, 40), np.float32), np.ones((48, 2), np.float32), 1.0)


def test_svds_against_lapack():
    W = random_weight(m=60, n=50, decay=0.7)
    sigma = np.linalg.svd(W, compute_uv=False)
    for svd in (pissa.truncated_svd(W, 5), pissa.truncated_svd(W, 5, algorithm="block_krylov"),
                pissa.randomized_svd(W, 5, niter=8, oversampling=10, seed=2)):
        np.testing.assert_allclose(svd.S, sigma[:5], rtol=1e-8)
        np.testing.assert_allclose(svd.U.T @ svd.U, np.eye(5), atol=1e-12)
        np.testing.assert_allclose(svd.V.T @ svd.V, np.eye(5), atol=1e-12)
        # U diag(S) V^T is the best rank-5 approximation.
        err = np.linalg.norm(W - (svd.U * svd.S) @ svd.V.T)
        assert err == pytest.approx(np.sqrt((sigma[5:] ** 2).sum()), rel=1e-8)


def test_lora_forward_and_conversion():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 40))
    W = random_weight()
    A, B = rng.standard_normal((4, 40)), rng.standard_normal((48, 4))
    bias = rng.standard_normal(48)
    y = pissa.lora_forward(x, W, A, B, 0.5, bias)
    np.testing.assert_allclose(y, x @ W.T + 0.5 * (x @ A.T) @ B.T + bias, atol=1e-12)
    # pissa_to_lora: the rank-2r LoRA on the original W gives the trained model on the residual.
    init = pissa.init(W, rank=4, method="exact")
    A_t, B_t = init.A + 0.01 * rng.standard_normal(init.A.shape), init.B + 0.01 * rng.standard_normal(init.B.shape)
    A2, B2 = pissa.pissa_to_lora(A_t, B_t, init.A, init.B)
    assert A2.shape == (8, 40) and B2.shape == (48, 8)
    trained = init.residual + init.scaling * B_t @ A_t
    np.testing.assert_allclose(W + init.scaling * B2 @ A2, trained, atol=1e-12)
    assert pissa.convert_lora_alpha(8.0) == 16.0
    assert pissa.lora_scaling(16.0, 4, use_rslora=True) == 8.0


def test_nf4_and_qpissa():
    W = random_weight(m=32, n=64, dtype=np.float32)
    q = pissa.quantize_nf4(W, block_size=64)
    assert (q.rows, q.cols, q.block_size) == (32, 64, 64)
    assert q.packed.dtype == np.uint8 and q.packed.shape == (32 * 64 // 2,)
    assert q.absmax.shape == (32,)
    codes = q.codes()
    np.testing.assert_array_equal(codes[0::2], q.packed >> 4)
    np.testing.assert_array_equal(codes[1::2], q.packed & 0x0F)
    deq = q.dequantize()
    # Each block's absmax is represented exactly (NF4's code 15 is 1.0).
    np.testing.assert_allclose(np.abs(deq).reshape(-1, 64).max(axis=1), np.abs(W).reshape(-1, 64).max(axis=1))
    for init in (pissa.qpissa_init, pissa.loftq_init):
        r = init(W, rank=4, iterations=2)
        err = np.linalg.norm(W - r.base.dequantize() - r.scaling * r.B @ r.A)
        assert err == pytest.approx(r.error_history[-1], rel=1e-5)
    qlora = pissa.qlora_init(W)
    assert qlora.A.shape == (0, 64)
    assert qlora.error_history[0] > pissa.qpissa_init(W, rank=4).error_history[0]


def targets_in_checkpoint_order(report):
    return [m.name for m in report.modules]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_job_is_the_cli_bit_for_bit(pissa_tool, tiny_llama, tmp_path, dtype):
    """pissa.init_checkpoint and `pissa init` write the same bytes; pissa.init on module i's weight
    with module_seed(seed, i) gives the same A, B and residual as the job."""
    model = tiny_llama(dtype=dtype, max_shard_size="40KB")
    cli_out, py_out = tmp_path / "cli", tmp_path / "py"
    pissa_tool.run("init", model, "--out", cli_out, "--rank", 4, "--alpha", 8, "--seed", 7,
              "--targets", "q_proj,v_proj,down_proj")
    seen = []
    report = pissa.init_checkpoint(model, py_out, rank=4, lora_alpha=8, seed=7,
                                     target_modules=["q_proj", "v_proj", "down_proj"],
                                     progress=lambda i, n, name: seen.append((i, n, name)))
    files = sorted(p.relative_to(cli_out) for p in cli_out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(py_out) for p in py_out.rglob("*") if p.is_file())
    for f in files:
        assert (cli_out / f).read_bytes() == (py_out / f).read_bytes(), f
    assert seen and seen[-1][1] == len(seen) and [s[0] for s in seen] == list(range(len(seen)))

    weights = load_safetensors_dir(model)
    residual = load_safetensors_dir(py_out)
    adapter = load_safetensors_dir(py_out / "pissa_init" / "adapter_model.safetensors")
    assert len(report.modules) == 2 * 3
    for i, m in enumerate(report.modules):
        assert m.seed == pissa.module_seed(7, i)
        split = pissa.init(weights[m.name + ".weight"], rank=4, lora_alpha=8, seed=m.seed)
        assert torch.equal(split.residual, residual[m.name + ".weight"]), m.name
        key = "base_model.model." + m.name
        assert torch.equal(split.A, adapter[key + ".lora_A.weight"]), m.name
        assert torch.equal(split.B, adapter[key + ".lora_B.weight"]), m.name


def test_checkpoint_job_reports_and_aborts_cleanly(tiny_llama, tmp_path):
    model = tiny_llama()
    done = []
    report = pissa.init_checkpoint(model, tmp_path / "out", rank=2, target_modules=LLAMA_TARGETS,
                                     module_done=done.append, method="exact")
    assert [m.name for m in done] == [m.name for m in report.modules]
    assert all(0 < m.quality.adapter_energy_fraction < 1 for m in done)
    assert Path(report.adapter).is_dir() and Path(report.out) == (tmp_path / "out").resolve()

    def interrupt(i, n, name):
        if i == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        pissa.init_checkpoint(model, tmp_path / "aborted", rank=2, progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "out"], "the aborted job left something"

    with pytest.raises(ValueError, match="exists"):
        pissa.init_checkpoint(model, tmp_path / "out", rank=2)
    with pytest.raises(ValueError, match="embedding"):
        pissa.init_checkpoint(model, tmp_path / "emb", target_modules=["embed_tokens"])
    with pytest.raises(ValueError, match="missing.safetensors: no such file"):
        pissa.init_checkpoint(tmp_path / "missing.safetensors", tmp_path / "x")


def test_checkpoint_job_in_shards_and_resumed_is_the_single_run(tiny_llama, tmp_path):
    """A transformers-saved sharded checkpoint: shards (in any order) and a run interrupted and
    resumed give the bytes of one run; the work folder is kept for the resume, removed at the end."""
    model = tiny_llama(max_shard_size="40KB")
    single = pissa.init_checkpoint(model, tmp_path / "single", rank=4, target_modules=LLAMA_TARGETS, seed=5)

    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}

    first = pissa.init_checkpoint(model, tmp_path / "sharded", rank=4, target_modules=LLAMA_TARGETS, seed=5,
                                  shard=(2, 3))
    assert not first.complete and first.waiting_for == (0, 1)
    assert pissa.init_checkpoint(model, tmp_path / "sharded", rank=4, target_modules=LLAMA_TARGETS, seed=5,
                                 shard="0/3").waiting_for == (1,)
    with pytest.raises(ValueError, match="shards 1 of 3 have not finished"):
        pissa.join_checkpoint(tmp_path / "sharded")
    last = pissa.init_checkpoint(model, tmp_path / "sharded", rank=4, target_modules=LLAMA_TARGETS, seed=5,
                                 shard=(1, 3))
    assert last.complete and len(last.modules) == len(single.modules)
    assert files(tmp_path / "sharded") == files(tmp_path / "single")

    def interrupt(i, n, name):
        if i == n // 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        pissa.init_checkpoint(model, tmp_path / "resumed", rank=4, target_modules=LLAMA_TARGETS, seed=5, resume=True,
                              progress=interrupt)
    assert (tmp_path / ".resumed.pissa-work").is_dir()
    resumed = pissa.init_checkpoint(model, tmp_path / "resumed", rank=4, target_modules=LLAMA_TARGETS, seed=5,
                                    resume=True)
    assert resumed.complete and resumed.resumed_tensors > 0
    assert files(tmp_path / "resumed") == files(tmp_path / "single")
    assert not (tmp_path / ".resumed.pissa-work").exists()
    again = pissa.init_checkpoint(model, tmp_path / "resumed", rank=4, target_modules=LLAMA_TARGETS, seed=5,
                                  resume=True)
    assert again.already_complete
    with pytest.raises(ValueError, match="other options"):
        pissa.init_checkpoint(model, tmp_path / "resumed", rank=4, target_modules=LLAMA_TARGETS, seed=6, resume=True)


def test_merge_is_the_cli_bit_for_bit(pissa_tool, tiny_llama, tmp_path):
    model = tiny_llama()
    init = pissa.init_checkpoint(model, tmp_path / "init", rank=4, method="exact")
    pissa_tool.run("merge", tmp_path / "init", init.adapter, "--out", tmp_path / "cli")
    report = pissa.merge_checkpoint(tmp_path / "init", init.adapter, tmp_path / "py")
    assert len(report.modules) == 4 and report.skipped == ()
    merged = load_safetensors_dir(tmp_path / "py")
    assert merged.keys() == load_safetensors_dir(tmp_path / "cli").keys()
    for f in sorted((tmp_path / "cli").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "py" / f.name).read_bytes()
    # Merging the PiSSA adapter into its residual gives the original weights back.
    original = load_safetensors_dir(model)
    for m in report.modules:
        torch.testing.assert_close(merged[m.name + ".weight"], original[m.name + ".weight"], atol=1e-5, rtol=0)


def test_type_stubs_are_installed():
    root = Path(pissa.__file__).parent
    assert (root / "py.typed").is_file()
    stub = (root / "_core.pyi").read_text()
    assert "def init(" in stub and "class Nf4Tensor" in stub


def test_concurrent_calls_release_the_gil_and_agree():
    """Threads split different weights at once (the math runs without the GIL) and get what
    sequential calls get."""
    import threading

    weights = [random_weight(m=200, n=160, seed=i, dtype=np.float32) for i in range(4)]
    sequential = [pissa.init(W, rank=8, seed=i) for i, W in enumerate(weights)]
    results = [None] * len(weights)

    def work(i):
        results[i] = pissa.init(weights[i], rank=8, seed=i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(weights))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, sequential):
        assert np.array_equal(got.residual, want.residual) and np.array_equal(got.A, want.A)
