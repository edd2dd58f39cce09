"""pissa: PiSSA adapter math from the pissa C++ headers.

PiSSA initialises a LoRA adapter from the top-``r`` singular triplets of the pretrained weight
``W [out, in]``, with scaling ``s`` (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA)::

    A = diag(sqrt(S_r / s)) V_r^T      [r, in]
    B = U_r diag(sqrt(S_r / s))        [out, r]
    W_res = W - s B A                  [out, in], in W's dtype

exactly as peft's ``init_lora_weights="pissa"`` (``method="exact"``) and ``"pissa_niter_K"``
(``method="randomized", niter=K``), but seeded, multi-threaded and without torch. Arrays go in as
NumPy arrays (float32, float64, float16, ``ml_dtypes.bfloat16``) or torch tensors (CPU) and come
back as the same kind, sharing memory where the layout allows. The math runs without the GIL.

Errors: ValueError for bad input (the message names the problem), TypeError for an unsupported
dtype, OSError for failed reads and writes, ArithmeticError for a decomposition that failed.
"""
from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from ._arrays import as_engine, as_float, back, cast_float

__version__: str = _core.version
Nf4Tensor = _core.Nf4Tensor

__all__ = [
    "__version__", "init", "randomized_svd", "truncated_svd", "lora_forward", "lora_scaling", "pissa_to_lora",
    "convert_lora_alpha", "module_seed", "quantize_nf4", "qlora_init", "loftq_init", "qpissa_init",
    "init_checkpoint", "join_checkpoint", "merge_checkpoint", "get_peft_model", "threads", "set_threads", "PissaSplit", "Svd",
    "Quality", "Convergence", "QuantizedInit", "Nf4Tensor", "CheckpointReport", "ModuleReport", "MergeReport",
    "MergedModule",
]

Array = Any  # a NumPy array, an ml_dtypes array, a torch tensor or anything numpy.asarray takes
PathType = Union[str, "PathLike[str]"]


@dataclass(frozen=True)
class Quality:
    """How much of W the adapter holds (`s B A`) and what the residual keeps."""

    singular_values: Tuple[float, ...]  #: the kept sigma_1 >= ... >= sigma_r (not divided by s)
    weight_norm: float                  #: ||W||_F
    residual_norm: float                #: ||W - s B A||_F, as stored (after rounding to W's dtype)
    adapter_energy_fraction: float      #: ||s B A||_F^2 / ||W||_F^2


@dataclass(frozen=True)
class Convergence:
    """The SVD's iteration report."""

    iterations: int         #: power iterations (randomized) or restarts (block Krylov)
    residual_bound: float   #: max_i ||W^T u_i - s_i v_i|| / s_1 when measured, else 0
    converged: bool         #: the stopping test passed (always true for direct and randomized SVD)


@dataclass(frozen=True)
class PissaSplit:
    """The result of :func:`init`: ``W == residual + scaling * B @ A`` up to W's rounding."""

    A: Array                 #: [r, in], float32 for 16-bit W, else W's dtype
    B: Array                 #: [out, r]
    residual: Array          #: W - s B A in W's dtype and stored layout
    scaling: float           #: s
    singular_values: Array   #: S_r, descending (not divided by s)
    quality: Quality
    convergence: Convergence


@dataclass(frozen=True)
class Svd:
    """Top-r singular triplets ``W ~= U diag(S) V^T``; each u_i's entry of largest magnitude is positive."""

    U: Array  #: [m, r], orthonormal columns
    S: Array  #: [r], descending
    V: Array  #: [n, r], orthonormal columns (as torch.svd_lowrank returns it, not V^T)
    convergence: Convergence


@dataclass(frozen=True)
class QuantizedInit:
    """An NF4 base and an adapter: ``W ~= base.dequantize() + scaling * B @ A``."""

    base: Nf4Tensor              #: NF4 codes in W's stored layout, bitsandbytes' packing
    A: Array                     #: [r, in] (r = 0 for QLoRA)
    B: Array                     #: [out, r]
    scaling: float
    error_history: Tuple[float, ...]  #: ||W - deq(base) - s B A||_F after each alternation


