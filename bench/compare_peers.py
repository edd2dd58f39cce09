#!/usr/bin/python3
"""One-run comparison of pissa's decompositions with their peers, on the same matrices.

What runs (every program and every peer setup in its own process, its environment set before it
starts):
  * pissa: bench/bench_svd (Release) on raw float32 / bfloat16 files, through the benchmarks that
    PISSA_PEER_INPUT registers: BM_file_randomized (a fresh randomized_svd call per run),
    BM_file_reused (one RandomizedSvd object across the runs: its buffers kept, as when a model's
    matrices are decomposed one after another), BM_file_fused (the same with the
    fused_power_iteration option) and BM_file_exact (block Krylov). Setups: "default" (OpenMP on
    all cores, GNU OpenMP's spinning wait policy), "passive" (OMP_WAIT_POLICY=PASSIVE: on a loaded
    machine spinning threads steal the CPU from the thread they wait for) and "1 thread"
    (OMP_NUM_THREADS=1), the same menu as the peers'. bfloat16 rows decompose the Eigen::bfloat16
    matrix itself, with the library's default products (bfloat16 operands on AMX, float32 elsewhere).
  * torch from PyPI (the --python interpreter; its own BLAS, named in the header with its thread
    count): torch.svd_lowrank(W, q=r, niter=K) (peft init_lora_weights="pissa_niter_K") and
    torch.linalg.svd(W, full_matrices=False) (peft "pissa"), in the setups "default" (torch's own),
    "passive" (torch.set_num_threads(2), OMP_WAIT_POLICY=PASSIVE) and, for svd_lowrank only,
    "1 thread" (torch.set_num_threads(1)).
  * sklearn.utils.extmath.randomized_svd(W, r, n_oversamples=0, n_iter=K) on the numpy / scipy
    wheels' OpenBLAS, with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset (OpenBLAS picks its own
    kernel; the header prints what threadpoolctl reports: library, version, kernel, threads), in
    the setups "default" (OpenBLAS's threads on all cores) and "1 thread" (OPENBLAS_NUM_THREADS=1,
    OMP_NUM_THREADS=1: numpy and scipy each bring an OpenBLAS with its own spinning thread pool,
    and the two pools take turns, so one thread can be the faster setup).
  * sklearn-debian: the same call and setups in Debian's /usr/bin/python3 (python3-sklearn, Debian's
    OpenBLAS) when it imports sklearn, on the fastest OpenBLAS kernel of a short sgemm probe
    (OpenBLAS's own choice or the one matching the CPU's vector extensions: a CPU newer than the
    OpenBLAS build gets a generic fallback several times slower; --openblas-coretype overrides).
    Skipped, with a note, otherwise.
  * Spectra (bench/bench_spectra, BM_spectra_file): PartialSVDSolver<MatrixXf> (ncv = 2r + 1) at
    --spectra-tol (default 1e-4: on 4096x4096 at r = 16 / 128 its singular values came out within
    2e-6 / 7e-6 relative of LAPACK's, and 1e-3 or 1e-2 gave the same values in the same time) for
    the exact rows, next to pissa's exact mode and torch.linalg.svd.
  * The machine's limits in the same run: sgemm on 4096 x 4096 float32 (torch.mm and numpy in their
    multi-threaded setups, the fastest is "the fastest peer's sgemm") and bench_svd's read-bandwidth probe
    BM_bandwidth/1024.
pissa and every peer are reported per row in their fastest setup (named in parentheses; --verbose
prints all).

Rows: 4096x4096 at r = 16 / 64 / 128, 11008x4096 at r = 16 / 128 (niter 4) and 4096x4096 r = 16 at
niter 16, each with W stored in float32 (sq_r16, ...) and in bfloat16 (sq_r16_bf16, ...; --dtypes).
A bfloat16 W is the float32 matrix rounded to nearest even; pissa reads the bfloat16 file, the
peers get the same values as a float32 tensor / array (their fastest form: torch.svd_lowrank does
not run on bfloat16 CPU tensors; the header says whether it did here, and if it does both forms are
timed and the faster kept). The widening to float32 is not counted in the peers' times.

Tables (markdown), median of --repetitions runs:
  1. Randomized SVD, one table per storage dtype: times, "fastest peer / pissa" (the fastest of the
     torch and sklearn variants over pissa reused and pissa fused) and err/opt: the Frobenius error
     of the rank-r approximation over the Eckart-Young optimum sqrt(sum_{i>r} sigma_i^2), sigma
     from LAPACK (torch.linalg.svd) on the matrix as stored (the bfloat16-rounded one for bf16
     rows). A "target met?" line checks fastest peer / pissa >= 1.5x on float32 rows and >= 2x on
     bfloat16 rows.
  2. Efficiency of pissa's randomized rows against the limits measured in this run: GFLOP/s of the
     products ((2K + 2) 2 m n q / time, q = r), as a fraction of the fastest peer's sgemm, and the
     bandwidth-bound roofline (passes x bytes of W in its storage dtype / measured bandwidth;
     2K + 2 passes, K + 2 for the fused option at q <= 24) over the time.
  3. The single products a randomized SVD is made of (bench_svd BM_multiply / BM_multiply_t,
     float32, the fastest setup) against sgemm on the same shapes (torch.mm and numpy `W @ X`,
     `W.T @ Y`), the fastest peer BLAS per shape (--no-products skips it).
  4. Exact top-r: pissa block Krylov, Spectra and torch.linalg.svd (full), with the max relative
     singular-value error against LAPACK of pissa and Spectra, "Spectra / pissa" and
     "torch.linalg.svd / pissa"; target line: >= 10x against torch.linalg.svd and faster than Spectra.

Matrices: W = A diag(d) B / sqrt(k) + 0.05 N with Gaussian A [m, k], B [k, n], k = 512,
d_i = exp(-i / 40) (a decaying head over a noise floor, like trained weights), seed fixed.

Usage:
  python3 bench/compare_peers.py [--bench build/release/bench/bench_svd]
      [--spectra build/release/bench/bench_spectra] [--python VENV/bin/python] [--quick | --cases A,B]
      [--dtypes f32,bf16] [--repetitions 5] [--svd-repetitions 1] [--verbose] [--no-products]
      [--plot FILE.svg] [--json FILE.json] [--whole-job ARGS...]
--bench defaults to build/bench/bench_svd, else build/release/bench/bench_svd; --spectra to
bench_spectra beside it. --python defaults to the venv of scripts/python-env.sh (torch, numpy,
scipy, sklearn, threadpoolctl from PyPI), else this interpreter; the main process needs only the
standard library. --cases takes row names (sq_r16_bf16) or base names (sq_r16: its row in every
--dtypes); tiny_r8 is a smoke test of the script. --json writes every raw result and derived figure
(to regenerate tables and plots); --plot draws the ratios (SVG, no plotting library needed).
--whole-job runs bench/whole_job.py ARGS after the tables, in the peers' interpreter (every
argument after --whole-job goes to it; e.g. --whole-job --pissa build/tools/pissa/pissa), when
that file exists.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import namedtuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (base name, m, n, r, niter): the reference rows (docs/performance.md).
BASE_CASES = [
    ("sq_r16", 4096, 4096, 16, 4),
    ("sq_r64", 4096, 4096, 64, 4),
    ("sq_r128", 4096, 4096, 128, 4),
    ("tall_r16", 11008, 4096, 16, 4),
    ("tall_r128", 11008, 4096, 128, 4),
    ("sq_r16_n16", 4096, 4096, 16, 16),
    ("tiny_r8", 768, 512, 8, 4),  # smoke test of the script only (--cases tiny_r8)
]
QUICK = ["sq_r16", "sq_r128"]
EXACT = ["sq_r16", "sq_r64", "sq_r128", "tall_r16", "tiny_r8"]  # exact-mode rows (float32 storage)
DTYPES = ("f32", "bf16")
# (m, n, q): the single products of bench_svd's BM_multiply / BM_multiply_t, against sgemm.
PRODUCTS = [(4096, 4096, 16), (4096, 4096, 64), (4096, 4096, 128), (11008, 4096, 16)]
SGEMM_SIZE = 4096  # the square sgemm that measures the fastest peer's GFLOP/s
TARGET = {"f32": 1.5, "bf16": 2.0}  # fastest peer / pissa
EXACT_TARGET_TORCH, EXACT_TARGET_SPECTRA = 10.0, 1.0
# The product each peer's sgemm / single-product figures come from, and torch's setups.
MATMUL = {"torch.svd_lowrank": "torch.mm", "sklearn": "numpy (wheels)", "sklearn-debian": "numpy (Debian)"}
TORCH_SETUP = {"default": "", "passive": ", set_num_threads(2)", "1 thread": ", set_num_threads(1)"}
# pissa's threading setups (bench_svd's environment), like the peers'.
PISSA_SETUPS = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "1 thread": {"OMP_NUM_THREADS": "1"}}
FUSED_ONE_PASS_MAX_Q = 24  # rsvd.hpp: W^T (W Q) in one pass over a row-major W for q <= 24

Case = namedtuple("Case", "name base m n r niter dtype")


def all_cases():
    return [Case(base if dtype == "f32" else f"{base}_bf16", base, m, n, r, niter, dtype)
            for base, m, n, r, niter in BASE_CASES for dtype in DTYPES]


def select_cases(names, dtypes):
    """The rows named (row or base names), in table order."""
    return [c for c in all_cases() if c.name in names or (c.base in names and c.dtype in dtypes)]


def matrix_path(tmp, m, n, dtype):
    return os.path.join(tmp, f"W_{m}x{n}.{dtype}")


def shape_key(m, n, dtype):
    return f"{m}x{n}.{dtype}"


def median_time(fn, reps):
    """(median seconds of `reps` calls, the last result)."""
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# ---- workers: run in the peer's interpreter, one process each -----------------------------------

def generate(tmp, m, n, seed=1234):
    """Writes W [m, n] as raw float32 and as raw bfloat16 (rounded to nearest even)."""
    import numpy as np

    f32, bf16 = matrix_path(tmp, m, n, "f32"), matrix_path(tmp, m, n, "bf16")
    if not os.path.exists(f32):
        rng = np.random.default_rng(seed + m * 31 + n)
        k = 512
        d = np.exp(-np.arange(k) / 40.0).astype(np.float32)
        A = rng.standard_normal((m, k), dtype=np.float32)
        B = rng.standard_normal((k, n), dtype=np.float32)
        W = (A * d) @ B / np.float32(np.sqrt(k)) + np.float32(0.05) * rng.standard_normal((m, n), dtype=np.float32)
        np.ascontiguousarray(W, dtype=np.float32).tofile(f32)
    if not os.path.exists(bf16):
        bits = np.fromfile(f32, dtype=np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        rounded.astype(np.uint16).tofile(bf16)


def load(tmp, m, n, dtype):
    """W as float32 [m, n] (a bfloat16 file widened exactly)."""
    import numpy as np

    path = matrix_path(tmp, m, n, dtype)
    if dtype == "f32":
        return np.fromfile(path, dtype=np.float32).reshape(m, n)
    return (np.fromfile(path, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(m, n)


def frob_error(W, U, S, V):
    import numpy as np

    approx = (U.astype(np.float64) * S.astype(np.float64)) @ V.astype(np.float64).T
    return float(np.linalg.norm(W.astype(np.float64) - approx))


def env_subset():
    keys = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE",
            "OPENBLAS_L2_SIZE")
    return {k: os.environ[k] for k in keys if k in os.environ}


def sgemm_and_products(matmul, reps, make, products):
    """sgemm GFLOP/s on the SGEMM_SIZE square and (`products`) the PRODUCTS shapes' W X / W^T Y times."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = make(rng.standard_normal((SGEMM_SIZE, SGEMM_SIZE), dtype=np.float32))
    matmul(a, a)  # warm-up: threads started, buffers allocated
    t, _ = median_time(lambda: matmul(a, a), max(reps, 3))
    out = {"sgemm_gflops": 2.0 * SGEMM_SIZE ** 3 / t / 1e9, "products": {}}
    del a
    for m, n, q in PRODUCTS if products else []:
        W = make(rng.standard_normal((m, n), dtype=np.float32))
        X = make(rng.standard_normal((n, q), dtype=np.float32))
        Y = make(rng.standard_normal((m, q), dtype=np.float32))
        out["products"][f"{m}x{n}x{q}"] = {"W X": median_time(lambda: matmul(W, X), reps)[0],
                                           "W^T Y": median_time(lambda: matmul(W.T, Y), reps)[0]}
    return out


