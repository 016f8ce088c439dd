"""Export a converted Flax checkpoint back to diffusers.

    python -m converters.to_diffusers --src CKPT --dst DST [--merge [--base BASE]] [--max-shard-size 10GB] [--overwrite]

Default: the checkpoint's LoRA as a safetensors file that `WanPipeline.load_lora_weights` loads as
is (keys `transformer.blocks.N.attn2.to_k.lora_A.weight`, alpha kept in the `lora_adapter_metadata`
entry diffusers' `save_lora_weights` writes). DST is a `.safetensors` path, or a folder that gets
`pytorch_lora_weights.safetensors`. With --merge: a full `WanTransformer3DModel` folder
(config.json + safetensors, sharded above --max-shard-size) with W + (alpha/r) B A folded in.
Either output is written atomically. DST may be new or an empty folder; anything else there is
refused unless --overwrite, which replaces all of it (the same rule as converters.to_flax).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from converters import io
from spatialalign_jax.common import atomic

log = logging.getLogger("converters.to_diffusers")

CONFIG_NAME = "config.json"
WEIGHTS_NAME_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def _to_torch(value: np.ndarray):
    import torch

    value = np.ascontiguousarray(value)
    if value.dtype.name == "bfloat16":  # ml_dtypes: numpy has no native bf16, torch does
        return torch.from_numpy(value.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(value)


def _load(src: str | Path):
    from spatialalign_jax.model.checkpoint import lora_config_from_meta, read_checkpoint
    from spatialalign_jax.model.config import WanConfig

    meta, base, lora = read_checkpoint(src)
    return WanConfig.from_diffusers(meta["config"]), base, lora_config_from_meta(meta), lora, meta


def _base_state_dict(base_path: str | Path, cfg) -> dict[str, np.ndarray]:
    """Diffusers-named base weights from a diffusers folder, an original Wan checkpoint or a converted
    checkpoint, refusing one whose config differs from the LoRA's model."""
    from spatialalign_jax.model.checkpoint import is_checkpoint, read_checkpoint
    from spatialalign_jax.model.config import WanConfig
    from spatialalign_jax.model.params import diffusers_from_flax

    if is_checkpoint(base_path):
        meta, base, _ = read_checkpoint(base_path)
        if not meta.get("has_base", True):
            raise ValueError(f"--base {str(base_path)!r} holds LoRA weights only; pass the base model it was "
                             "trained on (a diffusers folder, an original Wan checkpoint or a converted base)")
        base_cfg = WanConfig.from_diffusers(meta["config"])
        sd = diffusers_from_flax(base_cfg, base)
    else:
        weights = io.read_base(base_path)
        base_cfg, sd = WanConfig.from_diffusers(weights.config), weights.state_dict
    if base_cfg != cfg:
        raise ValueError(f"base model {str(base_path)!r} has config {base_cfg}, but the LoRA was trained on {cfg}")
    return sd


def peft_adapter_config(lora_cfg, modules: Sequence[str]) -> dict[str, Any]:
    """The PEFT `LoraConfig.to_dict()` that diffusers' training scripts store with a LoRA."""
    from peft import LoraConfig as PeftLoraConfig

    alpha = lora_cfg.alpha
    alpha = int(alpha) if float(alpha).is_integer() else float(alpha)
    # Full module names as targets: PEFT matches a target as a dotted suffix, so each hits one layer.
    return PeftLoraConfig(r=lora_cfg.rank, lora_alpha=alpha, target_modules=sorted(modules),
                          lora_dropout=0.0, init_lora_weights=True).to_dict()


def _save_lora_file(path: Path, layers: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
    from diffusers import WanPipeline

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.scratch-") as scratch:
        # diffusers' own writer, so the file is what its training scripts produce.
        WanPipeline.save_lora_weights(scratch, transformer_lora_layers=dict(layers),
                                      transformer_lora_adapter_metadata=dict(metadata), weight_name=io.LORA_WEIGHTS)
        written = Path(scratch) / io.LORA_WEIGHTS
        atomic.give_plain_mode(written)
        os.replace(written, path)


def export_lora(src: str | Path, dst: str | Path, *, overwrite: bool = False, fold_alpha: bool = False) -> Path:
    """Writes the checkpoint's LoRA as a diffusers LoRA safetensors file; returns its path.

    `dst` is the file (`*.safetensors`) or a folder that gets `pytorch_lora_weights.safetensors`; either
    follows the converters' rule for existing outputs (`io.check_destination`: new or an empty folder,
    else only with `overwrite`, which replaces the whole file or folder).
    The file holds the trained factors and alpha (in the adapter metadata, as diffusers' training scripts
    write it). `fold_alpha` folds alpha / rank into B and writes alpha = rank, for loaders that ignore
    that metadata (ComfyUI, older diffusers): the same weights under any loader.
    """
    from spatialalign_jax.model.params import lora_peft_from_flax

    dst = Path(dst)
    file = dst if dst.suffix == ".safetensors" else dst / io.LORA_WEIGHTS
    io.check_destination(dst, overwrite=overwrite)
    cfg, _, lora_cfg, lora, _ = _load(src)
    if lora_cfg is None:
        raise ValueError(f"{src} holds no LoRA weights; use --merge to export the base model as a diffusers folder")
    peft = lora_peft_from_flax(cfg, lora_cfg, lora)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in peft})
    scale = lora_cfg.alpha / lora_cfg.rank
    if scale != 1 and fold_alpha:
        peft = {k: (np.asarray(v, np.float32) * np.float32(scale) if ".lora_B." in k else v) for k, v in peft.items()}
        log.info("alpha / rank = %g folded into lora_B; written with alpha = rank = %d", scale, lora_cfg.rank)
        lora_cfg = dataclasses.replace(lora_cfg, alpha=float(lora_cfg.rank))
    elif scale != 1:
        log.warning("LoRA alpha %g != rank %d: diffusers reads alpha from the file's adapter metadata, but loaders "
                    "that ignore it (ComfyUI, older diffusers) would scale it by 1 instead of alpha / rank = %g; "
                    "pass --fold-alpha for a file every loader reads alike", lora_cfg.alpha, lora_cfg.rank, scale)
    metadata = peft_adapter_config(lora_cfg, modules)
    layers = {k: _to_torch(np.asarray(v, np.float32)) for k, v in peft.items()}
    with io.atomic_output(dst, overwrite=overwrite) as tmp:
        if file != dst:  # the folder is written whole, with the file in it
            tmp.mkdir()
            _save_lora_file(tmp / file.name, layers, metadata)
        else:
            _save_lora_file(tmp, layers, metadata)
    log.info("wrote LoRA %s: %d modules, rank %d, alpha %g", file, len(modules), lora_cfg.rank, lora_cfg.alpha)
    return file


