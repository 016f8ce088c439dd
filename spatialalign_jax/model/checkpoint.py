"""Converted transformer checkpoints (Orbax): the format, its writer and its readers.

A converted checkpoint is a folder:

    spatialalign.json   {"format": "spatialalign-jax/wan-transformer", "version": 1,
                         "config": <diffusers config>, "lora": {"rank", "alpha", "targets"} | null,
                         "has_base": bool, "param_dtype": "float32" | "bfloat16", ...}
    params/             an Orbax PyTree checkpoint: {"base": {...}, "lora": {...}} nested by module path

It is written into a temporary sibling and renamed into place, so a failed write leaves nothing.
`restore_params` restores each parameter straight into its sharding on the mesh (no full copy per
device). Building a model from any source (this format, a diffusers folder, an original Wan
checkpoint) is `converters.load.load_transformer`, one layer up: the model layer reads no foreign
formats.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from spatialalign_jax.common.atomic import atomic_output, check_output

from .config import LoraConfig, WanConfig

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

    dst = check_output(Path(dst).absolute(), overwrite=overwrite, flag="overwrite=True (CLI: --overwrite)",
                       what="checkpoint")
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


def restore_params(path: str | os.PathLike, targets: Mapping[str, jax.ShapeDtypeStruct], *,
                   lora: bool) -> dict[str, jax.Array]:
    """Restores a converted checkpoint's base weights (and its LoRA weights when ``lora``) as flat params,
    each straight into the shape, dtype and sharding of its ``targets`` entry (``.lora_A``/``.lora_B``
    names are the LoRA ones). A stored array whose shape differs from its target's is refused, restored
    or not: Orbax would pad or cut it."""
    import orbax.checkpoint as ocp

    path = Path(path)
    lora_names = {k for k in targets if k.endswith((".lora_A", ".lora_B"))}
    want = {"base": _nest({k: v for k, v in targets.items() if k not in lora_names})}
    if lora:
        want["lora"] = _nest({k: targets[k] for k in lora_names})
    ckptr = ocp.StandardCheckpointer()
    # strict=False lets the restore skip what was not asked for, but it would also pad or cut an
    # array whose stored shape differs from the config's: check the shapes first.
    stored = {k: tuple(v.shape) for part in ckptr.metadata(path.absolute() / "params").item_metadata.tree.values()
              for k, v in _flatten(part).items()}
    wrong = [f"{k}: stored {stored[k]}, the config makes {tuple(targets[k].shape)}" for k in targets
             if k in stored and stored[k] != tuple(targets[k].shape)]
    if wrong:
        raise ValueError(f"{path}: weights do not fit the config in {META_FILE}: " + "; ".join(wrong[:5]))
    restored = ckptr.restore(path.absolute() / "params", want, strict=False)
    values = _flatten(restored["base"])
    values.update(_flatten(restored.get("lora", {})))
    return values