@dataclass(frozen=True)
class ModuleReport:
    """One module of :func:`init_checkpoint`."""

    name: str
    shape: Tuple[int, ...]
    rank: int
    seed: int                #: the randomized SVD's seed, module_seed(seed, i)
    quality: Quality
    quant_error: Optional[dict]  #: with quantize: ||W - deq(Q) - s B A||_F of "qlora", "loftq", "qpissa"
    seconds: float


@dataclass(frozen=True)
class CheckpointReport:
    """What :func:`init_checkpoint` wrote."""

    out: str                 #: the residual model (absolute path)
    adapter: str             #: the adapter folder inside it
    modules: Tuple[ModuleReport, ...]  #: the whole job's when complete, else this shard's
    seconds: float
    warning: str             #: a non-fatal problem ("" when none)
    complete: bool = True    #: the output is in place (False: a shard whose job is not finished)
    waiting_for: Tuple[int, ...] = ()  #: shards not finished yet
    resumed_tensors: int = 0  #: tensors a resume found done and verified
    already_complete: bool = False  #: ``resume`` found the output complete; nothing was done


@dataclass(frozen=True)
class MergedModule:
    name: str
    shape: Tuple[int, ...]
    scaling: float
    seconds: float


@dataclass(frozen=True)
class MergeReport:
    """What :func:`merge_checkpoint` wrote."""

    out: str
    modules: Tuple[MergedModule, ...]
    skipped: Tuple[str, ...]  #: adapter modules that its target_modules does not select (peft ignores them)
    seconds: float
    warning: str


def _method(method: str, niter: int) -> Tuple[str, int]:
    """("exact" | "randomized", niter) from pissa's or peft's spelling of the method."""
    if method in ("exact", "pissa"):
        return "exact", niter
    if method == "randomized":
        return "randomized", niter
    prefix = "pissa_niter_"
    if method.startswith(prefix) and method[len(prefix):].isdigit():
        return "randomized", int(method[len(prefix):])
    raise ValueError(f"method must be 'exact', 'randomized', 'pissa' or 'pissa_niter_K', got {method!r}")


def _quality(d: dict) -> Quality:
    return Quality(tuple(d["singular_values"]), d["weight_norm"], d["residual_norm"], d["adapter_energy_fraction"])


def _convergence(d: dict) -> Convergence:
    return Convergence(d["iterations"], d["residual_bound"], d["converged"])


def init(W: Array, rank: int = 8, lora_alpha: Optional[float] = None, method: Optional[str] = None, niter: int = 4,
         seed: int = 0, use_rslora: bool = False, fan_in_fan_out: bool = False,
         oversampling: int = 0, init: str = "pissa", components: str = "principal",
         products: str = "auto") -> PissaSplit:
    """Splits ``W`` into a PiSSA adapter and the residual ``W - s B A``.

    Args:
        W: the weight ``[out, in]`` (``[in, out]`` with ``fan_in_fan_out``, GPT-2's Conv1D), float32,
            float64, float16 or bfloat16; 16-bit weights are decomposed in float32 and the residual
            rounded back, as peft does. W itself is not modified.
        rank: r, 1 <= r <= min(out, in).
        lora_alpha: peft's lora_alpha; None means ``rank`` (scaling 1).
        method: "randomized" (peft's "pissa_niter_K", K = ``niter``) or "exact" ("pissa"); peft's
            spellings "pissa" and "pissa_niter_K" are accepted too.
        niter: power iterations of the randomized SVD.
        seed: seed of the randomized SVD's Gaussian test matrix; the same seed gives the same bits
            as the C++ library and as module i of ``pissa init`` when ``seed = module_seed(s, i)``.
        use_rslora: scaling ``lora_alpha / sqrt(r)`` instead of ``lora_alpha / r``.
        fan_in_fan_out: W is stored ``[in, out]``; A and B are still ``[r, in]`` and ``[out, r]``.
        oversampling: extra test vectors of the randomized SVD (peft uses 0).
        init: "pissa", or "olora" (peft's olora: ``B = Q_r``, ``A = R_r`` of the leading QR of W;
            no singular values; ``method`` does not apply).
        components: "principal" (PiSSA) or "minor" (MiLoRA: the r smallest triplets; needs the
            exact decomposition, which ``method=None`` then picks).
        products: the randomized SVD's products: "auto" (bfloat16 operands and float32 sums on a
            CPU with AMX, float32 elsewhere), "float32" (as torch.svd_lowrank) or "bfloat16" (also
            with AVX512_BF16 alone). A bfloat16 W is used as stored; a float32 W is rounded to
            bfloat16 for all but the last two products. float16 W: float32 products.

    Returns:
        PissaSplit with A, B, residual (same kind as W: NumPy or torch), scaling, the singular
        values and the quality report.

    Raises:
        ValueError: rank out of range, lora_alpha <= 0, an empty W or one with a NaN or infinity
            (the message gives its row and column).
        TypeError: W's dtype is not one of the four.
    """
    if method is None:
        method = "exact" if components == "minor" else "randomized"
    method, niter = _method(method, niter)
    a, dtype, kind = as_engine(W, "init: W")
    alpha = float(rank if lora_alpha is None else lora_alpha)
    d = _core.init(a, dtype, rank, alpha, use_rslora, method, niter, oversampling, seed, fan_in_fan_out, init,
                   components, products)
    return PissaSplit(back(d["A"], kind), back(d["B"], kind), back(d["residual"], kind, dtype), d["scaling"],
                      back(d["singular_values"], kind), _quality(d["quality"]), _convergence(d["convergence"]))


