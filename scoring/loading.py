"""Loading the scoring models from local Hugging Face format folders (never downloaded at run time).

torch is imported where it is used, so that the CLI can name this module's errors without loading it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch


def default_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_and_dtype(device: str | torch.device | None,
                     dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """The scoring models' defaults: CUDA when available, float32."""
    import torch

    return (torch.device(device) if device is not None else default_device()), (dtype or torch.float32)


def half_dtype() -> torch.dtype:
    """The scorer's ``--half`` precision on CUDA: bfloat16 where the card has it (umT5-XXL overflows
    float16; Wan runs it in bfloat16), float16 on older cards."""
    import torch

    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def require_model_dir(model_dir: str | os.PathLike, what: str) -> Path:
    """The folder of a local model, or a clear error saying which folder is missing."""
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what}: model folder {str(path)!r} does not exist. Pass the local folder of a Hugging Face "
            f"format checkpoint (one holding config.json); models are never downloaded at run time."
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{what}: {str(path)!r} has no config.json; it is not a Hugging Face format model folder "
            f"(save one with save_pretrained, or download the checkpoint into it beforehand)."
        )
    return path


class ModelFolderError(ValueError):
    """A model folder that exists but holds another model, or files its loader cannot read."""


def model_type_of(path: Path, what: str) -> str | None:
    """The architecture a Hugging Face folder's config.json names: transformers' ``model_type`` or
    diffusers' ``_class_name``."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{what}: cannot read {str(path / 'config.json')!r}: {e}") from None
    if not isinstance(config, dict):
        raise ModelFolderError(f"{what}: {str(path / 'config.json')!r} is not a JSON object")
    return config.get("model_type") or config.get("_class_name")


def load_pretrained(
    model_class: Any,
    model_dir: str | os.PathLike,
    what: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    expect: Sequence[str],
) -> tuple[Any, torch.device, torch.dtype]:
    """``model_class.from_pretrained`` of the local folder ``model_dir``, in eval mode on its device.

    ``expect`` lists the architectures (``model_type`` / ``_class_name``) the folder may hold: a
    transformers folder of another model would otherwise load with randomly initialised weights, and
    only a warning. Returns the model, its device (CUDA when available unless given) and its dtype
    (float32 unless given). ``model_class`` is a transformers or diffusers model class; both take ``dtype``.
    """
    path = require_model_dir(model_dir, what)
    found = model_type_of(path, what)
    if found not in expect:
        raise ModelFolderError(
            f"{what}: {str(path)!r} holds a {found!r} model, not {' / '.join(map(repr, expect))}; "
            "check which folder each model flag names")
    device, dtype = device_and_dtype(device, dtype)
    try:
        model = model_class.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"{what}: cannot load {str(path)!r} ({type(e).__name__}: {e}); is the download "
                               "complete?") from e
    return model.to(device).eval(), device, dtype


def load_processor(processor_class: Any, model_dir: str | os.PathLike, what: str) -> Any:
    """``processor_class.from_pretrained`` of a local folder (a processor or tokenizer), or a clear error."""
    try:
        return processor_class.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ModelFolderError(
            f"{what}: cannot load its preprocessing files (processor / tokenizer configs) from {os.fspath(model_dir)!r} "
            f"({type(e).__name__}: {e}); they come with the model's Hugging Face folder") from e
