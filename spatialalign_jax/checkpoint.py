"""Converted transformer checkpoints (Orbax) and `load_transformer`.

A converted checkpoint is a folder:

    spatialalign.json   {"format": "spatialalign-jax/wan-transformer", "version": 1,
                         "config": <diffusers config>, "lora": {"rank", "alpha", "targets"} | null,
                         "has_base": bool, "param_dtype": "float32" | "bfloat16", ...}
    params/             an Orbax PyTree checkpoint: {"base": {...}, "lora": {...}} nested by module path

It is written into a temporary sibling and renamed into place, so a failed write leaves nothing.
Loading restores each parameter straight into its sharding on the mesh (no full copy per device).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import lora as lora_lib
from .atomic import atomic_output
from . import params as params_lib
from .config import LoraConfig, WanConfig
from .model import WanTransformer3DModel

FORMAT = "spatialalign-jax/wan-transformer"
VERSION = 1
META_FILE = "spatialalign.json"


def _nest(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def _what_to_pass_instead(path: Path) -> str:
    """A training run's folder, or one of its Orbax step folders, is a common mix-up: name its LoRA export."""
    for run, step in ((path, None), (path.parent.parent, path.name)):
        exports = sorted(p for p in (run / "lora").glob("step_*") if is_checkpoint(p))
        if (run / "config.yaml").is_file() and exports:
            same_step = [p for p in exports if step and step.isdigit() and p.name == f"step_{int(step):07d}"]
            return f"a training run's folder: pass one of its LoRA exports, such as {str((same_step or exports)[-1])!r}"
    return "convert with `python -m converters.to_flax --src ... --dst ...`"


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a converted checkpoint: {META_FILE} is missing "
                                f"({_what_to_pass_instead(Path(path))})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}; "
                         f"this code reads {FORMAT!r} version {VERSION}")
    return meta


def lora_config_from_meta(meta: Mapping[str, Any]) -> LoraConfig | None:
    lora = meta.get("lora")
    return None if lora is None else LoraConfig(rank=int(lora["rank"]), alpha=float(lora["alpha"]),
                                                targets=tuple(lora["targets"]))


