"""The whole sharding policy: the device mesh, where the batch goes, and one table of parameter rules.

Mesh axes are `data` and `fsdp` (a `tensor` or `context` axis can join the table later). The batch
is split over both; frozen weight matrices are FSDP-sharded (each weight's largest axis that the
`fsdp` size divides, never the stacked layer axis, which the scan walks through); LoRA weights and
their optimiser state are small and replicated.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")

# (regex on the Flax parameter name, rule). First match wins.
PARAM_RULES: tuple[tuple[str, str], ...] = (
    (r"\.lora_[AB]$", "replicate"),
    # vectors and modulation tables: too small to be worth a gather, and they meet batch-sharded activations
    (r"(\.bias|\.scale|scale_shift_table)$", "replicate"),
    (r".", "fsdp"),
)


def parse_mesh(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """`"data=2,fsdp=4"` -> `{"data": 2, "fsdp": 4}`; unnamed axes default to 1."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, Mapping):
        sizes = dict(spec)
    else:
        sizes = {}
        for part in str(spec).split(","):
            name, sep, value = part.partition("=")
            if not sep or not value.strip().isdigit():
                raise ValueError(f"mesh spec {spec!r}: expected 'data=D,fsdp=F' with positive integers")
            sizes[name.strip()] = int(value)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh axes {unknown} unknown; the mesh has axes {MESH_AXES}")
    if any(int(v) < 1 for v in sizes.values()):
        raise ValueError(f"mesh spec {spec!r}: axis sizes must be >= 1")
    return {k: int(v) for k, v in sizes.items()}


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: list | None = None) -> Mesh:
    """A (data, fsdp) mesh over all devices; with no spec, everything goes to `fsdp`... unless told."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec)
    if not sizes:
        sizes = {"data": 1, "fsdp": len(devices)}
    data, fsdp = sizes.get("data", 1), sizes.get("fsdp", 1)
    if "data" not in sizes and len(devices) % fsdp == 0:
        data = len(devices) // fsdp
    if "fsdp" not in sizes and len(devices) % data == 0:
        fsdp = len(devices) // data
    if data * fsdp != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but {len(devices)} are "
                         f"available; choose sizes whose product is {len(devices)}")
    return Mesh(np.asarray(devices).reshape(data, fsdp), MESH_AXES)


def param_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    for pattern, rule in PARAM_RULES:
        if re.search(pattern, name):
            break
    if rule == "replicate" or not shape:
        return P()
    n = mesh.shape["fsdp"]
    first = 1 if name.startswith("blocks.") else 0  # keep the scanned layer axis whole
    axes = sorted(range(first, len(shape)), key=lambda a: -shape[a])
    for axis in axes:
        if n > 1 and shape[axis] % n == 0:
            return P(*([None] * axis + ["fsdp"]))
    return P()


def param_shardings(shapes: Mapping[str, tuple[int, ...]], mesh: Mesh) -> dict[str, NamedSharding]:
    specs = {name: param_spec(name, tuple(shape), mesh) for name, shape in shapes.items()}
    fsdp = mesh.shape["fsdp"]
    # A weight the fsdp size divides along no axis stays whole on every device: correct, but memory
    # the user planned to split. Say so (norm scales and biases are small and expected).
    whole = [n for n, spec in specs.items() if spec == P() and fsdp > 1 and math.prod(shapes[n]) >= 1 << 20]
    if whole:
        log.warning("fsdp=%d divides no axis of %d large weights, which stay whole on every device (%s); an fsdp "
                    "size that divides the model width shards them", fsdp, len(whole),
                    ", ".join(whole[:4]) + (" ..." if len(whole) > 4 else ""))
    return {name: NamedSharding(mesh, spec) for name, spec in specs.items()}


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def microbatch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """(micro-batches, pairs, ...) arrays of gradient accumulation: pairs split over the data axes."""
    return NamedSharding(mesh, P(None, BATCH_AXES, *([None] * (ndim - 2))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
