#!/usr/bin/python3
"""Side-by-side timing and accuracy of pissa's decompositions and the Python peers.

Runs, on the same matrices and in one session:
  * pissa (bench/bench_svd built in Release, on raw float32 files): BM_file_randomized (a fresh
    randomized_svd call per run), BM_file_reused (one RandomizedSvd object across the runs: its
    buffers are kept, as when a model's matrices are decomposed one after another), BM_file_fused
    (the same with the fused_power_iteration option) and BM_file_exact (block Krylov),
  * torch.svd_lowrank(W, q=r, niter=K)           (peft init_lora_weights="pissa_niter_K"),
  * sklearn.utils.extmath.randomized_svd(W, r, n_oversamples=0, n_iter=K),
  * torch.linalg.svd(W, full_matrices=False)      (peft init_lora_weights="pissa"),
and prints a table of median times (of --repetitions runs), ratios and accuracies: the Frobenius
error of the rank-r approximation divided by the Eckart-Young optimum sqrt(sum_{i>r} sigma_i^2)
(sigma from torch.linalg.svd), and for pissa's exact mode the largest relative singular-value
error against LAPACK's and the convergence report. Then the single products the randomized SVD
is made of (bench_svd's BM_multiply / BM_multiply_t, float32) against OpenBLAS sgemm on the same
shapes (numpy `W @ X`, `W.T @ Y`), the peers' own kernel (--no-products skips it).

Threading: every peer runs in its own worker process, so that its environment is set before
torch/numpy start. torch is measured in two setups -- its default (one OpenMP thread per core
over OpenBLAS) and OMP_WAIT_POLICY=PASSIVE with torch.set_num_threads(2) -- and the faster is
reported per row (both are printed with --verbose). sklearn/numpy use OpenBLAS with all cores.
pissa uses OpenMP with all cores (OMP_NUM_THREADS unset), measured with GNU OpenMP's default
(spinning) wait policy and with OMP_WAIT_POLICY=PASSIVE, the faster reported (on a loaded
machine spinning threads steal the CPU from the thread they wait for).

OpenBLAS kernel: the peers' products run in OpenBLAS, which picks its kernels by CPU model. A CPU
newer than the OpenBLAS build gets its generic fallback: Debian 12's 0.3.21 runs an Intel Xeon
family 6 model 207 (Emerald Rapids) as "Prescott" (SSE3): there, 32-40 GFLOP/s in the probe below
where its SkylakeX kernel does 184-258, and torch.svd_lowrank(4096 x 4096, r = 16 / 128, niter = 4)
2.7x / 4.7x slower (README, "Measured on a second machine kind"). So every peer runs with the
fastest of OpenBLAS's own choice and the kernel matching the CPU's vector extensions
(OPENBLAS_CORETYPE=SkylakeX with AVX-512, Haswell with AVX2), by a short sgemm probe
(--openblas-coretype overrides it); the header says which.

Matrices: W = A diag(d) B / sqrt(k) + 0.05 N with Gaussian A [m, k], B [k, n], k = 512,
d_i = exp(-i / 40) (a decaying head over a noise floor, like trained weights), seed fixed.

Usage: python3 bench/compare_peers.py --bench build/bench/bench_svd [--quick] [--repetitions 5]
Needs numpy, torch, sklearn (scripts/install-deps.sh --peers).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# (name, m, n, r, niter): the reference rows (docs/performance.md).
CASES = [
    ("sq_r16", 4096, 4096, 16, 4),
    ("sq_r64", 4096, 4096, 64, 4),
    ("sq_r128", 4096, 4096, 128, 4),
    ("tall_r16", 11008, 4096, 16, 4),
    ("tall_r128", 11008, 4096, 128, 4),
    ("sq_r16_n16", 4096, 4096, 16, 16),
    ("tiny_r8", 768, 512, 8, 4),  # smoke test of the script only (--cases tiny_r8)
]
QUICK = ["sq_r16", "sq_r128"]
# (m, n, q): the single products of bench_svd's BM_multiply / BM_multiply_t, against OpenBLAS sgemm.
PRODUCTS = [(4096, 4096, 16), (4096, 4096, 64), (4096, 4096, 128), (11008, 4096, 16)]
EXACT = ["sq_r16", "sq_r64", "sq_r128", "tall_r16", "tiny_r8"]  # exact mode (block Krylov) rows


def matrix_path(tmp, m, n):
    return os.path.join(tmp, f"W_{m}x{n}.f32")


def generate(tmp, m, n, seed=1234):
    import numpy as np

    path = matrix_path(tmp, m, n)
    if os.path.exists(path):
        return path
    rng = np.random.default_rng(seed + m * 31 + n)
    k = 512
    d = np.exp(-np.arange(k) / 40.0).astype(np.float32)
    A = rng.standard_normal((m, k), dtype=np.float32)
    B = rng.standard_normal((k, n), dtype=np.float32)
    W = (A * d) @ B / np.float32(np.sqrt(k)) + np.float32(0.05) * rng.standard_normal((m, n), dtype=np.float32)
    np.ascontiguousarray(W, dtype=np.float32).tofile(path)
    return path


def load(path, m, n):
    import numpy as np

    return np.fromfile(path, dtype=np.float32).reshape(m, n)


def frob_error(W, U, S, V):
    import numpy as np

    approx = (U.astype(np.float64) * S.astype(np.float64)) @ V.astype(np.float64).T
    return float(np.linalg.norm(W.astype(np.float64) - approx))


def timed(fn, reps):
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# ---- workers (own process each) -----------------------------------------------------------------

def worker(kind, tmp, cases, reps):
    import numpy as np

    results = {}
    if kind == "gemm":
        rng = np.random.default_rng(0)
        for m, n, q in PRODUCTS:
            W = rng.standard_normal((m, n), dtype=np.float32)
            X = rng.standard_normal((n, q), dtype=np.float32)
            Y = rng.standard_normal((m, q), dtype=np.float32)
            results[f"{m}x{n}x{q}"] = {"W X": timed(lambda: W @ X, reps)[0], "W^T Y": timed(lambda: W.T @ Y, reps)[0]}
        print(json.dumps(results))
        return
    if kind.startswith("torch"):
        import torch

        if kind == "torch-passive":
            torch.set_num_threads(2)
        results["_threads"] = f"torch {torch.__version__}, get_num_threads()={torch.get_num_threads()}, " \
                              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    for name, m, n, r, niter in cases:
        W = load(matrix_path(tmp, m, n), m, n)
        if kind.startswith("torch"):
            import torch

            Wt = torch.from_numpy(W)
            torch.manual_seed(0)
            t, (U, S, V) = timed(lambda: torch.svd_lowrank(Wt, q=r, niter=niter), reps)
            results[name] = {"time": t, "frob": frob_error(W, U.numpy(), S.numpy(), V.numpy())}
        elif kind == "sklearn":
            from sklearn.utils.extmath import randomized_svd

            t, (U, S, Vt) = timed(lambda: randomized_svd(W, r, n_oversamples=0, n_iter=niter, random_state=0), reps)
            results[name] = {"time": t, "frob": frob_error(W, U, S, Vt.T)}
        elif kind == "full":
            import torch

            key = f"{m}x{n}"
            if key in results:
                continue
            Wt = torch.from_numpy(W)
            t, (U, S, Vh) = timed(lambda: torch.linalg.svd(Wt, full_matrices=False), reps)
            results[key] = {"time": t, "sigma": S.double().numpy().tolist()}
    print(json.dumps(results))


def openblas_setup(choice):
    """(env for the peers, header line): the OpenBLAS core type the peers run with (see the docstring)."""
    probe = ("import time, numpy as np; a = np.ones((2048, 2048), np.float32); a @ a; t = time.perf_counter(); "
             "[a @ a for _ in range(3)]; print(3 * 2 * 2048 ** 3 / (time.perf_counter() - t) / 1e9)")

    def run(coretype):
        env = dict(os.environ, OPENBLAS_VERBOSE="2")
        if coretype:
            env["OPENBLAS_CORETYPE"] = coretype
        p = subprocess.run([sys.executable, "-c", probe], env=env, check=True, capture_output=True, text=True)
        cores = [line.split(":", 1)[1].strip() for line in (p.stdout + p.stderr).splitlines() if line.startswith("Core:")]
        return (cores[0] if cores else "unknown"), float(p.stdout.strip().splitlines()[-1])

    if choice == "default":
        core, gflops = run("")
        return {}, f"OpenBLAS default core {core} ({gflops:.0f} GFLOP/s sgemm), no override"
    if choice != "auto":
        core, gflops = run(choice)
        return {"OPENBLAS_CORETYPE": choice}, f"OPENBLAS_CORETYPE={choice} (runs as {core}, {gflops:.0f} GFLOP/s sgemm)"
    flags = set()
    if os.path.exists("/proc/cpuinfo"):  # Linux; elsewhere only OpenBLAS's own choice is probed
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    candidates = [""] + (["SkylakeX"] if "avx512f" in flags else []) + (["Haswell"] if "avx2" in flags else [])
    probed = [(c, *run(c)) for c in candidates]
    best = max(probed, key=lambda p: p[2])
    summary = ", ".join(f"{c or 'default'} -> {core} {g:.0f}" for c, core, g in probed)
    env = {"OPENBLAS_CORETYPE": best[0]} if best[0] else {}
    return env, (f"OpenBLAS core type {'OPENBLAS_CORETYPE=' + best[0] if best[0] else 'default'} ({best[1]}), "
                 f"the fastest in an sgemm probe (GFLOP/s: {summary})")


def run_worker(kind, tmp, names, reps, env_extra):
    env = dict(os.environ)
    env.update(env_extra)
    cmd = [sys.executable, __file__, "--worker", kind, "--tmp", tmp, "--repetitions", str(reps), "--cases", ",".join(names)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_bench(bench, flt, reps, env):
    """Median real time in seconds of every benchmark of bench_svd matching `flt`, by run name."""
    cmd = [bench, f"--benchmark_filter={flt}", f"--benchmark_repetitions={reps}", "--benchmark_format=json",
           "--benchmark_report_aggregates_only=true", "--benchmark_min_time=0.01"]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    times = {}
    for b in json.loads(out)["benchmarks"]:
        if b.get("aggregate_name") == "median":
            base = b["run_name"].replace("/real_time", "")
            unit = {"ms": 1e-3, "us": 1e-6, "ns": 1e-9, "s": 1.0}[b["time_unit"]]
            times[base] = b["real_time"] * unit
    return times


def run_pissa(bench, tmp, cases, reps, exact_names, env_extra):
    spec = ";".join(f"{name}:{matrix_path(tmp, m, n)}:{m}:{n}:{r}:{niter}" for name, m, n, r, niter in cases)
    names = "|".join(name for name, *_ in cases)
    exact = "|".join(e for e in exact_names if any(e == c[0] for c in cases))
    flt = f"BM_file_(randomized|reused|fused)/({names})/"
    if exact:
        flt = f"({flt})|(BM_file_exact/({exact})/)"
    env = dict(os.environ, PISSA_PEER_INPUT=spec, PISSA_PEER_OUT=tmp)
    env.update(env_extra)
    return run_bench(bench, flt, reps, env)


def roofline_seconds(m, n, r, niter, gbs=32.6, gflops=388.0):
    """The roofline: 2 niter + 2 passes over float32 W, each max(bytes / bandwidth, 2 m n r / peak)."""
    passes = 2 * niter + 2
    return passes * max(m * n * 4 / (gbs * 1e9), 2.0 * m * n * r / (gflops * 1e9))


def read_result(tmp, name, mode):
    out = {}
    with open(os.path.join(tmp, f"{name}_{mode}.txt")) as f:
        for line in f:
            key, *vals = line.split()
            out[key] = [float(v) for v in vals] if key == "singular_values" else float(vals[0])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="build/bench/bench_svd", help="path to the bench_svd binary")
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--svd-repetitions", type=int, default=5, help="runs of the full torch.linalg.svd")
    ap.add_argument("--quick", action="store_true", help=f"only {QUICK}")
    ap.add_argument("--cases", default="", help="comma-separated case names")
    ap.add_argument("--tmp", default="")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--no-products", action="store_true", help="skip the single products against OpenBLAS sgemm")
    ap.add_argument("--openblas-coretype", default="auto",
                    help="OpenBLAS kernel of the peers: auto (the fastest of the default and the CPU's own, probed), "
                         "default (no override) or an OPENBLAS_CORETYPE name")
    ap.add_argument("--worker", default="")
    args = ap.parse_args()

    names = [c for c in args.cases.split(",") if c] or (QUICK if args.quick else [c[0] for c in CASES if not c[0].startswith("tiny")])
    cases = [c for c in CASES if c[0] in names]
    if args.worker:
        worker(args.worker, args.tmp, cases, args.repetitions)
        return

    tmp = args.tmp or tempfile.mkdtemp(prefix="pissa-peers-")
    os.makedirs(tmp, exist_ok=True)
    for _, m, n, _, _ in cases:
        generate(tmp, m, n)
    load_before = os.getloadavg()

    ours_default = run_pissa(args.bench, tmp, cases, args.repetitions, EXACT, {})
    ours_passive = run_pissa(args.bench, tmp, cases, args.repetitions, EXACT, {"OMP_WAIT_POLICY": "PASSIVE"})
    ours = {k: min(v, ours_passive.get(k, v)) for k, v in ours_default.items()}
    ours_setup = {k: "default" if v <= ours_passive.get(k, v) else "passive" for k, v in ours_default.items()}
    blas_env, blas_line = openblas_setup(args.openblas_coretype)
    torch_default = run_worker("torch-default", tmp, names, args.repetitions, blas_env)
    torch_passive = run_worker("torch-passive", tmp, names, args.repetitions, dict(blas_env, OMP_WAIT_POLICY="PASSIVE"))
    sk = run_worker("sklearn", tmp, names, args.repetitions, blas_env)
    if not args.no_products:
        ours_products = run_bench(args.bench, "BM_multiply(_t)?<float>/", args.repetitions, dict(os.environ))
        blas_products = run_worker("gemm", tmp, names, args.repetitions, blas_env)
    full = run_worker("full", tmp, names, args.svd_repetitions, blas_env)
    load_after = os.getloadavg()

    print(f"# pissa vs peers, median of {args.repetitions} (full SVD: {args.svd_repetitions}); matrices in {tmp}")
    print(f"# load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; nproc {os.cpu_count()}")
    print(f"# peers: {blas_line}")
    print(f"# torch default: {torch_default['_threads']}")
    print(f"# torch passive: {torch_passive['_threads']}")
    print()
    print("| job | pissa one-off call | pissa reused object | pissa fused (option) | torch.svd_lowrank (best setup) "
          "| sklearn | torch / pissa reused | sklearn / pissa reused | roofline | pissa / roofline: one-off, reused, fused "
          "| err/opt pissa | err/opt pissa fused | err/opt torch | err/opt sklearn |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, m, n, r, niter in cases:
        sigma = full[f"{m}x{n}"]["sigma"]
        opt = sum(s * s for s in sigma[r:]) ** 0.5
        mine = read_result(tmp, name, "reused")
        mine_fused = read_result(tmp, name, "fused")
        t = {mode: ours[f"BM_file_{mode}/{name}"] for mode in ("randomized", "reused", "fused")}
        setup = {mode: ours_setup[f"BM_file_{mode}/{name}"] for mode in t}
        td, tp = torch_default[name], torch_passive[name]
        best = td if td["time"] <= tp["time"] else tp
        torch_setup = "default" if best is td else "passive"
        s = sk[name]
        roof = roofline_seconds(m, n, r, niter)
        print(f"| {m}x{n}, r={r}, niter={niter} "
              + "".join(f"| {t[mode] * 1e3:.1f} ms ({setup[mode]}) " for mode in ("randomized", "reused", "fused"))
              + f"| {best['time'] * 1e3:.1f} ms ({torch_setup}) | {s['time'] * 1e3:.1f} ms "
              f"| {best['time'] / t['reused']:.2f}x | {s['time'] / t['reused']:.2f}x | {roof * 1e3:.1f} ms "
              f"| {t['randomized'] / roof:.2f}x, {t['reused'] / roof:.2f}x, {t['fused'] / roof:.2f}x "
              f"| {mine['frob_error'] / opt:.6f} | {mine_fused['frob_error'] / opt:.6f} "
              f"| {best['frob'] / opt:.6f} | {s['frob'] / opt:.6f} |")
        if args.verbose:
            print("|   " + "; ".join(f"pissa {mode} default {ours_default[f'BM_file_{mode}/{name}'] * 1e3:.1f} ms, "
                                    f"passive {ours_passive[f'BM_file_{mode}/{name}'] * 1e3:.1f} ms" for mode in t)
                  + f"; torch default {td['time'] * 1e3:.1f} ms, passive {tp['time'] * 1e3:.1f} ms |")
    if not args.no_products:
        print()
        print("| single product, float32 | pissa W X | OpenBLAS sgemm W X | sgemm / pissa | pissa W^T Y "
              "| OpenBLAS sgemm W^T Y | sgemm / pissa |")
        print("|---|---|---|---|---|---|---|")
        for m, n, q in PRODUCTS:
            mine = [ours_products[f"BM_multiply{t}<float>/{m}/{n}/{q}"] for t in ("", "_t")]
            blas = [blas_products[f"{m}x{n}x{q}"][p] for p in ("W X", "W^T Y")]
            print(f"| {m}x{n}, q={q} "
                  + "".join(f"| {a * 1e3:.2f} ms | {b * 1e3:.2f} ms | {b / a:.2f}x " for a, b in zip(mine, blas)) + "|")
    print()
    print("| exact top-r | pissa block Krylov | cycles | residual bound | max rel. sigma error vs LAPACK "
          "| err/opt - 1 | torch.linalg.svd (full) | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m, n, r, niter in cases:
        key = f"BM_file_exact/{name}"
        if key not in ours:
            continue
        sigma = full[f"{m}x{n}"]["sigma"]
        opt = sum(s * s for s in sigma[r:]) ** 0.5
        mine = read_result(tmp, name, "exact")
        sv = mine["singular_values"]
        rel = max(abs(a - b) / b for a, b in zip(sv, sigma[:r]))
        t_full = full[f"{m}x{n}"]["time"]
        print(f"| {m}x{n}, r={r} | {ours[key] * 1e3:.1f} ms ({ours_setup[key]}) | {int(mine['iterations'])} | {mine['residual_bound']:.2e} "
              f"| {rel:.2e} | {mine['frob_error'] / opt - 1:.2e} | {t_full:.2f} s | {t_full / ours[key]:.1f}x |")


if __name__ == "__main__":
    main()