def torch_blas_line(torch):
    config = torch.__config__.show()
    lines = [line.strip(" -") for line in config.splitlines()]
    found = re.search(r"BLAS_INFO=(\w+)", config)
    blas = found.group(1) if found else "unknown"
    library = next((line for line in lines if "Math Kernel Library" in line or "OpenBLAS" in line), "")
    capability = next((line for line in lines if line.startswith("CPU capability usage")), "")
    return f"BLAS_INFO={blas}" + (f" ({library})" if library else "") + (f"; {capability}" if capability else "")


def torch_worker(opts, cases):
    """torch.svd_lowrank per row and (unless --rows-only) torch.linalg.svd per exact shape and torch.mm
    sgemm; `opts.setup` 'passive' is set_num_threads(2) (OMP_WAIT_POLICY=PASSIVE comes in the
    environment), 'single' set_num_threads(1)."""
    import numpy as np
    import torch

    if opts.setup == "passive":
        torch.set_num_threads(2)
    elif opts.setup == "single":
        torch.set_num_threads(1)
    out = {"setup": {"torch": torch.__version__, "numpy": np.__version__, "blas": torch_blas_line(torch),
                     "threads": torch.get_num_threads(), "env": env_subset()}}
    # Does svd_lowrank run on a bfloat16 CPU tensor? (If so, bf16 rows time both forms.)
    try:
        torch.svd_lowrank(torch.randn(64, 48).bfloat16(), q=4, niter=1)
        out["bf16_direct"] = None
    except Exception as e:  # noqa: BLE001 -- any failure means "not supported"
        out["bf16_direct"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    if not opts.rows_only:
        out.update(sgemm_and_products(torch.mm, opts.repetitions, torch.from_numpy, not opts.no_products))
    rows = {}
    for c in cases:
        W = load(opts.tmp, c.m, c.n, c.dtype)
        Wt = torch.from_numpy(W)
        forms = [("float32", Wt)]
        if c.dtype == "bf16" and out["bf16_direct"] is None:
            forms.append(("bfloat16", Wt.bfloat16()))
        best = None
        for form, X in forms:
            torch.manual_seed(0)
            t, (U, S, V) = median_time(lambda: torch.svd_lowrank(X, q=c.r, niter=c.niter), opts.repetitions)
            entry = {"time": t, "frob": frob_error(W, U.float().numpy(), S.float().numpy(), V.float().numpy()),
                     "form": form}
            if best is None or t < best["time"]:
                best = entry
        rows[c.name] = best
    out["rows"] = rows
    full, reference = {}, {}
    for c in cases:
        key = shape_key(c.m, c.n, c.dtype)
        if c.base in EXACT and c.dtype == "f32" and key not in full and not opts.rows_only:
            Wt = torch.from_numpy(load(opts.tmp, c.m, c.n, c.dtype))
            t, (_, S, _) = median_time(lambda: torch.linalg.svd(Wt, full_matrices=False), opts.svd_repetitions)
            full[key] = t
            reference[key] = S.double().numpy().tolist()
    if opts.reference:  # the singular values of every other stored matrix, untimed
        for c in cases:
            key = shape_key(c.m, c.n, c.dtype)
            if key not in reference:
                S = torch.linalg.svdvals(torch.from_numpy(load(opts.tmp, c.m, c.n, c.dtype)))
                reference[key] = S.double().numpy().tolist()
    out["full"], out["reference"] = full, reference
    return out


def sklearn_worker(opts, cases):
    """sklearn randomized_svd per row and numpy sgemm, on whatever BLAS this interpreter's numpy has."""
    import numpy as np
    import sklearn
    from sklearn.utils.extmath import randomized_svd

    info = []
    try:
        import threadpoolctl

        info = [{k: v for k, v in lib.items() if k != "filepath"} | {"file": os.path.basename(lib["filepath"])}
                for lib in threadpoolctl.threadpool_info()]
    except ImportError:
        info = [{"note": "threadpoolctl not installed"}]
    out = {"setup": {"python": sys.version.split()[0], "numpy": np.__version__, "sklearn": sklearn.__version__,
                     "blas": info, "env": env_subset()}}
    if not opts.rows_only:
        out.update(sgemm_and_products(np.matmul, opts.repetitions, lambda a: a, not opts.no_products))
    rows = {}
    for c in cases:
        W = load(opts.tmp, c.m, c.n, c.dtype)
        t, (U, S, Vt) = median_time(
            lambda: randomized_svd(W, c.r, n_oversamples=0, n_iter=c.niter, random_state=0), opts.repetitions)
        rows[c.name] = {"time": t, "frob": frob_error(W, U, S, Vt.T), "form": "float32"}
    out["rows"] = rows
    return out


def worker_main(opts, cases):
    if opts.worker == "generate":
        for m, n in sorted({(c.m, c.n) for c in cases}):
            generate(opts.tmp, m, n)
        out = {}
    elif opts.worker == "torch":
        out = torch_worker(opts, cases)
    elif opts.worker == "sklearn":
        out = sklearn_worker(opts, cases)
    else:
        raise SystemExit(f"compare_peers: unknown worker {opts.worker}")
    print(json.dumps(out))


# ---- the main process: runs the programs and the workers, prints the tables --------------------

def run_worker(python, kind, opts, cases, env_set, env_unset=(), extra=()):
    env = {k: v for k, v in os.environ.items() if k not in env_unset}
    env.update(env_set)
    cmd = [python, os.path.abspath(__file__), "--worker", kind, "--tmp", opts.tmp,
           "--repetitions", str(opts.repetitions), "--svd-repetitions", str(opts.svd_repetitions),
           "--cases", ",".join(c.name for c in cases)] + (["--no-products"] if opts.no_products else []) + list(extra)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"compare_peers: worker {kind} ({python}) failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_bench(program, flt, reps, env):
    """{run name: the median aggregate's JSON record, with 'seconds'} of every benchmark matching `flt`."""
    cmd = [program, f"--benchmark_filter={flt}", f"--benchmark_repetitions={reps}", "--benchmark_format=json",
           "--benchmark_report_aggregates_only=true", "--benchmark_min_time=0.01"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"compare_peers: {program} failed:\n{p.stderr[-3000:]}")
    records = {}
    for b in json.loads(p.stdout or '{"benchmarks": []}')["benchmarks"]:
        # One repetition reports the run itself; more report aggregates, of which the median is kept.
        if b.get("aggregate_name") == "median" or (reps == 1 and b.get("run_type") == "iteration"):
            unit = {"ms": 1e-3, "us": 1e-6, "ns": 1e-9, "s": 1.0}[b["time_unit"]]
            records[b["run_name"].replace("/real_time", "")] = dict(b, seconds=b["real_time"] * unit)
    if not records:
        raise SystemExit(f"compare_peers: no benchmark of {program} matches {flt}")
    return records


def peer_spec(tmp, cases):
    return ";".join(f"{c.name}:{matrix_path(tmp, c.m, c.n, c.dtype)}:{c.m}:{c.n}:{c.r}:{c.niter}:{c.dtype}"
                    for c in cases)


def run_pissa(bench, tmp, cases, exact, reps, products, env_extra):
    """bench_svd's BM_file_* on the rows, its bandwidth probe and (`products`) BM_multiply(_t)<float>:
    {run name: median seconds}, and the probe's bytes/s."""
    names = "|".join(c.name for c in cases)
    flt = [f"BM_file_(randomized|reused|fused)/({names})/", "BM_bandwidth/1024/"]
    if exact:
        flt.append(f"BM_file_exact/({'|'.join(c.name for c in exact)})/")
    if products:
        flt.append("BM_multiply(_t)?<float>/")
    env = dict(os.environ, PISSA_PEER_INPUT=peer_spec(tmp, cases), PISSA_PEER_OUT=tmp)
    env.update(env_extra)
    records = run_bench(bench, "|".join(f"({f})" for f in flt), reps, env)
    return {k: v["seconds"] for k, v in records.items()}, records["BM_bandwidth/1024"]["bytes_per_second"]


def run_spectra(spectra, tmp, exact, reps, tol):
    env = dict(os.environ, PISSA_PEER_INPUT=peer_spec(tmp, exact), PISSA_PEER_OUT=tmp, PISSA_SPECTRA_TOL=str(tol))
    flt = f"BM_spectra_file/({'|'.join(c.name for c in exact)})/"
    return {k: v["seconds"] for k, v in run_bench(spectra, flt, reps, env).items()}


def read_result(tmp, name, mode):
    out = {}
    with open(os.path.join(tmp, f"{name}_{mode}.txt")) as f:
        for line in f:
            key, *vals = line.split()
            out[key] = [float(v) for v in vals] if key == "singular_values" else float(vals[0])
    return out


def openblas_probe(python, choice):
    """(env, header line): the OpenBLAS core type for Debian's OpenBLAS (see the docstring)."""
    probe = ("import time, numpy as np; a = np.ones((2048, 2048), np.float32); a @ a; t = time.perf_counter(); "
             "[a @ a for _ in range(3)]; print(3 * 2 * 2048 ** 3 / (time.perf_counter() - t) / 1e9)")

    def run(coretype):
        env = dict(os.environ, OPENBLAS_VERBOSE="2")
        env.pop("OPENBLAS_CORETYPE", None)
        if coretype:
            env["OPENBLAS_CORETYPE"] = coretype
        p = subprocess.run([python, "-c", probe], env=env, check=True, capture_output=True, text=True)
        cores = [line.split(":", 1)[1].strip() for line in (p.stdout + p.stderr).splitlines() if line.startswith("Core:")]
        return (cores[0] if cores else "unknown"), float(p.stdout.strip().splitlines()[-1])

    if choice == "default":
        core, gflops = run("")
        return {}, f"OpenBLAS default core {core} ({gflops:.0f} GFLOP/s sgemm), no override"
    if choice != "auto":
        core, gflops = run(choice)
        return {"OPENBLAS_CORETYPE": choice}, f"OPENBLAS_CORETYPE={choice} (runs as {core}, {gflops:.0f} GFLOP/s sgemm)"
    flags = cpu_info()["flags"]
    candidates = [""] + (["SkylakeX"] if "avx512f" in flags else []) + (["Haswell"] if "avx2" in flags else [])
    probed = [(c, *run(c)) for c in candidates]
    best = max(probed, key=lambda p: p[2])
    summary = ", ".join(f"{c or 'default'} -> {core} {g:.0f}" for c, core, g in probed)
    env = {"OPENBLAS_CORETYPE": best[0]} if best[0] else {}
    return env, (f"core type {'OPENBLAS_CORETYPE=' + best[0] if best[0] else 'default'} ({best[1]}), "
                 f"the fastest in an sgemm probe (GFLOP/s: {summary})")


def cpu_info():
    model, flags = "unknown", set()
    if os.path.exists("/proc/cpuinfo"):  # Linux; elsewhere the header says "unknown"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    return {"model": model, "flags": flags}


def default_python():
    script = os.path.join(ROOT, "scripts", "python-env.sh")
    if os.path.exists(script):
        venv = subprocess.run([script], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        return os.path.join(venv, "bin", "python")
    return sys.executable


def run_peers(args, python, cases, notes):
    """{peer: {setup: worker output}} of every peer in every threading setup, and the Debian OpenBLAS
    probe's line. torch and the wheels run with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset."""
    unset = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
    single = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    if not can_import(python, "torch, numpy"):
        raise SystemExit(f"compare_peers: {python} cannot import torch and numpy (--python; scripts/python-env.sh)")
    peers = {"torch.svd_lowrank": {
        "default": run_worker(python, "torch", args, cases, {}, unset, ["--reference"]),
        "passive": run_worker(python, "torch", args, cases, {"OMP_WAIT_POLICY": "PASSIVE"}, unset, ["--setup", "passive"]),
        "1 thread": run_worker(python, "torch", args, cases, {}, unset, ["--setup", "single", "--rows-only"])}}
    if can_import(python, "sklearn, numpy"):
        peers["sklearn"] = {"default": run_worker(python, "sklearn", args, cases, {}, unset),
                            "1 thread": run_worker(python, "sklearn", args, cases, single, unset, ["--rows-only"])}
    else:
        notes.append(f"sklearn skipped: {python} cannot import sklearn")
    debian = args.debian_python
    if can_import(debian, "sklearn, numpy"):
        blas_env, line = openblas_probe(debian, args.openblas_coretype)
        peers["sklearn-debian"] = {
            "default": run_worker(debian, "sklearn", args, cases, blas_env, unset),
            "1 thread": run_worker(debian, "sklearn", args, cases, dict(blas_env, **single), unset, ["--rows-only"])}
        return peers, line
    notes.append(f"sklearn-debian skipped: {debian} cannot import sklearn and numpy (apt-get install python3-sklearn)")
    return peers, ""


def can_import(python, modules):
    exe = python if os.path.exists(python) else shutil.which(python)
    return exe is not None and subprocess.run([exe, "-c", f"import {modules}"], capture_output=True).returncode == 0


def peer_setup_lines(peers, debian_blas_line):
    """Header lines: each peer's versions, BLAS, threads and environment per setup."""
    torch = peers["torch.svd_lowrank"]
    t = torch["default"]["setup"]
    lines = [f"torch.svd_lowrank, torch.linalg.svd, torch.mm: torch {t['torch']} (numpy {t['numpy']}), {t['blas']}; "
             "setups: " + "; ".join(
                 f"{name}: {out['setup']['threads']} thread(s){TORCH_SETUP[name]}, env {out['setup']['env'] or '{}'}"
                 for name, out in torch.items())]
    for label in ("sklearn", "sklearn-debian"):
        if label not in peers:
            continue
        s = peers[label]["default"]["setup"]
        blas = "; ".join(b["note"] if "note" in b else
                         f"{b.get('internal_api')} {b.get('version')} ({b.get('file')}): kernel {b.get('architecture')}, "
                         f"{b.get('num_threads')} threads, {b.get('threading_layer')}" if b.get("user_api") == "blas" else
                         f"{b.get('internal_api')} ({b.get('file')}): {b.get('num_threads')} threads" for b in s["blas"])
        kernel = f"Debian OpenBLAS {debian_blas_line}" if label == "sklearn-debian" else \
            "OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset"
        lines.append(f"{label}: python {s['python']}, numpy {s['numpy']}, sklearn {s['sklearn']}; {kernel}; BLAS "
                     f"(threadpoolctl): {blas}; setups: default (env {s['env'] or '{}'}), 1 thread "
                     f"(env {peers[label]['1 thread']['setup']['env']})")
    return lines


# ---- derived figures ----------------------------------------------------------------------------

def optimum(sigma, r):
    return sum(s * s for s in sigma[r:]) ** 0.5


def ms(seconds):
    return f"{seconds * 1e3:.1f} ms"


def best_setup(setups, name):
    """(entry, setup name) of the fastest of a peer's setups on row `name`."""
    setup = min(setups, key=lambda k: setups[k]["rows"][name]["time"])
    return setups[setup]["rows"][name], setup


def randomized_rows(results, cases):
    """Per row: pissa's times (best setup), the peers' best entries, ratios and err/opt."""
    rows = []
    for c in cases:
        ref = results["reference"][shape_key(c.m, c.n, c.dtype)]
        opt = optimum(ref, c.r)
        pissa = {mode: results["pissa"]["best"][f"BM_file_{mode}/{c.name}"] for mode in ("randomized", "reused", "fused")}
        pissa_setup = {mode: results["pissa"]["setup"][f"BM_file_{mode}/{c.name}"] for mode in pissa}
        peers = {}
        for label, setups in results["peers"].items():
            entry, setup = best_setup(setups, c.name)
            peers[label] = dict(entry, setup=setup)
        fastest_label = min(peers, key=lambda k: peers[k]["time"])
        fastest = peers[fastest_label]["time"]
        rows.append({
            "case": c._asdict(), "pissa": pissa, "pissa_setup": pissa_setup, "peers": peers,
            "fastest_peer": fastest_label, "fastest_peer_time": fastest,
            "ratio_reused": fastest / pissa["reused"], "ratio_fused": fastest / pissa["fused"],
            "err_opt": {"pissa": read_result(results["tmp"], c.name, "reused")["frob_error"] / opt,
                        "pissa fused": read_result(results["tmp"], c.name, "fused")["frob_error"] / opt,
                        **{label: e["frob"] / opt for label, e in peers.items()}},
        })
    return rows


def exact_rows(results, exact):
    rows = []
    for c in exact:
        key = shape_key(c.m, c.n, c.dtype)
        sigma = results["reference"][key]
        opt = optimum(sigma, c.r)
        mine = read_result(results["tmp"], c.name, "exact")
        t = results["pissa"]["best"][f"BM_file_exact/{c.name}"]
        full = {setup: out["full"][key] for setup, out in results["peers"]["torch.svd_lowrank"].items()
                if key in out.get("full", {})}
        full_setup = min(full, key=full.get)
        row = {"case": c._asdict(), "pissa": t, "pissa_setup": results["pissa"]["setup"][f"BM_file_exact/{c.name}"],
               "cycles": int(mine["iterations"]), "residual_bound": mine["residual_bound"],
               "sigma_err": max(abs(a - b) / b for a, b in zip(mine["singular_values"], sigma)),
               "err_opt_minus_1": mine["frob_error"] / opt - 1,
               "torch_full": full[full_setup], "torch_full_setup": full_setup}
        row["torch_ratio"] = row["torch_full"] / t
        spectra_key = f"BM_spectra_file/{c.name}"
        if spectra_key in results.get("spectra", {}):
            sp = read_result(results["tmp"], c.name, "spectra")
            row["spectra"] = results["spectra"][spectra_key]
            row["spectra_sigma_err"] = max(abs(a - b) / b for a, b in zip(sp["singular_values"], sigma))
            row["spectra_err_opt_minus_1"] = sp["frob_error"] / opt - 1
            row["spectra_converged"] = int(sp["converged"])
            row["spectra_ratio"] = row["spectra"] / t
        rows.append(row)
    return rows


def efficiency_rows(rand_rows, sgemm_gflops, bandwidth):
    rows = []
    for row in rand_rows:
        c = Case(**row["case"])
        element = 2 if c.dtype == "bf16" else 4
        flops = (2 * c.niter + 2) * 2.0 * c.m * c.n * c.r
        for mode in ("reused", "fused"):
            passes = c.niter + 2 if mode == "fused" and c.r <= FUSED_ONE_PASS_MAX_Q else 2 * c.niter + 2
            roofline = passes * c.m * c.n * element / bandwidth
            t = row["pissa"][mode]
            rows.append({"case": c.name, "mode": mode, "time": t, "gflops": flops / t / 1e9,
                         "of_sgemm": flops / t / 1e9 / sgemm_gflops, "passes": passes, "roofline": roofline,
                         "of_roofline": roofline / t})
    return rows


def job_label(c):
    dtype = ", bfloat16" if c.dtype == "bf16" else ""
    return f"{c.m}x{c.n}, r={c.r}, niter={c.niter}{dtype}"


# ---- table printers -----------------------------------------------------------------------------

def print_header(info):
    print(f"# pissa vs peers, {info['date']}; median of {info['repetitions']} "
          f"(torch.linalg.svd: {info['svd_repetitions']}); matrices in {info['tmp']}")
    print(f"# CPU: {info['cpu']}; nproc {info['nproc']}; load average before {info['load_before']}, "
          f"after {info['load_after']}")
    print(f"# limits measured: fastest peer sgemm {info['sgemm_gflops']:.0f} GFLOP/s ({info['sgemm_by']}, "
          f"{SGEMM_SIZE}x{SGEMM_SIZE} float32; {info['sgemm_all']}), read bandwidth {info['bandwidth'] / 1e9:.1f} GB/s "
          "(bench_svd BM_bandwidth/1024)")
    for line in info["setups"]:
        print(f"# {line}")
    for line in info["notes"]:
        print(f"# note: {line}")


def print_randomized_table(rows, dtype, peer_labels, verbose):
    rows = [r for r in rows if r["case"]["dtype"] == dtype]
    if not rows:
        return
    title = "float32" if dtype == "f32" else "bfloat16 (peers: the same values as float32)"
    print(f"\n### Randomized SVD, W stored in {title}\n")
    print("| job | pissa one-off | pissa reused | pissa fused | " + " | ".join(peer_labels)
          + " | fastest peer / pissa reused | fastest peer / pissa fused | err/opt pissa | err/opt pissa fused | "
          + " | ".join(f"err/opt {p}" for p in peer_labels) + " |")
    print("|---" * (8 + 2 * len(peer_labels)) + "|")
    for r in rows:
        c = Case(**r["case"])
        cells = [job_label(c)] + [f"{ms(r['pissa'][m])} ({r['pissa_setup'][m]})" for m in ("randomized", "reused", "fused")]
        for p in peer_labels:
            e = r["peers"][p]
            form = f", {e['form']}" if e.get("form") == "bfloat16" else ""
            cells.append(f"{ms(e['time'])} ({e['setup']}{form})" + (" *" if p == r["fastest_peer"] else ""))
        cells += [f"{r['ratio_reused']:.2f}x", f"{r['ratio_fused']:.2f}x",
                  f"{r['err_opt']['pissa']:.6f}", f"{r['err_opt']['pissa fused']:.6f}"]
        cells += [f"{r['err_opt'][p]:.6f}" for p in peer_labels]
        print("| " + " | ".join(cells) + " |")
    print("\n(* the fastest peer of the row; each entry in its fastest setup, named in parentheses: the header "
          "says what each setup is)")
    if verbose:
        for r in rows:
            v = r["verbose"]
            print(f"  {r['case']['name']}: " + "; ".join(
                f"pissa {m} " + ", ".join(f"{setup} {ms(t)}" for setup, t in v["pissa"][m].items())
                for m in ("randomized", "reused", "fused"))
                + "".join(f"; {p} " + ", ".join(f"{setup} {ms(t)}" for setup, t in times.items())
                          for p, times in v["peers"].items()))
    target = TARGET[dtype]
    for mode in ("reused", "fused"):
        ratios = [r[f"ratio_{mode}"] for r in rows]
        met = sum(x >= target for x in ratios)
        print(f"target met? fastest peer / pissa {mode} >= {target}x on {title.split()[0]} rows: "
              f"{'YES' if met == len(ratios) else 'NO'} ({met} of {len(ratios)} rows; min {min(ratios):.2f}x, "
              f"max {max(ratios):.2f}x)")


def print_efficiency_table(rows, sgemm_gflops, bandwidth):
    print(f"\n### pissa randomized SVD against the limits measured in this run "
          f"(sgemm {sgemm_gflops:.0f} GFLOP/s, bandwidth {bandwidth / 1e9:.1f} GB/s)\n")
    print("| job | pissa | time | products GFLOP/s | / sgemm | passes | bandwidth roofline | roofline / time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['mode']} | {ms(r['time'])} | {r['gflops']:.1f} | {r['of_sgemm']:.2f} | {r['passes']} "
              f"| {ms(r['roofline'])} | {r['of_roofline']:.2f} |")
    print("\n(GFLOP/s = (2K + 2) 2 m n q / time with q = r, the same count for the fused option; roofline = "
          "passes x bytes of W in its storage dtype / bandwidth)")


def print_products_table(pissa_products, blas_products):
    print("\n### Single products, float32: pissa against the fastest peer sgemm per shape\n")
    print("| shape | pissa W X | sgemm W X | sgemm / pissa | pissa W^T Y | sgemm W^T Y | sgemm / pissa |")
    print("|---|---|---|---|---|---|---|")
    for m, n, q in PRODUCTS:
        cells = [f"{m}x{n}, q={q}"]
        for bench, op in (("", "W X"), ("_t", "W^T Y")):
            mine = pissa_products[f"BM_multiply{bench}<float>/{m}/{n}/{q}"]
            label, blas = min(((k, v[f"{m}x{n}x{q}"][op]) for k, v in blas_products.items()), key=lambda kv: kv[1])
            cells += [f"{mine * 1e3:.2f} ms", f"{blas * 1e3:.2f} ms ({label})", f"{blas / mine:.2f}x"]
        print("| " + " | ".join(cells) + " |")


def print_exact_table(rows, spectra_tol):
    if not rows:
        return
    have_spectra = any("spectra" in r for r in rows)
    print(f"\n### Exact top-r: pissa block Krylov, Spectra PartialSVDSolver (ncv = 2r + 1, tol {spectra_tol:g}), "
          "torch.linalg.svd (full)\n")
    print("| exact top-r | pissa | cycles | residual bound | max rel. σ error pissa | err/opt - 1 pissa | Spectra "
          "| max rel. σ error Spectra | err/opt - 1 Spectra | torch.linalg.svd | Spectra / pissa | torch.linalg.svd / pissa |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = Case(**r["case"])
        sp = [ms(r["spectra"]) + ("" if r["spectra_converged"] >= c.r else f" ({r['spectra_converged']} of {c.r} converged)"),
              f"{r['spectra_sigma_err']:.2e}", f"{r['spectra_err_opt_minus_1']:.2e}"] if "spectra" in r else ["-"] * 3
        print(f"| {c.m}x{c.n}, r={c.r} | {ms(r['pissa'])} ({r['pissa_setup']}) | {r['cycles']} | {r['residual_bound']:.2e} "
              f"| {r['sigma_err']:.2e} | {r['err_opt_minus_1']:.2e} | " + " | ".join(sp)
              + f" | {r['torch_full']:.2f} s ({r['torch_full_setup']}) "
              f"| {format(r['spectra_ratio'], '.2f') + 'x' if 'spectra' in r else '-'} | {r['torch_ratio']:.1f}x |")
    torch_ratios = [r["torch_ratio"] for r in rows]
    met = sum(x >= EXACT_TARGET_TORCH for x in torch_ratios)
    line = (f"target met? torch.linalg.svd / pissa >= {EXACT_TARGET_TORCH:g}x: {'YES' if met == len(rows) else 'NO'} "
            f"({met} of {len(rows)}; min {min(torch_ratios):.1f}x)")
    if have_spectra:
        sp_ratios = [r["spectra_ratio"] for r in rows if "spectra" in r]
        sp_met = sum(x > EXACT_TARGET_SPECTRA for x in sp_ratios)
        line += (f"; faster than Spectra: {'YES' if sp_met == len(sp_ratios) else 'NO'} ({sp_met} of {len(sp_ratios)}; "
                 f"min {min(sp_ratios):.2f}x)")
    else:
        line += "; faster than Spectra: not measured"
    print(line)


# ---- the plot (SVG by hand: no plotting dependency) ----------------------------------------------

def write_svg(path, rand_rows, ex_rows):
    """Ratios per row on a log axis, one panel per table, with the 1x and the target lines."""
    def esc(text):
        return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    panels = []
    for dtype in DTYPES:
        rows = [r for r in rand_rows if r["case"]["dtype"] == dtype]
        if rows:
            panels.append((f"Randomized SVD, W in {'float32' if dtype == 'f32' else 'bfloat16'}: fastest peer / pissa",
                           [(job_label(Case(**r["case"])), [("pissa reused", r["ratio_reused"], "#1f77b4"),
                                                            ("pissa fused", r["ratio_fused"], "#6baed6")]) for r in rows],
                           [(TARGET[dtype], f"target {TARGET[dtype]:g}x", "#2ca02c")]))
    if ex_rows:
        panels.append(("Exact top-r: peer / pissa",
                       [(f"{r['case']['m']}x{r['case']['n']}, r={r['case']['r']}",
                         [("torch.linalg.svd / pissa", r["torch_ratio"], "#d62728")]
                         + ([("Spectra / pissa", r["spectra_ratio"], "#ff7f0e")] if "spectra" in r else []))
                        for r in ex_rows],
                       [(EXACT_TARGET_TORCH, f"target {EXACT_TARGET_TORCH:g}x vs torch", "#d62728"),
                        (EXACT_TARGET_SPECTRA, "target vs Spectra: > 1x", "#ff7f0e")]))
    values = [v for _, groups, _ in panels for _, bars in groups for _, v, _ in bars]
    lo = min([0.5] + [v / 1.3 for v in values])
    hi = max([20.0] + [v * 1.3 for v in values])
    left, plot_w, right, bar, gap = 230, 460, 30, 9, 10
    width = left + plot_w + right

    def x_of(v):
        import math

        return left + plot_w * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

    ticks = [t for t in (0.5, 1, 1.5, 2, 3, 5, 10, 20, 50, 100, 200, 500) if lo <= t <= hi]
    body, y = ['<text x="10" y="20" font-size="14" font-weight="bold">peer time / pissa time per row '
               '(> 1: pissa faster; log scale)</text>'], 45
    legend = {}
    for title, groups, targets in panels:
        body.append(f'<text x="10" y="{y}" font-weight="bold">{esc(title)}</text>')
        top = y + 10
        heights = [len(bars) * bar + gap for _, bars in groups]
        bottom = top + sum(heights)
        for t in ticks:
            body.append(f'<line x1="{x_of(t):.1f}" y1="{top}" x2="{x_of(t):.1f}" y2="{bottom}" stroke="#ddd"/>')
            body.append(f'<text x="{x_of(t):.1f}" y="{bottom + 14}" text-anchor="middle" fill="#555">{t:g}x</text>')
        gy = top
        for (label, bars), h in zip(groups, heights):
            body.append(f'<text x="{left - 6}" y="{gy + len(bars) * bar / 2 + 3:.1f}" text-anchor="end">{esc(label)}</text>')
            for i, (name, v, colour) in enumerate(bars):
                x0, x1 = x_of(min(1.0, v)), x_of(max(1.0, v))
                body.append(f'<rect x="{x0:.1f}" y="{gy + i * bar}" width="{max(x1 - x0, 1):.1f}" height="{bar - 1}" '
                            f'fill="{colour}"><title>{esc(name)}: {v:.2f}x</title></rect>')
                legend[name] = colour
            gy += h
        body.append(f'<line x1="{x_of(1):.1f}" y1="{top - 4}" x2="{x_of(1):.1f}" y2="{bottom}" stroke="black"/>')
        for v, name, colour in targets:
            body.append(f'<line x1="{x_of(v):.1f}" y1="{top - 4}" x2="{x_of(v):.1f}" y2="{bottom}" stroke="{colour}" '
                        f'stroke-dasharray="5,3"/>')
            body.append(f'<text x="{x_of(v) + 3:.1f}" y="{bottom + 27}" fill="{colour}" font-size="10">{esc(name)}</text>')
        y = bottom + 50
    for i, (name, colour) in enumerate(legend.items()):
        lx, ly = left + (i % 2) * 240, y + (i // 2) * 16
        body.append(f'<rect x="{lx}" y="{ly - 9}" width="12" height="9" fill="{colour}"/>')
        body.append(f'<text x="{lx + 18}" y="{ly}">{esc(name)}</text>')
    height = y + 16 * ((len(legend) + 1) // 2) + 10
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>'] + body + ["</svg>"]
    with open(path, "w") as f:
        f.write("\n".join(svg) + "\n")


# ---- main ---------------------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default="", help="the bench_svd binary (default: build/bench/bench_svd, else "
                    "build/release/bench/bench_svd)")
    ap.add_argument("--spectra", default="", help="the bench_spectra binary (default: beside bench_svd; skipped with a "
                    "note if missing)")
    ap.add_argument("--spectra-tol", type=float, default=1e-4, help="Spectra's tolerance (PartialSVDSolver.compute)")
    ap.add_argument("--python", default="", help="the peers' interpreter (default: scripts/python-env.sh's venv)")
    ap.add_argument("--debian-python", default="/usr/bin/python3",
                    help="interpreter of the sklearn-debian peer (skipped if it cannot import sklearn)")
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--svd-repetitions", type=int, default=1, help="runs of the full torch.linalg.svd (seconds each)")
    ap.add_argument("--quick", action="store_true", help=f"only {QUICK}")
    ap.add_argument("--cases", default="", help="comma-separated row or base names")
    ap.add_argument("--dtypes", default="f32,bf16", help="storage dtypes of W: f32, bf16 or both")
    ap.add_argument("--tmp", default="", help="folder for the matrices and results (default: a new temporary one)")
    ap.add_argument("--verbose", action="store_true", help="every threading setup's time per row")
    ap.add_argument("--no-products", action="store_true", help="skip the single-product table")
    ap.add_argument("--openblas-coretype", default="auto",
                    help="Debian OpenBLAS kernel of sklearn-debian: auto (the fastest of the default and the CPU's "
                         "own, probed), default (no override) or an OPENBLAS_CORETYPE name")
    ap.add_argument("--plot", default="", help="write an SVG of the ratios to this file")
    ap.add_argument("--json", default="", help="write every raw result and derived figure to this file")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--setup", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main():
    argv = sys.argv[1:]
    whole_job_argv = None
    if "--whole-job" in argv:
        i = argv.index("--whole-job")
        argv, whole_job_argv = argv[:i], argv[i + 1:]
    args = parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    if any(d not in DTYPES for d in dtypes):
        raise SystemExit(f"compare_peers: --dtypes takes {', '.join(DTYPES)}")
    names = [c for c in args.cases.split(",") if c] or (
        QUICK if args.quick else [b[0] for b in BASE_CASES if not b[0].startswith("tiny")])
    cases = select_cases(names, dtypes)
    if args.worker:
        worker_main(args, cases)
        return
    if not cases:
        raise SystemExit(f"compare_peers: no rows match --cases {args.cases} --dtypes {args.dtypes}")
    exact = [c for c in cases if c.base in EXACT and c.dtype == "f32"]
    if not args.bench:
        candidates = [os.path.join(ROOT, "build", *d, "bench", "bench_svd") for d in ((), ("release",))]
        args.bench = next((p for p in candidates if os.path.exists(p)), candidates[0])
    args.spectra = args.spectra or os.path.join(os.path.dirname(args.bench), "bench_spectra")
    python = args.python or default_python()
    args.tmp = args.tmp or tempfile.mkdtemp(prefix="pissa-peers-")
    os.makedirs(args.tmp, exist_ok=True)
    cpu = cpu_info()
    flags = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in cpu["flags"]]
    notes = []

    run_worker(python, "generate", args, cases, {})
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())

    # pissa, both wait policies, and its limits
    pissa_runs = {setup: run_pissa(args.bench, args.tmp, cases, exact, args.repetitions, not args.no_products, env)
                  for setup, env in PISSA_SETUPS.items()}
    pissa_times = {setup: times for setup, (times, _) in pissa_runs.items()}
    bandwidth = max(bw for _, bw in pissa_runs.values())
    pissa_setup = {k: min(pissa_times, key=lambda setup: pissa_times[setup][k]) for k in pissa_times["default"]}
    pissa_best = {k: pissa_times[setup][k] for k, setup in pissa_setup.items()}
    pissa_products = {k: v for k, v in pissa_best.items() if k.startswith("BM_multiply")}

    spectra = {}
    if exact and os.path.exists(args.spectra):
        spectra = run_spectra(args.spectra, args.tmp, exact, args.repetitions, args.spectra_tol)
    elif exact:
        notes.append(f"Spectra skipped: {args.spectra} not found (build the bench_spectra target; needs libspectra-dev)")

    peers, debian_blas_line = run_peers(args, python, cases, notes)
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())

    setups = [f"pissa: {os.path.abspath(args.bench)}, OpenMP (OMP_NUM_THREADS="
              f"{os.environ.get('OMP_NUM_THREADS', 'unset')}); setups: default (all cores, GNU OpenMP's spinning wait "
              "policy), passive (OMP_WAIT_POLICY=PASSIVE), 1 thread (OMP_NUM_THREADS=1)",
              f"peers' interpreter: {python}"] + peer_setup_lines(peers, debian_blas_line)
    if spectra:
        setups.append(f"Spectra: {os.path.abspath(args.spectra)}, PartialSVDSolver<MatrixXf> (column-major float32, "
                      f"Eigen's products), ncv = 2r + 1, tol {args.spectra_tol:g}")
    bf16_direct = peers["torch.svd_lowrank"]["default"]["bf16_direct"]
    if any(c.dtype == "bf16" for c in cases):
        notes.append("bf16 rows: the peers get the bfloat16-rounded W widened to float32; the widening is not "
                     "counted in their times; err/opt is against the optimum of the bfloat16-rounded matrix")
        notes.append("torch.svd_lowrank on a bfloat16 CPU tensor: " +
                     (f"fails ({bf16_direct}), so float32 only" if bf16_direct else "runs: both forms timed, faster kept"))
    sgemm_all = {f"{MATMUL[peer]} {setup}": out["sgemm_gflops"] for peer, outs in peers.items()
                 for setup, out in outs.items() if "sgemm_gflops" in out}
    sgemm_by = max(sgemm_all, key=sgemm_all.get)

    results = {"tmp": args.tmp, "reference": peers["torch.svd_lowrank"]["default"]["reference"], "peers": peers,
               "spectra": spectra,
               "pissa": {"best": pissa_best, "setup": pissa_setup, "setups": pissa_times, "products": pissa_products}}
    rand = randomized_rows(results, cases)
    for r in rand:
        name = r["case"]["name"]
        r["verbose"] = {"pissa": {m: {setup: times[f"BM_file_{m}/{name}"] for setup, times in pissa_times.items()}
                                  for m in ("randomized", "reused", "fused")},
                        "peers": {p: {setup: out["rows"][name]["time"] for setup, out in outs.items()}
                                  for p, outs in peers.items()}}
    ex = exact_rows(results, exact)
    eff = efficiency_rows(rand, sgemm_all[sgemm_by], bandwidth)
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": f"{cpu['model']}, flags: {' '.join(flags) or 'none of avx512f avx512_bf16 amx_bf16'}",
            "nproc": os.cpu_count(), "load_before": load_before, "load_after": load_after,
            "repetitions": args.repetitions, "svd_repetitions": args.svd_repetitions, "tmp": args.tmp,
            "sgemm_gflops": sgemm_all[sgemm_by], "sgemm_by": sgemm_by,
            "sgemm_all": ", ".join(f"{k} {v:.0f}" for k, v in sgemm_all.items()), "bandwidth": bandwidth,
            "setups": setups, "notes": notes}

    print_header(info)
    peer_labels = list(peers)
    for dtype in DTYPES:
        print_randomized_table(rand, dtype, peer_labels, args.verbose)
    print_efficiency_table(eff, sgemm_all[sgemm_by], bandwidth)
    if not args.no_products:
        blas_products = {f"{MATMUL[peer]} {setup}": out["products"] for peer, outs in peers.items()
                         for setup, out in outs.items() if out.get("products")}
        print_products_table(pissa_products, blas_products)
    print_exact_table(ex, args.spectra_tol)

    if args.plot:
        write_svg(args.plot, rand, ex)
        print(f"\n(plot: {args.plot})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results, "randomized": rand, "efficiency": eff, "exact": ex}, f, indent=1)
        print(f"(raw results: {args.json})")
    if whole_job_argv is not None:
        run_whole_job(python, whole_job_argv)


def run_whole_job(python, argv):
    """The whole-job comparison (bench/whole_job.py, when present) with the arguments after
    --whole-job, in the peers' interpreter (it needs torch, transformers and peft)."""
    script = os.path.join(HERE, "whole_job.py")
    if not os.path.exists(script):
        print("\n# note: --whole-job: bench/whole_job.py is not there; whole-job comparison skipped")
        return
    print("\n### The whole job: pissa init against peft's path (bench/whole_job.py)\n", flush=True)
    subprocess.run([python, script] + list(argv), check=True)


if __name__ == "__main__":
    main()
