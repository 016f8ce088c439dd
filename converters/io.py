"""Reading Wan2.1 weights from disk into `{diffusers name: numpy array}` dicts.

Inputs: diffusers transformer folders (config.json + single or sharded safetensors), original Wan
checkpoints (folder with its own config.json, or a single .safetensors/.pth/.ckpt file), and LoRA
files (.safetensors, or the .pth/.ckpt pickles training scripts write; a PEFT adapter folder too).
bf16 tensors stay bf16 (`ml_dtypes.bfloat16` numpy arrays), so nothing is rounded on the way in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from converters import layouts
from spatialalign_jax.common import atomic
from spatialalign_jax.model.config import WanConfig

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
# diffusers' `save_lora_weights` stores the PEFT adapter config under this safetensors metadata key.
LORA_METADATA_KEY = "lora_adapter_metadata"
# Wrappers training scripts put around a state dict in their pickles (Lightning, DeepSpeed, ...).
_PICKLE_WRAPPERS = ("state_dict", "module", "model")


@dataclasses.dataclass
class BaseWeights:
    """A transformer's weights in diffusers naming plus its diffusers-style config."""

    config: dict[str, Any]
    state_dict: dict[str, np.ndarray]
    layout: str  # "diffusers" or "original"
    source: str

    @property
    def dtype(self) -> str:
        """The most common parameter dtype of the source (e.g. 'float32', 'bfloat16')."""
        return Counter(str(v.dtype) for v in self.state_dict.values()).most_common(1)[0][0]


def _require_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype in (torch.float32, torch.float16, torch.float64) or not t.is_floating_point():
        return t.numpy()
    return t.float().numpy()  # fp8 and other types numpy cannot hold


def _unwrap_pickle(obj: Any, path: Path) -> dict[str, Any]:
    import torch

    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _PICKLE_WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), found a {type(obj).__name__}")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{path}: entries {layouts.format_keys(map(str, not_tensors))} are not tensors; expected a state "
            f"dict, possibly wrapped in one of {list(_PICKLE_WRAPPERS)}"
        )
    return dict(obj)


def _corrupt(path: Path, err: BaseException) -> ValueError:
    return ValueError(f"{path}: cannot read the weights ({type(err).__name__}: {err}); the file is truncated or "
                      "corrupt (an interrupted download?): download or save it again")


def load_state_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Loads one weights file into numpy arrays; returns (state dict, safetensors metadata or {})."""
    path = Path(path)
    _require_exists(path, "weights file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors' numpy reader needs)
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="np") as f:
                keys, metadata = list(f.keys()), dict(f.metadata() or {})
                fp8 = {k for k in keys if f.get_slice(k).get_dtype().startswith("F8")}
                sd = {k: f.get_tensor(k) for k in keys if k not in fp8}
            if fp8:
                # numpy has no float8 types: read those through torch and upcast, as for .pth files.
                with safe_open(str(path), framework="pt") as f:
                    sd.update({k: _torch_to_numpy(f.get_tensor(k)) for k in fp8})
                log.info("%s: %d float8 tensors upcast to float32", path, len(fp8))
        except SafetensorError as e:
            raise _corrupt(path, e) from None
        return {k: sd[k] for k in keys}, metadata
    if suffix in PICKLE_SUFFIXES:
        import pickle

        import torch

        try:
            # weights_only: a checkpoint is data, never code to run.
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "Unsupported global" not in str(e):  # not a pickle at all: an LFS pointer, an HTML page, noise
                raise _corrupt(path, e) from None
            raise ValueError(f"{path}: torch.load(weights_only=True) refused it ({e}); a weights file holds "
                             "tensors only, and this one holds other objects: save its state dict alone") from None
        except (RuntimeError, EOFError, IndexError, KeyError, ValueError) as e:
            raise _corrupt(path, e) from None
        return {k: _torch_to_numpy(v) for k, v in _unwrap_pickle(obj, path).items()}, {}
    raise ValueError(
        f"{path}: unsupported weights file type {suffix!r}; expected one of "
        f"{list(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}"
    )


def _load_files(files: list[Path]) -> dict[str, np.ndarray]:
    sd: dict[str, np.ndarray] = {}
    for f in files:
        part, _ = load_state_file(f)
        dup = sorted(set(part) & set(sd))
        if dup:
            raise ValueError(f"{f}: keys {layouts.format_keys(dup)} also appear in another shard")
        sd.update(part)
    return sd


def _folder_weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder: those a `*.index.json` names, else the single file(s)."""
    indexes = sorted(folder.glob("*.safetensors.index.json")) or sorted(folder.glob("*.bin.index.json"))
    if len(indexes) > 1:
        raise ValueError(f"{folder}: several shard indexes {[i.name for i in indexes]}; keep exactly one")
    if indexes:
        index = indexes[0]
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object; not a safetensors shard index")
        shards = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [s.name for s in shards if not s.exists()]
        if missing:
            raise FileNotFoundError(
                f"{folder}: shard files {missing} named by {index.name} are missing; download or copy all "
                f"{len(shards)} shards next to the index"
            )
        return shards
    if (folder / DIFFUSERS_WEIGHTS).exists():
        return [folder / DIFFUSERS_WEIGHTS]
    files = sorted(folder.glob("*.safetensors")) or sorted(
        p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES
    )
    if not files:
        raise FileNotFoundError(
            f"{folder}: no weights found; expected {DIFFUSERS_WEIGHTS}, sharded *.safetensors with a "
            "*.safetensors.index.json, or a .pth/.ckpt file"
        )
    return files


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def is_original_config(config: Mapping[str, Any]) -> bool:
    return "dim" in config and "num_heads" in config


