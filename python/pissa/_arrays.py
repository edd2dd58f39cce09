"""Arrays between Python and pissa's C++ engine.

The engine takes C-contiguous CPU arrays of float32, float64, bfloat16 or float16 (16-bit floats
travel as uint16 bit patterns) and hands back arrays it allocated, without a copy. This module
turns what a caller gives (a NumPy array, an ``ml_dtypes`` bfloat16 array, a torch tensor, a
nested list) into that form, copying only when the layout requires it (a non-contiguous view, a
list), and turns results back into the caller's kind: NumPy arrays for NumPy input, torch tensors
(sharing memory) for torch input. torch is never imported here: a tensor's own module is used.
"""
from __future__ import annotations

import sys
from typing import Any, Tuple

import ml_dtypes
import numpy as np

_SIXTEEN_BIT = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
_FLOAT = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


class Kind:
    """Where an input came from, so that results go back as the same kind."""

    __slots__ = ("torch",)

    def __init__(self, torch_module: Any = None) -> None:
        self.torch = torch_module


def as_engine(x: Any, name: str) -> Tuple[np.ndarray, str, Kind]:
    """``(array, dtype name, kind)``: ``x`` as the engine takes it.

    Raises TypeError for an unsupported dtype (integers, booleans, complex) and ValueError for a
    tensor that is not on the CPU.
    """
    if _is_torch(x):
        torch = sys.modules["torch"]
        t = x.detach()
        if t.device.type != "cpu":
            raise ValueError(f"{name}: the tensor is on {t.device}; pissa computes on the CPU (use .cpu())")
        t = t.contiguous()
        if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
            dtype = "bfloat16" if t.dtype == torch.bfloat16 else "float16"
            return t.view(torch.int16).numpy().view(np.uint16), dtype, Kind(torch)
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name}: dtype {t.dtype} is not supported (float32, float64, bfloat16, float16)")
        return t.numpy(), "float32" if t.dtype == torch.float32 else "float64", Kind(torch)
    a = np.asarray(x)
    for dtype, sixteen in _SIXTEEN_BIT.items():
        if a.dtype == sixteen:
            return np.ascontiguousarray(a).view(np.uint16), dtype, Kind()
    if a.dtype in _FLOAT:
        return np.ascontiguousarray(a), _FLOAT[a.dtype], Kind()
    raise TypeError(f"{name}: dtype {a.dtype} is not supported (float32, float64, bfloat16, float16); "
                    f"convert it with .astype(numpy.float32) first")


def as_float(x: Any, name: str) -> Tuple[np.ndarray, str, Kind]:
    """As as_engine, with 16-bit input widened to float32 (a documented copy) for the functions
    that compute in float32 or float64 only."""
    a, dtype, kind = as_engine(x, name)
    if dtype in _SIXTEEN_BIT:
        a = a.view(_SIXTEEN_BIT[dtype]).astype(np.float32)
        dtype = "float32"
    return a, dtype, kind


def cast_float(a: np.ndarray, from_dtype: str, to_dtype: str) -> np.ndarray:
    """``a`` (float32 or float64) as ``to_dtype``, copied only when the two differ."""
    return a if from_dtype == to_dtype else a.astype(np.float32 if to_dtype == "float32" else np.float64)


def back(a: np.ndarray, kind: Kind, dtype: str = "") -> Any:
    """An engine result as the caller's kind; ``dtype`` names a 16-bit result held as uint16."""
    if dtype in _SIXTEEN_BIT:
        if kind.torch is not None:
            torch = kind.torch
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16 if dtype == "bfloat16" else torch.float16)
        return a.view(_SIXTEEN_BIT[dtype])
    if kind.torch is not None:
        return kind.torch.from_numpy(a)
    return a