def merge_lora(sd: Mapping[str, np.ndarray], lora_peft: Mapping[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """W + scale * B @ A for every LoRA module, computed in fp32 and stored in W's dtype."""
    out = dict(sd)
    for key in lora_peft:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        a = np.asarray(lora_peft[key], np.float32)
        b = np.asarray(lora_peft[f"{module}.lora_B.weight"], np.float32)
        w = sd[f"{module}.weight"]
        out[f"{module}.weight"] = (np.asarray(w, np.float32) + np.float32(scale) * (b @ a)).astype(w.dtype)
    return out


def write_diffusers_folder(folder: Path, config: Mapping[str, Any], sd: dict[str, np.ndarray],
                           *, max_shard_size: int | str = "10GB") -> None:
    """config.json + safetensors in the file layout of diffusers' `save_pretrained`.

    Empties `sd` while writing: each shard's arrays are released once written, so the peak stays near
    one model plus one shard.
    """
    import diffusers
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    tensors = {k: _to_torch(v) for k, v in sd.items()}  # views of the same memory
    sd.clear()
    config = {**config, "_diffusers_version": diffusers.__version__}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size,
                                               filename_pattern=WEIGHTS_NAME_PATTERN)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n].contiguous() for n in names}, folder / filename, metadata={"format": "pt"})
        atomic.give_plain_mode(folder / filename)
        for n in names:
            del tensors[n]
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def export_merged(src: str | Path, dst: str | Path, *, overwrite: bool = False,
                  max_shard_size: int | str = "10GB", base: str | Path | None = None) -> Path:
    """Writes a full diffusers `WanTransformer3DModel` folder with the LoRA folded into the weights.

    A LoRA-only checkpoint (what training writes) is merged into `base`, by default the base model
    path the training run recorded in the checkpoint.
    """
    from spatialalign_jax.model.params import diffusers_from_flax, lora_peft_from_flax

    dst = io.check_destination(dst, overwrite=overwrite)
    cfg, base_flat, lora_cfg, lora, meta = _load(src)
    base = base or (None if base_flat else meta.get("base"))
    if base is not None:
        sd = _base_state_dict(base, cfg)
    elif base_flat:
        sd = diffusers_from_flax(cfg, base_flat)
    else:
        raise ValueError(f"{src} holds LoRA weights only and names no base model; pass --base with the "
                         "model it was trained on (diffusers folder, original Wan or converted checkpoint)")
    del base_flat  # a full model's worth of memory
    if lora_cfg is not None:
        sd = merge_lora(sd, lora_peft_from_flax(cfg, lora_cfg, lora), lora_cfg.scale)
    else:
        log.info("%s has no LoRA: writing the base model as is", src)
    with io.atomic_output(dst, overwrite=overwrite) as tmp:
        write_diffusers_folder(tmp, cfg.to_diffusers(), sd, max_shard_size=max_shard_size)
    log.info("wrote merged WanTransformer3DModel folder %s", dst)
    return dst


def _shard_size(text: str) -> str:
    """A size as huggingface_hub's shard splitter reads it (a number and KB/MB/GB/TB), checked at parse time."""
    if not re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*[KMGT]B\s*", text, flags=re.IGNORECASE):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number and a unit, such as 5GB or 500MB")
    return text.strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m converters.to_diffusers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="converted checkpoint folder (from converters.to_flax or training)")
    p.add_argument("--dst", required=True, help="LoRA .safetensors path or folder; with --merge, a model folder")
    p.add_argument("--merge", action="store_true", help="write a full WanTransformer3DModel with the LoRA folded in")
    p.add_argument("--max-shard-size", type=_shard_size, default="10GB",
                   help="with --merge: largest safetensors shard, e.g. 5GB (units KB, MB, GB, TB; default 10GB)")
    p.add_argument("--base", help="with --merge: the base model to fold a LoRA-only checkpoint into (default: the "
                                  "base path a training run recorded in it)")
    p.add_argument("--fold-alpha", action="store_true",
                   help="LoRA export: fold alpha/rank into lora_B and write alpha = rank, for loaders that ignore "
                        "the adapter metadata (ComfyUI); the same weights, different factors")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST (all of it) if it exists and is not an empty folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fold_alpha and args.merge:
        parser.error("--fold-alpha applies to a LoRA export; --merge folds the whole LoRA into the weights")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.merge:
            export_merged(args.src, args.dst, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
                          base=args.base)
        else:
            export_lora(args.src, args.dst, overwrite=args.overwrite, fold_alpha=args.fold_alpha)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"to_diffusers: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
