"""Names and layouts between diffusers' `WanTransformer3DModel` state dict and the Flax model.

Flax names are diffusers' module paths with the blocks stacked on a leading layer axis:
`blocks.{i}.attn2.to_k.weight` (out, in)  <->  `blocks.attn2.to_k.kernel` (layers, in, out).
Leaves: `kernel` is the transposed `weight` (Conv3d: (out, in, t, h, w) -> (t, h, w, in, out)), a norm's
`scale` is its `weight`, `lora_A`/`lora_B` are PEFT's `lora_A.weight`/`lora_B.weight` transposed.
Everything here is numpy; shapes to expect come from the model itself (`expected_shapes`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from .config import LoraConfig, WanConfig

if TYPE_CHECKING:
    from .transformer import WanTransformer3DModel

FlatParams = dict[str, np.ndarray]


def abstract_model(cfg: WanConfig, lora: LoraConfig | None = None,
                   **model_kwargs: Any) -> tuple[WanTransformer3DModel, dict[str, Any]]:
    """The model built without allocating anything (`nnx.eval_shape`), and Flax flat name -> its
    abstract parameter (shape and dtype; LoRA ones included when `lora`)."""
    from flax import nnx

    from .transformer import WanTransformer3DModel

    model = nnx.eval_shape(lambda: WanTransformer3DModel(cfg, lora=lora, rngs=nnx.Rngs(0), **model_kwargs))
    return model, {".".join(map(str, path)): v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def expected_shapes(cfg: WanConfig, lora: LoraConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Flax flat name -> shape of every parameter of the model (LoRA ones included when `lora`)."""
    return {k: tuple(v.shape) for k, v in abstract_model(cfg, lora)[1].items()}


def _is_lora(name: str) -> bool:
    return name.endswith(".lora_A") or name.endswith(".lora_B")


def _diffusers_leaf(name: str, ndim: int) -> tuple[str, tuple[int, ...]]:
    """One unstacked Flax leaf -> (its diffusers name, the axis order of its diffusers layout)."""
    module, leaf = name.rsplit(".", 1) if "." in name else ("", name)
    if leaf in ("lora_A", "lora_B"):
        return f"{module}.{leaf}.weight", (1, 0)
    if leaf == "kernel":  # Linear (in, out) -> (out, in); Conv3d (t, h, w, in, out) -> (out, in, t, h, w)
        return f"{module}.weight", (4, 3, 0, 1, 2) if ndim == 5 else (1, 0)
    if leaf == "scale":
        return f"{module}.weight", tuple(range(ndim))
    return name, tuple(range(ndim))


def _diffusers_names(flax_name: str, dname: str, num_layers: int) -> list[str]:
    """Diffusers names of one Flax parameter (one per block for stacked block parameters)."""
    if flax_name.startswith("blocks."):
        return [f"blocks.{i}.{dname[len('blocks.'):]}" for i in range(num_layers)]
    return [dname]


def _from_diffusers(cfg: WanConfig, sd: Mapping[str, np.ndarray], shapes: dict[str, tuple[int, ...]],
                    what: str) -> FlatParams:
    out: FlatParams = {}
    used: set[str] = set()
    for name, shape in shapes.items():
        stacked = name.startswith("blocks.")
        leaf_shape = shape[1:] if stacked else shape
        dname, perm = _diffusers_leaf(name, len(leaf_shape))
        want = tuple(leaf_shape[a] for a in perm)
        dnames = _diffusers_names(name, dname, cfg.num_layers)
        missing = [d for d in dnames if d not in sd]
        if missing:
            raise ValueError(f"{what}: missing key {missing[0]!r} (expected shape {want}); "
                             f"{len(missing)} key(s) of this kind missing")
        for d in dnames:
            if tuple(np.shape(sd[d])) != want:
                raise ValueError(f"{what}: shape mismatch for {d!r}: got {tuple(np.shape(sd[d]))}, the model "
                                 f"expects {want} (config: {cfg})")
        leaves = [np.transpose(np.asarray(sd[d]), np.argsort(perm)) for d in dnames]
        out[name] = np.stack(leaves) if stacked else leaves[0]
        used.update(dnames)
    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise ValueError(f"{what}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all); "
                         "the config does not describe this checkpoint, or it is not a Wan2.1 T2V transformer")
    return out


def _to_diffusers(cfg: WanConfig, flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in flat.items():
        value = np.asarray(value)
        stacked = name.startswith("blocks.")
        dname, perm = _diffusers_leaf(name, value.ndim - stacked)
        leaves = value if stacked else value[None]
        for d, leaf in zip(_diffusers_names(name, dname, cfg.num_layers), leaves):
            out[d] = np.ascontiguousarray(np.transpose(leaf, perm))
    return out


def flax_from_diffusers(cfg: WanConfig, sd: Mapping[str, np.ndarray]) -> FlatParams:
    """Base weights: diffusers state dict -> Flax flat params (blocks stacked). Strict on keys and shapes."""
    shapes = {k: v for k, v in expected_shapes(cfg).items() if not _is_lora(k)}
    return _from_diffusers(cfg, sd, shapes, "transformer weights")


def diffusers_from_flax(cfg: WanConfig, flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Base weights: Flax flat params -> diffusers state dict."""
    return _to_diffusers(cfg, {k: v for k, v in flat.items() if not _is_lora(k)})


def lora_flax_from_peft(cfg: WanConfig, lora: LoraConfig, sd: Mapping[str, np.ndarray]) -> FlatParams:
    """LoRA weights in diffusers/PEFT naming (no `transformer.` prefix) -> Flax flat LoRA params."""
    shapes = {k: v for k, v in expected_shapes(cfg, lora).items() if _is_lora(k)}
    return _from_diffusers(cfg, sd, shapes, "LoRA weights")


def lora_peft_from_flax(cfg: WanConfig, lora: LoraConfig, flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flax flat LoRA params -> diffusers/PEFT naming (no `transformer.` prefix)."""
    del lora  # the names carry everything; kept for symmetry with `lora_flax_from_peft`
    return _to_diffusers(cfg, {k: v for k, v in flat.items() if _is_lora(k)})