def _svd(t: tuple, kind: Any) -> Svd:
    return Svd(back(t[0], kind), back(t[1], kind), back(t[2], kind), _convergence(t[3]))


def randomized_svd(W: Array, rank: int, niter: int = 4, oversampling: int = 0, seed: int = 0) -> Svd:
    """Top-``rank`` triplets by the randomized range finder with ``niter`` power iterations (the
    algorithm of torch.svd_lowrank, which peft's "pissa_niter_K" calls). 16-bit W is widened to
    float32 first (a copy). Raises ValueError for a rank out of range or a non-finite W."""
    a, dtype, kind = as_float(W, "randomized_svd: W")
    return _svd(_core.randomized_svd(a, dtype, rank, niter, oversampling, seed), kind)


def truncated_svd(W: Array, rank: int, algorithm: str = "automatic", tolerance: float = -1.0,
                  max_iterations: int = 100) -> Svd:
    """Exact top-``rank`` triplets (the Eckart–Young optimum): "full" (a full SVD, truncated),
    "block_krylov" (block Lanczos to ``tolerance``; <= 0 means 100 epsilon) or "automatic" (block
    Krylov when r is small against min(m, n)). 16-bit W is widened to float32 first."""
    a, dtype, kind = as_float(W, "truncated_svd: W")
    return _svd(_core.truncated_svd(a, dtype, rank, algorithm, tolerance, max_iterations), kind)


def lora_forward(x: Array, W: Array, A: Array, B: Array, scaling: float, bias: Optional[Array] = None) -> Array:
    """``x W^T + s (x A^T) B^T (+ bias)`` with x ``[batch, in]``, W ``[out, in]``, A ``[r, in]``,
    B ``[out, r]``: the LoRA layer's forward pass, computed through the rank-r bottleneck. Computed
    in x's dtype (float32 for 16-bit x); the other arrays are cast to it. Raises ValueError on a
    shape mismatch (the message lists every shape)."""
    xa, dtype, kind = as_float(x, "lora_forward: x")
    args = [cast_float(*as_float(v, f"lora_forward: {n}")[:2], dtype) for n, v in (("W", W), ("A", A), ("B", B))]
    b = None if bias is None else cast_float(*as_float(bias, "lora_forward: bias")[:2], dtype)
    return back(_core.lora_forward(xa, *args, float(scaling), b, dtype), kind)


def lora_scaling(lora_alpha: float, rank: int, use_rslora: bool = False) -> float:
    """peft's scaling: ``lora_alpha / rank``, or ``lora_alpha / sqrt(rank)`` with rsLoRA."""
    return _core.lora_scaling(lora_alpha, rank, use_rslora)


