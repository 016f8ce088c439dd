"""LoRA as state: which parameters train, their PEFT initialisation, reading and writing them by name.

The adapters live inside the model's `Linear` layers as `nnx.LoRAParam`s (a subclass of `nnx.Param`),
so `nnx.state(model, LORA)` is the trainable state and `nnx.state(model, BASE)` the frozen one.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from flax import nnx

LORA = nnx.LoRAParam
BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def flat_params(model: nnx.Module, which=nnx.Param) -> dict[str, jax.Array]:
    """{flax name: array} for the parameters `which` selects (default: all)."""
    return {".".join(map(str, path)): var[...] for path, var in nnx.to_flat_state(nnx.state(model, which))}


def set_params(model: nnx.Module, values: Mapping[str, jax.Array], *, strict: bool = True) -> None:
    """Replaces parameters by name; `strict` demands that every parameter of the model is given."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    names = {".".join(map(str, path)) for path, _ in flat}
    unknown = sorted(set(values) - names)
    if unknown:
        raise KeyError(f"no parameter named {unknown[0]!r} in the model ({len(unknown)} unknown names)")
    if strict and names - set(values):
        raise KeyError(f"parameter {sorted(names - set(values))[0]!r} not given")
    for path, var in flat:
        name = ".".join(map(str, path))
        if name in values:
            value = values[name]
            if tuple(value.shape) != tuple(var.shape):
                raise ValueError(f"{name}: shape {tuple(value.shape)} given, the model has {tuple(var.shape)}")
            var.set_value(value)
    nnx.update(model, nnx.from_flat_state(flat))


def init_lora(shapes: Mapping[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """PEFT's initialisation for LoRA parameters given their shapes: A ~ U(+-1/sqrt(fan_in)), B = 0."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in sorted(shapes.items()):
        if name.endswith(".lora_A"):
            bound = 1.0 / math.sqrt(shape[-2])
            out[name] = rng.uniform(-bound, bound, shape).astype(np.float32)
        elif name.endswith(".lora_B"):
            out[name] = np.zeros(shape, np.float32)
    return out


def merge_lora(base: Mapping[str, np.ndarray], lora: Mapping[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """Base weights with every adapter folded in: ``kernel + scale * A @ B`` per LoRA'd ``Linear``
    (stacked blocks multiply block by block). The result is a plain model that computes what the
    model with its LoRA on computes; the loop's rounds start each round from the last one's merge."""
    out = dict(base)
    a_names = sorted(k for k in lora if k.endswith(".lora_A"))
    if len(a_names) * 2 != len(lora):
        raise ValueError("LoRA weights come in lora_A / lora_B pairs; got an unpaired one")
    for a_name in a_names:
        module = a_name[: -len(".lora_A")]
        kernel, b_name = f"{module}.kernel", f"{module}.lora_B"
        if kernel not in base or b_name not in lora:
            raise KeyError(f"LoRA on {module!r} but no {kernel!r} in the base or no {b_name!r} beside it")
        w = np.asarray(base[kernel])
        delta = np.matmul(np.asarray(lora[a_name], np.float32), np.asarray(lora[b_name], np.float32)) * scale
        if delta.shape != w.shape:
            raise ValueError(f"{module}: A @ B is {delta.shape}, the kernel {w.shape}")
        out[kernel] = (w.astype(np.float32) + delta).astype(w.dtype)
    return out
