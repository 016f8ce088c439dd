"""Convert Wan2.1 weights (and optionally a LoRA) into a Flax/Orbax checkpoint.

    python -m converters.to_flax --src SRC --dst DST [--lora LORA] [--lora-alpha A]
                                 [--dtype float32|bfloat16] [--config CONFIG] [--overwrite]

SRC: a diffusers transformer folder (or a pipeline folder with transformer/), or an original Wan
checkpoint (folder with config.json, or a single .safetensors/.pth/.ckpt file). LORA: a LoRA file in
the diffusers/PEFT, DiffSynth, original/kohya or musubi-tuner (lora_unet_*) layout. DST is written
atomically; it may be new or an empty folder, anything else there is refused unless --overwrite,
which replaces all of it (the same rule as converters.to_diffusers).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from converters import io, layouts

log = logging.getLogger("converters.to_flax")

DTYPES = ("float32", "bfloat16")


def _cast_base(cfg, flat: Mapping[str, np.ndarray], dtype: str | None) -> dict[str, np.ndarray]:
    """Casts base parameters to `dtype` where the model stores them in its param dtype.

    Parameters the model keeps in fp32 whatever its param dtype (norms, modulation tables, the time
    embedder, as diffusers does) stay fp32; they are read from the model itself.
    """
    import jax.numpy as jnp

    from spatialalign_jax.model.params import abstract_model

    if dtype is None:
        return dict(flat)
    target = jnp.dtype(dtype)
    model_dtypes = {k: v.dtype for k, v in abstract_model(cfg, param_dtype=target)[1].items()}
    return {k: np.asarray(v).astype(model_dtypes.get(k, target), copy=False) for k, v in flat.items()}


def prepare_lora(cfg, base_shapes: Mapping[str, tuple[int, ...]], lora: layouts.CanonicalLora):
    """CanonicalLora -> (LoraConfig, Flax flat LoRA params) for the model described by `cfg`.

    `base_shapes`: diffusers name -> shape of the base weights, to size the zero factors of blocks the
    LoRA leaves out and to refuse targets that are not linear layers.
    """
    from spatialalign_jax.model.config import LoraConfig
    from spatialalign_jax.model.params import lora_flax_from_peft

    out_of_range = layouts.lora_out_of_range(lora, cfg.num_layers)
    if out_of_range:
        raise ValueError(
            f"LoRA has modules for blocks the model does not have (num_layers={cfg.num_layers}): "
            f"{layouts.format_keys(out_of_range)}"
        )
    shapes = {}
    for target in lora.targets:
        weight = target.replace("*", "0", 1) + ".weight"
        if len(base_shapes.get(weight, ())) != 2:
            raise ValueError(f"LoRA targets {target!r}, which is not a linear layer of this model "
                             f"(no 2-D {weight!r} in the base weights)")
        fan_out, fan_in = base_shapes[weight]
        shapes[target] = (fan_in, fan_out)
    lora = layouts.fill_missing_blocks(lora, cfg.num_layers, shapes)
    lora_cfg = LoraConfig(rank=lora.rank, alpha=lora.alpha, targets=tuple(lora.targets))
    return lora_cfg, lora_flax_from_peft(cfg, lora_cfg, lora.weights)


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    lora: str | Path | None = None,
    lora_alpha: float | None = None,
    dtype: str | None = None,
    config: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Converts `src` (+ `lora`) to an Orbax checkpoint at `dst`; returns `dst`. Nothing is left on failure."""
    from spatialalign_jax.model.checkpoint import save_checkpoint
    from spatialalign_jax.model.config import WanConfig
    from spatialalign_jax.model.params import flax_from_diffusers

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported; choose one of {list(DTYPES)}")
    if lora_alpha is not None and lora is None:  # before minutes of reading the base
        raise ValueError("--lora-alpha needs --lora")
    dst = io.check_destination(dst, overwrite=overwrite)
    base = io.read_base(src, config_path=config)
    log.info("read %s (%s layout, %d tensors, %s)", base.source, base.layout, len(base.state_dict), base.dtype)
    try:
        cfg = WanConfig.from_diffusers(base.config)
        flat = flax_from_diffusers(cfg, base.state_dict)
    except ValueError as e:
        raise ValueError(f"{base.source}: {e}") from None
    # The stacked copy is all that is needed from here: free the per-block arrays (a full model's worth).
    base_shapes = {k: tuple(v.shape) for k, v in base.state_dict.items()}
    source_dtype = base.dtype
    del base
    if dtype is None and source_dtype not in DTYPES:
        log.info("source dtype %s is not one the model runs in: storing float32", source_dtype)
        dtype = "float32"
    flat = _cast_base(cfg, flat, dtype)

    lora_cfg = lora_flat = None
    if lora is not None:
        lora_cfg, lora_flat = prepare_lora(cfg, base_shapes, io.read_lora(lora, alpha=lora_alpha))

    save_checkpoint(dst, cfg, flat, lora_cfg, lora_flat, overwrite=overwrite)  # atomic itself
    log.info("wrote %s (%d base tensors%s)", dst, len(flat),
             f", LoRA rank {lora_cfg.rank} alpha {lora_cfg.alpha:g} on {len(lora_cfg.targets)} targets"
             if lora_cfg else "")
    return dst


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m converters.to_flax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="diffusers transformer folder or original Wan checkpoint")
    p.add_argument("--dst", required=True, help="output Orbax checkpoint folder")
    p.add_argument("--lora", help="LoRA file (.safetensors/.pth/.ckpt) or folder holding one")
    p.add_argument("--lora-alpha", type=_positive_float, help="LoRA alpha, overriding what the file carries")
    p.add_argument("--dtype", choices=DTYPES, help="base parameter dtype (default: as stored in SRC)")
    p.add_argument("--config", help="config.json (diffusers or original layout) for a SRC without one")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST (all of it) if it exists and is not an empty folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        convert(args.src, args.dst, lora=args.lora, lora_alpha=args.lora_alpha, dtype=args.dtype,
                config=args.config, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"to_flax: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
