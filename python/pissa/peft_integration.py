"""peft integration: a PeftModel whose PiSSA adapters pissa computed.

``pissa.get_peft_model(model, LoraConfig(init_lora_weights="pissa_niter_4", ...), seed=0)`` returns
what ``peft.get_peft_model(model, config)`` returns, with each adapted layer split by
:func:`pissa.init` instead of torch (peft's own arithmetic, seeded, multi-threaded); peft's
``"pissa"``, ``"pissa_niter_K"`` and ``"olora"`` are supported:

* every layer that peft wraps gets ``A``, ``B`` and the residual ``W - s B A`` of its base weight,
  with that layer's own rank and scaling (rank_pattern, alpha_pattern, rsLoRA) and peft's
  ``fan_in_fan_out``; A and B are kept in the dtype peft gave the adapter (float32 by default);
* layer ``i`` (in ``model.named_modules()`` order of the adapted layers) uses the seed
  ``pissa.module_seed(seed, i)``, so the same call gives the same bits;
* the adapter's config says ``init_lora_weights=True`` afterwards, as peft's PiSSA guide asks
  before saving: loading the saved adapter onto the saved residual model must not decompose again;
* ``save_pretrained`` of the returned model records the method, seed and pissa version in the
  adapter file's safetensors metadata (keys ``pissa.*``), so a saved adapter says how to reproduce it.
"""
from __future__ import annotations

import copy
import json
import os
import re
import struct
from typing import Any, Dict, Tuple

from . import __version__, init, module_seed

_SEED_RULE = "layer i (model.named_modules() order of the adapted layers) uses pissa.module_seed(seed, i)"


def _method(init_lora_weights: Any) -> Tuple[str, int]:
    """(method, niter) of peft's init_lora_weights: "exact", "randomized" or "qr" (OLoRA)."""
    if init_lora_weights == "pissa":
        return "exact", 0
    if init_lora_weights == "olora":
        return "qr", 0
    match = re.fullmatch(r"pissa_niter_(\d+)", str(init_lora_weights))
    if match and isinstance(init_lora_weights, str):
        return "randomized", int(match.group(1))
    raise ValueError("pissa.get_peft_model needs a LoraConfig with init_lora_weights='pissa', 'pissa_niter_K' or "
                     f"'olora', got {init_lora_weights!r} (use peft.get_peft_model for other initialisations)")


def get_peft_model(model: Any, config: Any, *, seed: int = 0, adapter_name: str = "default", **kwargs: Any) -> Any:
    """``peft.get_peft_model(model, config, adapter_name=adapter_name, **kwargs)`` with the PiSSA
    split of every adapted layer computed by pissa (see the module docstring).

    Raises ValueError when ``config`` is not a LoraConfig asking for "pissa" / "pissa_niter_K",
    TypeError for a base weight that is not float32, float16 or bfloat16 (as peft).
    """
    import peft
    import torch
    from peft.tuners.lora import LoraLayer

    if not isinstance(config, peft.LoraConfig):
        raise ValueError(f"pissa.get_peft_model needs a peft.LoraConfig, got {type(config).__name__}")
    method, niter = _method(config.init_lora_weights)
    placeholder = copy.deepcopy(config)
    placeholder.init_lora_weights = False  # peft creates the layers; pissa fills them in below
    peft_model = peft.get_peft_model(model, placeholder, adapter_name=adapter_name, **kwargs)

    index = 0
    with torch.no_grad():
        for name, layer in peft_model.named_modules():
            if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
                continue
            base = layer.get_base_layer()
            weight = base.weight
            if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise TypeError(f"{name}: PiSSA needs a float32, float16 or bfloat16 base weight, got {weight.dtype}")
            rank = layer.r[adapter_name]
            use_rslora = bool(layer.use_rslora.get(adapter_name, False))
            split = init(weight.detach().cpu(), rank=rank, lora_alpha=layer.lora_alpha[adapter_name],
                         method="randomized" if method == "qr" else method, niter=niter,
                         seed=module_seed(seed, index), use_rslora=use_rslora,
                         fan_in_fan_out=bool(layer.fan_in_fan_out), init="olora" if method == "qr" else "pissa")
            expected = float(layer.scaling[adapter_name])
            if abs(split.scaling - expected) > 1e-6 * abs(expected):
                raise ValueError(f"{name}: peft's scaling {expected} differs from pissa's {split.scaling}")
            lora_A = layer.lora_A[adapter_name].weight
            lora_B = layer.lora_B[adapter_name].weight
            lora_A.copy_(split.A.to(dtype=lora_A.dtype))
            lora_B.copy_(split.B.to(dtype=lora_B.dtype))
            weight.copy_(split.residual.to(device=weight.device))
            index += 1
    if index == 0:
        raise ValueError("pissa.get_peft_model: peft adapted no layer (check target_modules)")

    peft_model.peft_config[adapter_name].init_lora_weights = True
    record = {
        "pissa.version": __version__,
        "pissa.init": "olora" if method == "qr" else "pissa",
        "pissa.method": method,
        "pissa.init_lora_weights": {"exact": "pissa", "qr": "olora"}.get(method, f"pissa_niter_{niter}"),
        "pissa.niter": str(niter) if method == "randomized" else "",
        "pissa.seed": str(seed),
        "pissa.seed_rule": _SEED_RULE,
    }
    _record_on_save(peft_model, adapter_name, record)
    return peft_model


def _record_on_save(peft_model: Any, adapter_name: str, record: Dict[str, str]) -> None:
    """Makes the model's save_pretrained add ``record`` to the PiSSA adapter file's metadata.

    Not for a converted adapter (``path_initial_model_for_weight_conversion``): that is a plain LoRA.
    """
    save = peft_model.save_pretrained

    def save_pretrained(save_directory: str, *args: Any, **kwargs: Any) -> Any:
        result = save(save_directory, *args, **kwargs)
        selected = kwargs.get("selected_adapters") or list(peft_model.peft_config)
        converted = kwargs.get("path_initial_model_for_weight_conversion") is not None
        if adapter_name in selected and not converted:
            folder = save_directory if adapter_name == "default" else os.path.join(save_directory, adapter_name)
            path = os.path.join(folder, "adapter_model.safetensors")
            if os.path.isfile(path):
                _add_metadata(path, record)
        return result

    save_pretrained.__doc__ = save.__doc__
    peft_model.save_pretrained = save_pretrained


def _add_metadata(path: str, record: Dict[str, str]) -> None:
    """Rewrites a safetensors file with ``record`` added to its metadata: the tensors' bytes and
    entries unchanged, the metadata keys sorted (safetensors' own writer orders them at random, so
    the same adapter could otherwise be saved as different bytes), through a temporary file renamed
    over the original."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        data = f.read()
    metadata = dict(header.pop("__metadata__", None) or {})
    metadata.update(record)
    header = {"__metadata__": dict(sorted(metadata.items())), **header}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data area starts 8-byte aligned, as safetensors writes it
    tmp = path + ".pissa-tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text + data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
