"""SpatialAlign in JAX: the Flax Wan2.1 transformer, LoRA, DPO + zeroth-order training.

Importing the package stays light (no JAX) so the PyTorch scoring process can use
`spatialalign_jax.store` alone; the JAX pieces load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "WanConfig": "config",
    "LoraConfig": "config",
    "WanTransformer3DModel": "model",
    "load_transformer": "checkpoint",
    "save_checkpoint": "checkpoint",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