def pissa_to_lora(A: Array, B: Array, A0: Array, B0: Array) -> Tuple[Array, Array]:
    """The rank-2r LoRA ``A' = [A; A0]``, ``B' = [B, -B0]`` of a trained PiSSA adapter (A, B) and its
    initial one (A0, B0): applied to the original W it gives the trained model,
    ``W + s B' A' == W_res + s B A`` (use ``convert_lora_alpha`` for the new lora_alpha)."""
    a, dtype, kind = as_float(A, "pissa_to_lora: A")
    rest = [cast_float(*as_float(v, f"pissa_to_lora: {n}")[:2], dtype) for n, v in (("B", B), ("A0", A0), ("B0", B0))]
    A1, B1 = _core.pissa_to_lora(a, *rest, dtype)
    return back(A1, kind), back(B1, kind)


def convert_lora_alpha(lora_alpha: float, use_rslora: bool = False) -> float:
    """lora_alpha of the rank-2r converted adapter (``2 a``, or ``sqrt(2) a`` with rsLoRA): the
    scaling of rank 2r then equals the trained adapter's scaling of rank r."""
    return _core.convert_lora_alpha(lora_alpha, use_rslora)


def module_seed(seed: int, index: int) -> int:
    """The seed of target ``index`` (checkpoint order) in a checkpoint job run with ``seed``."""
    return _core.module_seed(seed, index)


def quantize_nf4(W: Array, block_size: int = 64, double_quant: bool = False) -> Nf4Tensor:
    """NF4 quantisation as bitsandbytes' quantize_4bit (quant_type="nf4"): blocks of ``block_size``
    values of the row-major flattening, each scaled by its absmax (``double_quant``: the absmax in
    8 bits, bitsandbytes' compress_statistics)."""
    a, dtype, _ = as_float(W, "quantize_nf4: W")
    return _core.quantize_nf4(a, dtype, block_size, double_quant)


def _quantized(which: str, W: Array, rank: int, lora_alpha: Optional[float], iterations: int, method: str,
               niter: int, seed: int, use_rslora: bool, fan_in_fan_out: bool, block_size: int,
               double_quant: bool) -> QuantizedInit:
    method, niter = _method(method, niter)
    a, dtype, kind = as_float(W, f"{which}_init: W")
    alpha = float(rank if lora_alpha is None else lora_alpha)
    d = _core.quantized_init(which, a, dtype, rank, alpha, use_rslora, method, niter, seed, fan_in_fan_out,
                             iterations, block_size, double_quant)
    return QuantizedInit(d["base"], back(d["A"], kind), back(d["B"], kind), d["scaling"], tuple(d["error_history"]))


def qpissa_init(W: Array, rank: int = 8, lora_alpha: Optional[float] = None, iterations: int = 1,
                method: str = "randomized", niter: int = 4, seed: int = 0, use_rslora: bool = False,
                fan_in_fan_out: bool = False, block_size: int = 64, double_quant: bool = False) -> QuantizedInit:
    """QPiSSA: the PiSSA split of W, its residual quantised to NF4, alternated ``iterations`` times
    (T = 1 is the paper's QPiSSA; each further step fits the adapter to ``W - deq(Q)``)."""
    return _quantized("qpissa", W, rank, lora_alpha, iterations, method, niter, seed, use_rslora, fan_in_fan_out,
                      block_size, double_quant)


def loftq_init(W: Array, rank: int = 8, lora_alpha: Optional[float] = None, iterations: int = 1,
               method: str = "randomized", niter: int = 4, seed: int = 0, use_rslora: bool = False,
               fan_in_fan_out: bool = False, block_size: int = 64, double_quant: bool = False) -> QuantizedInit:
    """LoftQ: W quantised to NF4 and the adapter fitted to the quantisation error, alternated
    ``iterations`` times."""
    return _quantized("loftq", W, rank, lora_alpha, iterations, method, niter, seed, use_rslora, fan_in_fan_out,
                      block_size, double_quant)


def qlora_init(W: Array, block_size: int = 64, double_quant: bool = False) -> QuantizedInit:
    """QLoRA: W quantised to NF4 and an empty adapter (rank 0)."""
    return _quantized("qlora", W, 1, None, 1, "randomized", 4, 0, False, False, block_size, double_quant)


