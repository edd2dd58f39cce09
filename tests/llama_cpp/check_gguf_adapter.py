#!/usr/bin/env python3
"""End-to-end check of `pissa export-gguf` with llama.cpp itself (a manual check, not part of the suite).

For each case a tiny random model (Llama, Mistral or Qwen2 family, float32) is written with a small
SentencePiece tokenizer, and:

1. `pissa init MODEL --out RES ...` writes the residual model RES and the PiSSA adapter RES/pissa_init;
2. llama.cpp's convert_hf_to_gguf.py converts MODEL and RES to F32 GGUF files;
3. `pissa export-gguf RES/pissa_init --arch ARCH --base MODEL --dtype f32` writes the adapter GGUF;
4. llama.cpp (through llama-cpp-python) computes the logits of a fixed sequence of token ids with
   - the original model's GGUF,
   - the residual model's GGUF with the adapter (`--lora`),
   - the residual model's GGUF alone (a control: without the adapter the logits must differ);
   and transformers computes the logits of MODEL and RES in float32.

Since W = W_res + s B A, the residual model with the adapter must give the original model's logits up
to float rounding. Differences are reported as max |x - y| / max |reference|; the check fails (exit 1)
when one that must be small exceeds --tol, or when the control is not clearly larger than --tol (the
adapter would then not be tested at all).

Needs: torch, transformers, safetensors, numpy, sentencepiece, llama-cpp-python (its `llama_cpp`
module), and a llama.cpp source tree for convert_hf_to_gguf.py (which uses the gguf-py beside it).
See README.md beside this file.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()

LLAMA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
VOCAB = 128
N_TOKENS = 24


@dataclass
class Case:
    name: str
    arch: str  # pissa export-gguf --arch: llama, mistral or qwen2
    init_args: list[str]
    seed: int
    expect_folded: bool = False
    notes: str = ""
    results: dict[str, float] = field(default_factory=dict)


CASES = [
    Case("llama", "llama", ["--rank", "4", "--targets", LLAMA_TARGETS], seed=1),
    Case("llama-patterns", "llama",
         ["--rank", "4", "--targets", LLAMA_TARGETS + ",lm_head", "--rank-pattern", "v_proj=2",
          "--alpha-pattern", "o_proj=16", "--rslora"], seed=2, expect_folded=True,
         notes="rank_pattern + alpha_pattern + rsLoRA (scaling folded into B), lm_head -> output"),
    Case("mistral", "mistral", ["--rank", "4", "--targets", LLAMA_TARGETS], seed=3),
    Case("qwen2", "qwen2", ["--rank", "4", "--targets", LLAMA_TARGETS], seed=4),
    Case("qwen2-patterns", "qwen2",
         ["--rank", "4", "--targets", LLAMA_TARGETS + ",lm_head", "--rank-pattern", "v_proj=2",
          "--alpha-pattern", "o_proj=16", "--rslora"], seed=5, expect_folded=True,
         notes="rank_pattern + alpha_pattern + rsLoRA (scaling folded into B), lm_head -> output"),
]

# Text the tokenizer is trained on; the tokenizer only has to exist for convert_hf_to_gguf.py (the
# logits are computed from token ids).
TOKENIZER_TEXT = """\
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.
Principal singular values and singular vectors adaptation of large language models.
A residual model keeps the minor components; the adapter starts from the principal ones.
Low rank adapters train two small matrices instead of the full weight of every layer.
llama.cpp loads a base model and applies a LoRA adapter at inference time on the fly.
Sphinx of black quartz, judge my vow. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump! The five boxing wizards jump quickly.
Numbers 0 1 2 3 4 5 6 7 8 9 and symbols , . ; : ! ? ( ) - + = / * appear here too.
"""


def make_model(arch: str, seed: int):
    """A tiny random float32 model: hidden 64, 4 heads of 16, 2 key/value heads, 2 layers, untied lm_head.
    The weights are drawn with a larger spread than transformers' default (0.02) so the logits are not flat."""
    import transformers

    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                  tie_word_embeddings=False, rms_norm_eps=1e-5, initializer_range=0.15,
                  bos_token_id=1, eos_token_id=2)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).float().eval()
    with torch.no_grad():  # random norms and biases too, so that every tensor's conversion matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def write_tokenizer(folder: Path) -> None:
    """A SentencePiece tokenizer.model with at most VOCAB pieces (convert_hf_to_gguf.py pads the rest)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_TEXT.splitlines()), model_writer=buf, vocab_size=VOCAB,
        model_type="bpe", hard_vocab_limit=False, character_coverage=1.0, byte_fallback=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())


def run(cmd: list, env: dict | None = None) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
                           f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc.stdout


def convert(convert_script: Path, model_dir: Path, out: Path) -> None:
    """convert_hf_to_gguf.py MODEL_DIR --outtype f32 (it puts its own gguf-py first on sys.path)."""
    run([sys.executable, convert_script, model_dir, "--outtype", "f32", "--outfile", out])


def hf_logits(model_dir: Path, tokens: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


def llama_cpp_logits(model_path: Path, tokens: list[int], lora_path: Path | None = None) -> np.ndarray:
    """Logits of every position from llama.cpp; the ids are fed as they are (no BOS is added). The KV
    cache is float32 (llama.cpp's default float16 cache alone costs about 1e-3 of relative difference)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None,
                          logits_all=True, n_ctx=256, n_batch=64, n_threads=2, n_threads_batch=2,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                          flash_attn=False, seed=0, verbose=False)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[:len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def rel_diff(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(x - ref).max() / np.abs(ref).max())


def check_case(case: Case, pissa: Path, convert_script: Path, work: Path) -> None:
    """Builds the case's model, adapter and GGUF files under work/<case> and fills case.results."""
    root = work / case.name
    if root.exists():
        shutil.rmtree(root)
    model_dir, res_dir = root / "model", root / "residual"
    model_dir.mkdir(parents=True)
    make_model(case.arch, case.seed).save_pretrained(model_dir)
    write_tokenizer(model_dir)

    env = dict(os.environ, OMP_NUM_THREADS="1")
    run([pissa, "init", model_dir, "--out", res_dir, *case.init_args], env=env)
    adapter = res_dir / "pissa_init"
    if not (res_dir / "tokenizer.model").exists():  # the residual GGUF needs the tokenizer too
        shutil.copy(model_dir / "tokenizer.model", res_dir)
    lora_gguf = root / "adapter.gguf"
    summary = json.loads(run([pissa, "export-gguf", adapter, "--arch", case.arch, "--base", model_dir,
                              "--dtype", "f32", "--out", lora_gguf, "--json"], env=env))
    if bool(summary["folded"]) != case.expect_folded:
        raise RuntimeError(f"export-gguf reported folded={summary['folded']}, expected {case.expect_folded}")
    case.notes = (case.notes + "; " if case.notes else "") + \
        f"{len(summary['modules'])} modules, adapter.lora.alpha={summary['alpha']}, folded={summary['folded']}"

    model_gguf, res_gguf = root / "model.gguf", root / "residual.gguf"
    convert(convert_script, model_dir, model_gguf)
    convert(convert_script, res_dir, res_gguf)

    rng = np.random.default_rng(case.seed)
    tokens = [int(t) for t in rng.integers(3, VOCAB, size=N_TOKENS)]
    ref = hf_logits(model_dir, tokens)
    ref_res = hf_logits(res_dir, tokens)
    base_only = llama_cpp_logits(model_gguf, tokens)
    with_lora = llama_cpp_logits(res_gguf, tokens, lora_gguf)
    res_only = llama_cpp_logits(res_gguf, tokens)

    case.results = {
        "HF original vs llama.cpp original GGUF": rel_diff(base_only, ref),
        "HF residual vs llama.cpp residual GGUF": rel_diff(res_only, ref_res),
        "HF original vs llama.cpp residual GGUF + adapter": rel_diff(with_lora, ref),
        "llama.cpp original GGUF vs residual GGUF + adapter": rel_diff(with_lora, base_only),
        "control: HF original vs llama.cpp residual GGUF, no adapter": rel_diff(res_only, ref),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pissa", type=Path, required=True, help="the pissa tool binary")
    parser.add_argument("--llama-cpp", type=Path, required=True,
                        help="a llama.cpp source tree holding convert_hf_to_gguf.py (and gguf-py)")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed at the end)")
    parser.add_argument("--tol", type=float, default=1e-5,
                        help="largest allowed max|x - y| / max|reference| (default 1e-5)")
    parser.add_argument("--cases", default=",".join(c.name for c in CASES),
                        help="comma-separated cases (default: all): " + ", ".join(c.name for c in CASES))
    args = parser.parse_args()

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    convert_script = (args.llama_cpp / "convert_hf_to_gguf.py").resolve()
    if not convert_script.is_file():
        parser.error(f"no convert_hf_to_gguf.py in {args.llama_cpp}")
    pissa = args.pissa.resolve()
    wanted = args.cases.split(",")
    unknown = set(wanted) - {c.name for c in CASES}
    if unknown:
        parser.error(f"unknown case(s): {', '.join(sorted(unknown))}")

    import llama_cpp

    print(f"llama-cpp-python {llama_cpp.__version__}; tolerance {args.tol:g} (max|x - y| / max|reference|)")
    tmp = None
    work = args.work
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="pissa-llama-cpp-")
        work = Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)

    failures = []
    try:
        for case in (c for c in CASES if c.name in wanted):
            print(f"\n== {case.name} (--arch {case.arch}; pissa init {' '.join(case.init_args)})")
            try:
                check_case(case, pissa, convert_script, work)
            except Exception as exc:  # report the case and go on with the others
                print(f"   ERROR: {exc}")
                failures.append(f"{case.name}: {str(exc).splitlines()[0]}")
                continue
            print(f"   {case.notes}")
            for label, value in case.results.items():
                control = label.startswith("control")
                ok = value > 100 * args.tol if control else value <= args.tol
                print(f"   {'ok  ' if ok else 'FAIL'} {label}: {value:.3e}"
                      + (f" (must exceed {100 * args.tol:g})" if control else ""))
                if not ok:
                    failures.append(f"{case.name}: {label}: {value:.3e}")
    finally:
        if tmp is not None:
            tmp.cleanup()

    print()
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("all cases passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
