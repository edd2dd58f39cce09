#!/usr/bin/env python3
"""pissa.get_peft_model against peft.get_peft_model: the wall time of initialising PiSSA adapters on
one model, the two calls interleaved in one process (median of --repetitions), each on a fresh
copy of the same model (the copy is not timed).

The model is a LlamaForCausalLM built from a config with random weights (no download), all seven
projections targeted. peft runs torch's own kernels (torch.linalg.svd for "pissa",
torch.svd_lowrank for "pissa_niter_K") with torch.set_num_threads(--threads); pissa runs OpenMP
with the same number of threads. Both are printed with the setup.

Usage: python bench/python/bench_peft_init.py [--hidden 2048] [--intermediate 5504] [--layers 2]
       [--rank 16] [--method pissa_niter_4] [--dtype bfloat16] [--repetitions 3] [--threads 2]
Needs the test venv (scripts/python-env.sh) with the package installed (scripts/test-python.sh).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import LoraConfig
from peft import get_peft_model as peft_get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import pissa

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5504)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--method", default="pissa_niter_4")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    pissa.set_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(getattr(torch, args.dtype)).eval()
    lora = dict(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, init_lora_weights=args.method)
    print(f"# model: Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
          f"{args.dtype}, {len(TARGETS) * args.layers} target matrices; r {args.rank}, {args.method}")
    print(f"# torch {torch.__version__} threads {torch.get_num_threads()} ({torch.__config__.parallel_info().splitlines()[0]}); "
          f"pissa {pissa.__version__} threads {pissa.threads()}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")

    times = {"peft": [], "pissa": []}
    for rep in range(args.repetitions):
        for name in ("peft", "pissa") if rep % 2 == 0 else ("pissa", "peft"):
            m = copy.deepcopy(model)
            start = time.perf_counter()
            if name == "peft":
                peft_get_peft_model(m, LoraConfig(**lora))
            else:
                pissa.get_peft_model(m, LoraConfig(**lora), seed=rep)
            times[name].append(time.perf_counter() - start)
            del m
    peft_s, pissa_s = statistics.median(times["peft"]), statistics.median(times["pissa"])
    print("| call | median s | runs |")
    print("|---|---|---|")
    print(f"| peft.get_peft_model | {peft_s:.3f} | {', '.join(f'{t:.3f}' for t in times['peft'])} |")
    print(f"| pissa.get_peft_model | {pissa_s:.3f} | {', '.join(f'{t:.3f}' for t in times['pissa'])} |")
    print(f"speedup (peft / pissa): {peft_s / pissa_s:.2f}x")


if __name__ == "__main__":
    main()