def _module_report(d: dict) -> ModuleReport:
    return ModuleReport(d["name"], tuple(d["shape"]), d["rank"], d["seed"], _quality(d["quality"]),
                        d["quant_error"], d["seconds"])


def init_checkpoint(model: PathType, out: PathType, *, rank: int = 8, lora_alpha: Optional[float] = None,
                    method: Optional[str] = None, niter: int = 4, seed: int = 0, init: str = "pissa",
                    components: str = "principal",
                    target_modules: Sequence[str] = ("q_proj", "v_proj"), target_regex: Optional[str] = None,
                    exclude_modules: Union[None, str, Sequence[str]] = None,
                    layers_to_transform: Union[None, int, Sequence[int]] = None,
                    layers_pattern: Union[None, str, Sequence[str]] = None,
                    rank_pattern: Optional[Mapping[str, int]] = None,
                    alpha_pattern: Optional[Mapping[str, float]] = None,
                    use_rslora: bool = False, fan_in_fan_out: bool = False, quantize: Optional[str] = None,
                    quant_iterations: int = 1, quant_block_size: int = 64, task_type: Optional[str] = None,
                    force: bool = False, adapter_folder: str = "pissa_init",
                    shard: Union[None, str, Tuple[int, int]] = None, resume: bool = False,
                    products: str = "auto",
                    progress: Optional[Callable[[int, int, str], None]] = None,
                    module_done: Optional[Callable[[ModuleReport], None]] = None) -> CheckpointReport:
    """PiSSA on every target weight of a checkpoint: what ``pissa init MODEL --out OUT`` does, by the
    same library call (pissa::io::init_checkpoint), so the files are the same bits.

    ``out`` becomes the residual model (the input's files, targets replaced by ``W - s B A``) and
    ``out/<adapter_folder>`` the peft adapter (``init_lora_weights: true``, the method and seed in
    its metadata). The output is written all-or-nothing: an error, an exception raised by a
    callback or Ctrl-C (seen between tensors) leaves nothing at ``out``.

    Args:
        model: a .safetensors file or a model folder (single file or sharded).
        out: the output folder; it must not exist unless ``force``.
        target_modules: peft's list form (a name, or a suffix after a dot), or ``"all-linear"``
            (every linear weight except the output layer, as peft resolves it; the adapter config
            then lists them, condensed as peft condenses them); ``target_regex``: peft's string
            form (a full match on module names), used instead when given.
        init: "pissa" (singular triplets), or "olora" (peft's olora: ``B = Q_r``, ``A = R_r`` of the
            leading QR of W; ``method`` does not apply).
        components: "principal" (PiSSA), or "minor" (MiLoRA: the r smallest triplets; needs the
            exact decomposition, which ``method=None`` then picks).
        method: "randomized" (peft's pissa_niter_K, the default) or "exact" (peft's "pissa").
        exclude_modules, layers_to_transform, layers_pattern, rank_pattern, alpha_pattern: peft's
            LoraConfig fields of those names, with peft's rules (a string ``exclude_modules`` is a
            full-match regex; a rank_pattern / alpha_pattern key matches the end of a module name
            after a dot, the first matching key in order wins), written to adapter_config.json.
        quantize: "nf4" for QPiSSA: the residual is written as ``deq(NF4(W - s B A))`` after
            ``quant_iterations`` alternations with blocks of ``quant_block_size``.
        task_type: peft's task_type ("CAUSAL_LM", "SEQ_CLS", ..., "none" for null); None infers it
            from the model's config.json (a bare encoder gets null).
        progress: called as ``progress(index, count, tensor_name)`` before each tensor.
        module_done: called with each decomposed module's ModuleReport.
        shard: ``(k, n)`` or ``"k/n"``: do shard k of n of the job (several processes or machines
            sharing ``out``; the last to finish writes it, or :func:`join_checkpoint`); ``"auto"``
            / ``"auto/n"``: from the launcher's environment (Slurm, Open MPI, PMI, Kubernetes).
        resume: continue the job from its journal after a crash instead of starting over; the work
            folder ``.<out>.pissa-work`` beside ``out`` is then kept when the call fails.
        The other arguments are those of :func:`init`; module i uses seed ``module_seed(seed, i)``.
        The result does not depend on the sharding or on resumes: the same bits as one run.
    """
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
    if isinstance(target_modules, str):
        if target_modules.lower() == "all-linear" and target_regex is None:
            target_regex, target_modules = target_modules, []
        else:
            target_modules = [target_modules]
    exclude_regex = exclude_modules if isinstance(exclude_modules, str) else ""
    exclude_list = [] if exclude_modules is None or isinstance(exclude_modules, str) else list(exclude_modules)
    if isinstance(layers_to_transform, int):
        layers_to_transform = [layers_to_transform]
    if isinstance(layers_pattern, str):
        layers_pattern = [layers_pattern]
    if method is None:
        method = "exact" if components == "minor" else "randomized"
    method, niter = _method(method, niter)
    alpha = float(rank if lora_alpha is None else lora_alpha)
    done = None if module_done is None else (lambda d: module_done(_module_report(d)))
    if isinstance(shard, tuple):
        shard = f"{int(shard[0])}/{int(shard[1])}"
    d = _core.init_checkpoint(str(model), str(out), rank, alpha, use_rslora, method, init, components, niter, seed,
                              list(target_modules), target_regex or "", exclude_list, exclude_regex,
                              [int(i) for i in layers_to_transform or ()], list(layers_pattern or ()),
                              [(k, int(v)) for k, v in (rank_pattern or {}).items()],
                              [(k, float(v)) for k, v in (alpha_pattern or {}).items()], fan_in_fan_out,
                              quantize is not None,
                              quant_iterations, quant_block_size, task_type or "", force, adapter_folder, shard or "",
                              resume, products, progress, done)
    return _checkpoint_report(d)


