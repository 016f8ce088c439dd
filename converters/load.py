"""`load_transformer`: a Wan transformer from a diffusers folder, an original Wan checkpoint or a
converted checkpoint, each parameter placed in its sharding.

It sits in the converters layer because it reads the foreign formats (through `converters.io`);
converted checkpoints are read through `spatialalign_jax.model.checkpoint`. The package facade
re-exports it as `spatialalign_jax.load_transformer`.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters.io import read_base  # reads diffusers folders and original Wan checkpoints
from spatialalign_jax.model import lora as lora_lib
from spatialalign_jax.model import params as params_lib
from spatialalign_jax.model import sharding as sharding_lib
from spatialalign_jax.model.checkpoint import (is_checkpoint, lora_config_from_meta, read_checkpoint, read_checkpoint_meta,
                                               restore_params)
from spatialalign_jax.model.config import LoraConfig, WanConfig
from spatialalign_jax.model.transformer import WanTransformer3DModel


def _place(value: np.ndarray, dtype, sharding) -> jax.Array:
    value = np.asarray(value)
    if sharding is None:
        return jnp.asarray(value, dtype)
    # Each device reads only its own slice of the host array.
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: np.asarray(value[idx], dtype))


def base_params(path: str | os.PathLike) -> tuple[WanConfig, dict[str, np.ndarray]]:
    """(config, Flax flat base parameters as host numpy arrays) of any model `load_transformer` reads."""
    path = Path(path)
    if is_checkpoint(path):
        meta, base, _ = read_checkpoint(path)
        if not meta.get("has_base", True):
            raise ValueError(f"{path} holds LoRA weights only; give a model with base weights")
        return WanConfig.from_diffusers(meta["config"]), base
    weights = read_base(path)
    cfg = WanConfig.from_diffusers(weights.config)
    return cfg, params_lib.flax_from_diffusers(cfg, weights.state_dict)


def load_transformer(path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None, dtype="float32",
                     param_dtype=None, attention: str = "auto", remat: str = "none", scan_unroll: int | bool = 1,
                     lora: LoraConfig | None | str = "checkpoint", lora_seed: int = 0) -> WanTransformer3DModel:
    """Loads a diffusers transformer folder (or an original Wan checkpoint) or a converted checkpoint.

    `lora="checkpoint"` keeps the LoRA the checkpoint carries (none for diffusers folders); `None`
    builds no adapters; a `LoraConfig` adds adapters, restored from the checkpoint when it holds ones
    of the same config and PEFT-initialised otherwise. With a `mesh`, every parameter is placed with
    its sharding from `spatialalign_jax.model.sharding`. fp32-only modules (time embedder, modulation
    tables, cross-attention norm) stay fp32 whatever `param_dtype` is, as in diffusers.
    """
    dtype = jnp.dtype(dtype)
    param_dtype = dtype if param_dtype is None else jnp.dtype(param_dtype)
    path = Path(path)
    if is_checkpoint(path):
        meta = read_checkpoint_meta(path)
        cfg = WanConfig.from_diffusers(meta["config"])
        ckpt_lora = lora_config_from_meta(meta)
        if not meta.get("has_base", True):
            raise ValueError(f"{path} holds LoRA weights only; load its base model and apply them, or convert "
                             "a base with `python -m converters.to_flax --src BASE --lora ...`")
        base_source = None
    else:
        ckpt_lora = None
        cfg, base_source = base_params(path)

    lora_cfg = ckpt_lora if lora == "checkpoint" else lora
    if isinstance(lora_cfg, str):
        raise ValueError(f"lora={lora!r}: pass 'checkpoint', None or a LoraConfig")

    abstract, targets = params_lib.abstract_model(cfg, lora_cfg, dtype=dtype, param_dtype=param_dtype,
                                                  attention=attention, remat=remat, scan_unroll=scan_unroll)
    shapes = {k: tuple(v.shape) for k, v in targets.items()}
    # Without a mesh every weight lives on the default device (Orbax would otherwise restore numpy arrays).
    shardings = sharding_lib.param_shardings(shapes, mesh) if mesh is not None else dict.fromkeys(
        shapes, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    lora_names = {k for k in shapes if k.endswith((".lora_A", ".lora_B"))}

    if base_source is None:
        values = restore_params(path, {k: jax.ShapeDtypeStruct(shapes[k], targets[k].dtype, sharding=shardings[k])
                                       for k in shapes}, lora=lora_cfg is not None and lora_cfg == ckpt_lora)
    else:
        values = {k: _place(v, targets[k].dtype, shardings[k]) for k, v in base_source.items()}

    missing_lora = {k: shapes[k] for k in lora_names if k not in values}
    for k, v in lora_lib.init_lora(missing_lora, seed=lora_seed).items():
        values[k] = _place(v, targets[k].dtype, shardings[k])

    model = nnx.merge(*nnx.split(abstract))  # a concrete module whose arrays we now fill
    lora_lib.set_params(model, values)
    return model
