#!/usr/bin/env python3
"""The whole job, the user's figure: `pissa init` against peft's own path on one checkpoint.

On a Llama-shaped bf16 checkpoint (generated once with `pissa generate` and cached in the work
folder), all seven projections targeted, for each rank, in one run and on the same machine:

  * copy+sync: the checkpoint folder's files copied into a fresh folder with os.sendfile and an
    fsync per file: the floor for reading and writing the same bytes;
  * pissa: `pissa init MODEL --out OUT --rank R --niter K --targets ... --json`, the default
    durability (see docs/guarantees.md); "decomp" is the sum of the per-module seconds its JSON
    reports (each: reading the weight from the page cache into its buffer, the randomized SVD and
    the split in place);
  * peft: in its own process (torch threads = --peft-threads), peft's documented PiSSA recipe:
    AutoModelForCausalLM.from_pretrained(MODEL, torch_dtype=bfloat16), get_peft_model(model,
    LoraConfig(r=R, lora_alpha=R, target_modules=[7], init_lora_weights="pissa_niter_K")), the
    adapter saved with init_lora_weights=True (peft_model.save_pretrained(OUT/pissa_init)), then
    the residual model (peft_model.unload().save_pretrained(OUT)). peft does not fsync.

Each measured process runs alone; its wall time, user and system CPU, peak RSS, minor faults and
block I/O come from wait4(2). Page cache: "warm" reads the checkpoint once first; "cold" drops the
page cache before every measured run (`sync; echo 3 > /proc/sys/vm/drop_caches`, root only: the
table says when it could not). The runs of one repetition go copy, pissa, peft, alternating the
order of pissa and peft from one repetition to the next; the table shows medians.

Agreement: pissa's and peft's outputs use different random test matrices, so they are compared
by norms on one weight (layer 0 gate_proj): ||W_res||_F of the residuals and ||B A||_F of the
adapters, within 1e-2 relative.

Usage: python bench/whole_job.py --pissa build/release/tools/pissa/pissa [--layers 2]
       [--ranks 16,128] [--repetitions 3] [--cache warm|cold] [--pissa-threads 1,2]
       [--peft-threads 2] [--json FILE] [--no-peft]
Importable: whole_job.main(argv) runs the same and returns the results as a dict.
Needs the project's venv (scripts/python-env.sh: torch, transformers, peft, safetensors).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHECK_TENSOR = "model.layers.0.mlp.gate_proj"
GNU_TIME = "/usr/bin/time"


# ---------------------------------------------------------------------------------------------
# Measured child processes


def measure(cmd, env=None, cwd=None):
    """Runs `cmd`; returns its stdout and wall / user / sys seconds, peak RSS and I/O from wait4."""
    # ru_maxrss of a forked child counts the parent's pages at the fork: GNU time, itself small,
    # reports the measured program's own peak instead.
    rss_file = None
    if os.access(GNU_TIME, os.X_OK):
        fd, rss_file = tempfile.mkstemp(prefix="whole-job-rss-")
        os.close(fd)
        cmd = [GNU_TIME, "-f", "%M", "-o", rss_file] + list(cmd)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    # wait4 reaps the child with its own rusage; communicate() first would reap it without.
    out_chunks, err_chunks = [], []
    import threading

    def drain(stream, sink):
        for chunk in iter(lambda: stream.read(65536), b""):
            sink.append(chunk)

    threads = [threading.Thread(target=drain, args=(proc.stdout, out_chunks)),
               threading.Thread(target=drain, args=(proc.stderr, err_chunks))]
    for t in threads:
        t.start()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    for t in threads:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = b"".join(out_chunks).decode(), b"".join(err_chunks).decode()
    max_rss_mb = ru.ru_maxrss / 1024.0
    if rss_file:
        with open(rss_file) as f:
            text = f.read().strip().splitlines()
        os.unlink(rss_file)
        if text and text[-1].isdigit():
            max_rss_mb = int(text[-1]) / 1024.0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-4000:]}")
    return stdout, {
        "wall_s": wall,
        "user_s": ru.ru_utime,
        "sys_s": ru.ru_stime,
        "max_rss_mb": max_rss_mb,
        "minor_faults": ru.ru_minflt,
        "major_faults": ru.ru_majflt,
        "read_mb": ru.ru_inblock * 512 / 1e6,
        "written_mb": ru.ru_oublock * 512 / 1e6,
        "voluntary_switches": ru.ru_nvcsw,
    }


def child_copy(src, dst):
    """copy+sync: every file of folder `src` into the new folder `dst`, fsync per file and folder."""
    os.makedirs(dst)
    for name in sorted(os.listdir(src)):
        s = os.path.join(src, name)
        if not os.path.isfile(s):
            continue
        with open(s, "rb") as fin, open(os.path.join(dst, name), "wb") as fout:
            size = os.fstat(fin.fileno()).st_size
            done = 0
            while done < size:
                n = os.sendfile(fout.fileno(), fin.fileno(), done, min(size - done, 1 << 30))
                if n == 0:
                    break
                done += n
            os.fsync(fout.fileno())
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def child_peft(model, out, rank, niter, threads):
    """peft's PiSSA recipe (see the module docstring); prints the phases' seconds as JSON."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    phases = {}
    t = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.bfloat16)
    phases["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    pm = get_peft_model(m, LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS,
                                      init_lora_weights=f"pissa_niter_{niter}"))
    phases["init_s"] = time.perf_counter() - t
    t = time.perf_counter()
    pm.peft_config["default"].init_lora_weights = True  # loading the adapter must not decompose again
    pm.save_pretrained(os.path.join(out, "pissa_init"))
    phases["save_adapter_s"] = time.perf_counter() - t
    t = time.perf_counter()
    base = pm.unload()
    base.save_pretrained(out)
    phases["save_residual_s"] = time.perf_counter() - t
    import peft
    import transformers
    phases["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                          "peft": peft.__version__, "torch_threads": torch.get_num_threads()}
    print(json.dumps(phases))


# ---------------------------------------------------------------------------------------------
# The benchmark


def drop_caches():
    """Drops the page cache; False when not permitted."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def warm(path):
    for name in os.listdir(path):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass


def folder_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(root, name))
    return total


def norms(residual_dir, adapter_dir):
    """||W_res||_F of CHECK_TENSOR and ||B A||_F of its adapter, from safetensors files."""
    import torch
    from safetensors import safe_open

    def find(folder, suffix):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(folder, name), "pt") as f:
                    for key in f.keys():
                        if key.endswith(suffix):
                            return f.get_tensor(key)
        raise KeyError(f"{suffix} not in {folder}")

    w = find(residual_dir, CHECK_TENSOR + ".weight").float()
    a = find(adapter_dir, CHECK_TENSOR + ".lora_A.weight").float()
    b = find(adapter_dir, CHECK_TENSOR + ".lora_B.weight").float()
    return float(torch.linalg.norm(w)), float(torch.linalg.norm(b @ a))


def median_of(runs, key):
    return statistics.median(r[key] for r in runs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pissa", required=True, help="the pissa tool (build/release/tools/pissa/pissa)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--ranks", default="16,128")
    p.add_argument("--niter", type=int, default=4)
    p.add_argument("--repetitions", type=int, default=1)
    p.add_argument("--pissa-threads", default=str(os.cpu_count()),
                   help="comma-separated pissa --threads settings, one row each (default: all cores)")
    p.add_argument("--peft-threads", default=str(os.cpu_count()),
                   help="comma-separated torch thread counts of peft's process, one row each (default: all cores)")
    p.add_argument("--cache", choices=["warm", "cold"], default="warm", help="page cache before each run")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "pissa-whole-job"),
                   help="where the checkpoint is cached and the outputs are written (same file system)")
    p.add_argument("--no-peft", action="store_true", help="skip peft's path")
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args(argv)
    pissa_bin = os.path.abspath(args.pissa)
    ranks = [int(r) for r in args.ranks.split(",")]
    pissa_threads = [int(t) for t in args.pissa_threads.split(",")]
    peft_threads = [int(t) for t in args.peft_threads.split(",")]
    work = os.path.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)

    shape = f"L{args.layers}-h{args.hidden}-i{args.intermediate}-v{args.vocab}-a{args.heads}"
    model = os.path.join(work, "model-" + shape)
    if not os.path.exists(os.path.join(model, "model.safetensors")):
        print(f"# generating {model}", file=sys.stderr)
        subprocess.run([pissa_bin, "generate", "--out", model, "--force", "--layers", str(args.layers), "--hidden",
                        str(args.hidden), "--intermediate", str(args.intermediate), "--vocab", str(args.vocab),
                        "--heads", str(args.heads)], check=True, stdout=subprocess.DEVNULL)
    model_bytes = folder_bytes(model)
    out = os.path.join(work, "out")
    here = os.path.abspath(__file__)

    cache_note = args.cache
    if args.cache == "cold" and not drop_caches():
        cache_note = "warm (cold asked for, but dropping the page cache needs root)"

    def prepare():
        shutil.rmtree(out, ignore_errors=True)
        if args.cache == "cold" and cache_note == "cold":
            drop_caches()
        else:
            warm(model)

    def run_copy():
        prepare()
        _, m = measure([sys.executable, here, "_copy", model, out])
        return m

    def child_norms():
        stdout, _ = measure([sys.executable, here, "_norms", out, os.path.join(out, "pissa_init")])
        return json.loads(stdout)

    def run_pissa(rank, threads):
        prepare()
        cmd = [pissa_bin, "init", model, "--out", out, "--rank", str(rank), "--niter", str(args.niter),
               "--targets", ",".join(TARGETS), "--threads", str(threads), "--json"]
        stdout, m = measure(cmd)
        report = json.loads(stdout)
        m["decomp_s"] = sum(x["seconds"] for x in report["modules"])
        m["modules"] = len(report["modules"])
        m["output_mb"] = folder_bytes(out) / 1e6
        m["norms"] = child_norms()
        return m

    def run_peft(rank, threads):
        prepare()
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        stdout, m = measure([sys.executable, here, "_peft", model, out, str(rank), str(args.niter),
                             str(threads)], env=env)
        m.update(json.loads(stdout.strip().splitlines()[-1]))
        m["output_mb"] = folder_bytes(out) / 1e6
        m["norms"] = child_norms()
        return m

    results = {"copy": [], "pissa": {(r, t): [] for r in ranks for t in pissa_threads},
               "peft": {(r, t): [] for r in ranks for t in peft_threads}}
    for rep in range(args.repetitions):
        results["copy"].append(run_copy())
        for rank in ranks:
            jobs = [("pissa", t) for t in pissa_threads] + ([] if args.no_peft else [("peft", t) for t in peft_threads])
            for who, threads in (jobs if rep % 2 == 0 else jobs[::-1]):
                run = run_pissa(rank, threads) if who == "pissa" else run_peft(rank, threads)
                results[who][(rank, threads)].append(run)
    shutil.rmtree(out, ignore_errors=True)

    versions = {}
    for runs in results["peft"].values():
        for run in runs:
            versions = {k: v for k, v in run.get("versions", {}).items() if k != "torch_threads"}
    pissa_version = subprocess.run([pissa_bin, "--version"], capture_output=True, text=True).stdout.strip()
    setup = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "pissa": pissa_version,
        "pissa_threads": pissa_threads,
        "peft_threads": peft_threads,
        "peft_setup": versions,
        "page_cache": cache_note,
        "durability": "pissa: journaled work folder, fdatasync of every module's bytes before its journal "
                      "record, fsync of the adapter, atomic renames (docs/guarantees.md); peft: no fsync; "
                      "copy+sync: fsync per file",
        "checkpoint": {"path": model, "bytes": model_bytes, "layers": args.layers, "hidden": args.hidden,
                       "intermediate": args.intermediate, "vocab": args.vocab, "targets": TARGETS},
        "repetitions": args.repetitions,
    }

    print(f"# checkpoint: Llama-shaped bf16, {args.layers} layers, hidden {args.hidden}, intermediate "
          f"{args.intermediate}, vocab {args.vocab}: {model_bytes / 1e6:.0f} MB; targets {','.join(TARGETS)}; "
          f"niter {args.niter}")
    print(f"# {setup['machine']}, {setup['cpus']} CPUs, Linux {setup['kernel']}; {pissa_version}, --threads "
          f"{args.pissa_threads}; peft: {versions or 'not run'}, torch threads {args.peft_threads}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print(f"# page cache: {cache_note}; durability: {setup['durability']}")
    print(f"# medians of {args.repetitions} repetition(s)")
    print()
    cols = ["wall_s", "user_s", "sys_s", "max_rss_mb", "minor_faults", "read_mb", "written_mb"]
    print("| job | wall s | user s | sys s | peak RSS MB | minor faults | read MB | written MB | decomp s |"
          " peft / pissa | pissa / max(decomp, copy+sync) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    copy = {k: median_of(results["copy"], k) for k in cols}

    def row(name, m, extra=("", "", "")):
        print(f"| {name} | {m['wall_s']:.2f} | {m['user_s']:.2f} | {m['sys_s']:.2f} | {m['max_rss_mb']:.0f} | "
              f"{m['minor_faults']:.0f} | {m['read_mb']:.0f} | {m['written_mb']:.0f} | {extra[0]} | {extra[1]} | "
              f"{extra[2]} |")

    row("copy+sync", copy)
    summary = {"copy": copy, "ranks": {}}
    for rank in ranks:
        entry = {"pissa": {}, "peft": {}}
        for t in peft_threads:
            runs = results["peft"][(rank, t)]
            if runs:
                pf = {k: median_of(runs, k) for k in cols + ["load_s", "init_s", "save_adapter_s", "save_residual_s"]}
                entry["peft"][t] = pf
                row(f"peft r={rank}, {t} thread{'s' if t > 1 else ''}", pf)
        best_peft = min((pf["wall_s"] for pf in entry["peft"].values()), default=None)
        for t in pissa_threads:
            pr = {k: median_of(results["pissa"][(rank, t)], k) for k in cols + ["decomp_s"]}
            pr["over_floor"] = pr["wall_s"] / max(pr["decomp_s"], copy["wall_s"])
            if best_peft is not None:
                pr["fastest_peft_over_pissa"] = best_peft / pr["wall_s"]
            entry["pissa"][t] = pr
            row(f"pissa init r={rank}, --threads {t}", pr,
                (f"{pr['decomp_s']:.2f}", f"{pr['fastest_peft_over_pissa']:.2f}x" if best_peft else "",
                 f"{pr['over_floor']:.2f}x"))
        summary["ranks"][rank] = entry
    print()
    print("peft / pissa: the fastest peft row of the rank over the pissa row.")
    for rank in ranks:
        e = summary["ranks"][rank]
        for t, pf in e["peft"].items():
            print(f"peft r={rank}, {t} threads, phases (s): load {pf['load_s']:.2f}, get_peft_model "
                  f"{pf['init_s']:.2f}, save adapter {pf['save_adapter_s']:.2f}, unload + save residual "
                  f"{pf['save_residual_s']:.2f}")
        if e["peft"]:
            pn = results["pissa"][(rank, pissa_threads[0])][-1]["norms"]
            fn = results["peft"][(rank, peft_threads[0])][-1]["norms"]
            rel = [abs(a - b) / max(abs(b), 1e-30) for a, b in zip(pn, fn)]
            ok = all(r <= 1e-2 for r in rel)
            e["agreement"] = {"pissa": pn, "peft": fn, "relative": rel, "ok": ok}
            print(f"agreement r={rank} on {CHECK_TENSOR}: ||W_res||_F pissa {pn[0]:.4f} peft {fn[0]:.4f}, "
                  f"||B A||_F pissa {pn[1]:.4f} peft {fn[1]:.4f}: relative {rel[0]:.1e} / {rel[1]:.1e} "
                  f"{'ok' if ok else 'DIFFERENT'}")
    results = {who: ({f"r{k[0]}-t{k[1]}": v for k, v in runs.items()} if isinstance(runs, dict) else runs)
               for who, runs in results.items()}
    result = {"setup": setup, "summary": summary, "runs": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_copy":
        child_copy(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "_norms":
        print(json.dumps(norms(sys.argv[2], sys.argv[3])))
    elif len(sys.argv) > 1 and sys.argv[1] == "_peft":
        child_peft(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        main(sys.argv[1:])