def read_base(src: str | os.PathLike, *, config_path: str | os.PathLike | None = None) -> BaseWeights:
    """Reads a diffusers transformer folder or an original Wan checkpoint (folder or single file).

    The result is always in diffusers naming. `config_path` (a config.json in either layout) overrides
    or supplies the config; without any, it is inferred from tensor shapes and a log line says so.
    """
    src = Path(src)
    _require_exists(src, "source checkpoint")
    config: dict[str, Any] | None = None
    if src.is_dir():
        if (src / "model_index.json").exists() and (src / "transformer").is_dir():
            if (src / "transformer_2").is_dir():
                # Wan2.2 A14B pipelines hold two experts; WanPipeline runs transformer/ at high noise.
                log.warning("%s holds two transformers (Wan2.2 A14B): reading transformer/, the high-noise "
                            "expert; point at %s for the low-noise one", src, src / "transformer_2")
            else:
                log.info("%s is a pipeline folder: reading its transformer/ subfolder", src)
            src = src / "transformer"
        if (src / "config.json").exists():
            config = _read_json(src / "config.json")
        files = _folder_weight_files(src)
    else:
        files = [src]
    if config_path is not None:
        _require_exists(Path(config_path), "config file")
        config = _read_json(Path(config_path))
    if config is not None:
        if is_original_config(config):
            config = layouts.original_config_to_diffusers(config)
        # Refuse a model this one cannot represent before reading tens of GB of weights.
        WanConfig.from_diffusers(config)

    sd = _load_files(files)
    original = layouts.is_original_layout(sd)
    if original:
        sd = layouts.original_to_diffusers(sd)
    else:
        prefix = layouts.common_prefix(sd, ("transformer.",))
        sd = {k[len(prefix):]: v for k, v in sd.items()}

    if config is None:
        config = layouts.infer_diffusers_config(sd)
        log.warning(
            "%s has no config.json: inferred the config from tensor shapes (head dim 128, eps 1e-6, "
            "rope_max_seq_len 1024): %s; pass --config if that is wrong", src, config
        )
    return BaseWeights(config=dict(config), state_dict=sd, layout="original" if original else "diffusers",
                       source=str(src))


def _lora_file_in_folder(folder: Path) -> Path:
    for name in (LORA_WEIGHTS, "adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).exists():
            return folder / name
    candidates = sorted(folder.glob("*.safetensors")) + sorted(
        p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES
    )
    if len(candidates) == 1:
        return candidates[0]
    raise FileNotFoundError(
        f"{folder}: cannot tell which file is the LoRA ({[c.name for c in candidates] or 'no weight files'}); "
        f"expected {LORA_WEIGHTS} or adapter_model.safetensors, or pass the file itself"
    )


def read_lora_metadata(path: Path, file_metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The PEFT adapter config of a LoRA: safetensors metadata, else an adapter_config.json beside it."""
    raw = file_metadata.get(LORA_METADATA_KEY)
    if raw:
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: metadata entry {LORA_METADATA_KEY!r} is not valid JSON ({e})") from None
    adapter_config = path.parent / "adapter_config.json"
    if adapter_config.exists():
        return _read_json(adapter_config)
    return None


def read_lora(path: str | os.PathLike, *, alpha: float | None = None) -> layouts.CanonicalLora:
    """Reads a LoRA file (or a folder holding one) in any accepted layout; see `layouts.normalize_lora`."""
    path = Path(path)
    _require_exists(path, "LoRA file")
    if path.is_dir():
        path = _lora_file_in_folder(path)
    sd, file_metadata = load_state_file(path)
    metadata = read_lora_metadata(path, file_metadata)
    lora = layouts.normalize_lora(sd, metadata=metadata, alpha=alpha, source=str(path))
    log.info("LoRA %s: layout %s, %d modules, rank %d, alpha %g (from %s)", path, lora.layout,
             len(lora.modules), lora.rank, lora.alpha, lora.alpha_source)
    return lora


# ----------------------------------------------------------------------------------------------------
# Writing


def check_destination(dst: str | os.PathLike, *, overwrite: bool) -> Path:
    """The converters' --dst, checked before any work by the project's one rule for outputs
    (`spatialalign_jax.common.atomic.check_output`): a new path or an empty folder is written, anything
    else only with --overwrite (and then replaced whole), never a path under a file."""
    return atomic.check_output(dst, overwrite=overwrite, flag="--overwrite", what="destination")


@contextlib.contextmanager
def atomic_output(dst: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """`spatialalign_jax.common.atomic.atomic_output` behind the converters' destination check (checked
    again at write time): an existing `dst` other than an empty folder is refused unless `overwrite`,
    and a failed conversion leaves nothing behind."""
    with atomic.atomic_output(check_destination(dst, overwrite=overwrite)) as tmp:
        yield tmp