def join_checkpoint(out: PathType) -> CheckpointReport:
    """Finishes a job run in shards (``init_checkpoint(..., shard=...)``) whose shards have all
    finished but whose last shard could not join (it was killed while joining): what
    ``pissa join OUT`` does. Raises ValueError naming the shards that have not finished."""
    return _checkpoint_report(_core.join_checkpoint(str(out)))


def _checkpoint_report(d: dict) -> CheckpointReport:
    return CheckpointReport(d["out"], d["adapter"], tuple(_module_report(m) for m in d["modules"]), d["seconds"],
                            d["warning"], d["complete"], tuple(d["waiting_for"]), d["resumed_tensors"],
                            d["already_complete"])


def merge_checkpoint(model: PathType, adapter: PathType, out: PathType, *, force: bool = False,
                     progress: Optional[Callable[[int, int, str], None]] = None) -> MergeReport:
    """``out`` = ``model`` with the peft LoRA adapter folder ``adapter`` merged into its weights
    (``W + s B A`` per module, rank_pattern / alpha_pattern / rsLoRA / fan_in_fan_out applied): what
    peft's ``merge_and_unload()`` followed by ``save_pretrained`` gives, and ``pissa merge`` writes."""
    d = _core.merge_checkpoint(str(model), str(adapter), str(out), force, progress)
    modules = tuple(MergedModule(m["name"], tuple(m["shape"]), m["scaling"], m["seconds"]) for m in d["modules"])
    return MergeReport(d["out"], modules, tuple(d["skipped"]), d["seconds"], d["warning"])


def threads() -> int:
    """The number of threads the math uses (OpenMP; OMP_NUM_THREADS or all cores)."""
    return _core.threads()


def set_threads(n: int) -> None:
    """Sets the number of threads the math uses."""
    _core.set_threads(n)


def get_peft_model(model: Any, config: Any, *, seed: int = 0, adapter_name: str = "default", **kwargs: Any) -> Any:
    """peft.get_peft_model for a LoraConfig asking for ``init_lora_weights="pissa"`` or
    ``"pissa_niter_K"``, with the split computed by pissa (see pissa.peft_integration)."""
    from .peft_integration import get_peft_model as impl

    return impl(model, config, seed=seed, adapter_name=adapter_name, **kwargs)