def save_checkpoint(dst: str | os.PathLike, cfg: WanConfig, base: Mapping[str, np.ndarray] | None,
                    lora_cfg: LoraConfig | None = None, lora: Mapping[str, np.ndarray] | None = None, *,
                    overwrite: bool = False, extra_meta: Mapping[str, Any] | None = None) -> Path:
    """Writes Flax flat params (`params.flax_from_diffusers` naming) as a converted checkpoint.

    The arrays are this host's numpy copies, so the calling process writes alone: in a multi-host run
    one process calls this (the trainer's chief exporting LoRA) while the others train on.
    """
    import orbax.checkpoint as ocp

    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if (lora is None) != (lora_cfg is None):
        raise ValueError("LoRA weights and their LoraConfig come together")
    if base is None and lora is None:
        raise ValueError("nothing to save: neither base nor LoRA weights given")
    tree = {}
    if base is not None:
        tree["base"] = _nest({k: np.asarray(v) for k, v in base.items()})
    if lora is not None:
        tree["lora"] = _nest({k: np.asarray(v) for k, v in lora.items()})
    base_dtypes = {str(np.asarray(v).dtype) for v in (base or {}).values()}
    meta = {
        "format": FORMAT, "version": VERSION, "config": cfg.to_diffusers(),
        "lora": None if lora_cfg is None else {"rank": lora_cfg.rank, "alpha": lora_cfg.alpha,
                                               "targets": list(lora_cfg.targets)},
        "has_base": base is not None,
        "param_dtype": sorted(base_dtypes)[0] if len(base_dtypes) == 1 else "mixed",
        **dict(extra_meta or {}),
    }
    with atomic_output(dst) as tmp:
        tmp.mkdir()
        # Orbax's default waits at a barrier for every process of the run; this process alone writes.
        me = jax.process_index()
        ckptr = ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"save_checkpoint_{me}"))
        ckptr.save(tmp / "params", tree)
        ckptr.wait_until_finished()
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return dst


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(meta, base flat params, LoRA flat params) as host numpy arrays (converters use this)."""
    import orbax.checkpoint as ocp

    meta = read_checkpoint_meta(path)
    tree = ocp.StandardCheckpointer().restore(Path(path).absolute() / "params")
    as_np = lambda t: {k: np.asarray(v) for k, v in _flatten(t).items()}
    return meta, as_np(tree.get("base", {})), as_np(tree.get("lora", {}))


def _place(value: np.ndarray, dtype, sharding) -> jax.Array:
    value = np.asarray(value)
    if sharding is None:
        return jnp.asarray(value, dtype)
    # Each device reads only its own slice of the host array.
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: np.asarray(value[idx], dtype))


def load_transformer(path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None, dtype="float32",
                     param_dtype=None, attention: str = "auto", remat: str = "none", scan_unroll: int | bool = 1,
                     lora: LoraConfig | None | str = "checkpoint", lora_seed: int = 0) -> WanTransformer3DModel:
    """Loads a diffusers transformer folder (or an original Wan checkpoint) or a converted checkpoint.

    `lora="checkpoint"` keeps the LoRA the checkpoint carries (none for diffusers folders); `None`
    builds no adapters; a `LoraConfig` adds adapters, restored from the checkpoint when it holds ones
    of the same config and PEFT-initialised otherwise. With a `mesh`, every parameter is placed with
    its sharding from `spatialalign_jax.sharding`. fp32-only modules (time embedder, modulation
    tables, cross-attention norm) stay fp32 whatever `param_dtype` is, as in diffusers.
    """
    from . import sharding as sharding_lib

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
        from converters.io import read_base  # reads diffusers folders and original Wan checkpoints

        weights = read_base(path)
        cfg = WanConfig.from_diffusers(weights.config)
        ckpt_lora, base_source = None, params_lib.flax_from_diffusers(cfg, weights.state_dict)

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
        import orbax.checkpoint as ocp

        want = {"base": _nest({k: jax.ShapeDtypeStruct(shapes[k], targets[k].dtype, sharding=shardings[k])
                               for k in shapes if k not in lora_names})}
        if lora_cfg is not None and lora_cfg == ckpt_lora:
            want["lora"] = _nest({k: jax.ShapeDtypeStruct(shapes[k], targets[k].dtype, sharding=shardings[k])
                                  for k in lora_names})
        ckptr = ocp.StandardCheckpointer()
        # strict=False lets the restore skip what was not asked for, but it would also pad or cut an
        # array whose stored shape differs from the config's: check the shapes first.
        stored = {k: tuple(v.shape) for part in ckptr.metadata(path.absolute() / "params").item_metadata.tree.values()
                  for k, v in _flatten(part).items()}
        wrong = [f"{k}: stored {stored[k]}, the config makes {shapes[k]}" for k in shapes
                 if k in stored and stored[k] != shapes[k]]
        if wrong:
            raise ValueError(f"{path}: weights do not fit the config in {META_FILE}: " + "; ".join(wrong[:5]))
        restored = ckptr.restore(path.absolute() / "params", want, strict=False)
        values = _flatten(restored["base"])
        values.update(_flatten(restored.get("lora", {})))
    else:
        values = {k: _place(v, targets[k].dtype, shardings[k]) for k, v in base_source.items()}

    missing_lora = {k: shapes[k] for k in lora_names if k not in values}
    for k, v in lora_lib.init_lora(missing_lora, seed=lora_seed).items():
        values[k] = _place(v, targets[k].dtype, shardings[k])

    model = nnx.merge(*nnx.split(abstract))  # a concrete module whose arrays we now fill
    lora_lib.set_params(model, values)
    return model
