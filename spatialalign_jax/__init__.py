"""SpatialAlign in JAX: the Flax Wan2.1 transformer, LoRA, DPO + zeroth-order training.

The package is layered (README, "For contributors"): ``common`` (store layout, atomic writes, the DSR
type table; shared with the PyTorch scoring process), ``model``, then the top-level ``converters``,
then ``sample`` and ``train``. This module is the facade above them all. Importing it stays light
(no JAX) so the scoring process can use ``spatialalign_jax.common`` alone; the names below load their
layer on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "WanConfig": "spatialalign_jax.model.config",
    "LoraConfig": "spatialalign_jax.model.config",
    "WanTransformer3DModel": "spatialalign_jax.model.transformer",
    "save_checkpoint": "spatialalign_jax.model.checkpoint",
    "load_transformer": "converters.load",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
