"""Loading the scoring models from local Hugging Face format folders (never downloaded at run time)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_and_dtype(device: str | torch.device | None,
                     dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """The scoring models' defaults: CUDA when available, float32."""
    return (torch.device(device) if device is not None else default_device()), (dtype or torch.float32)


def half_dtype() -> torch.dtype:
    """The scorer's ``--half`` precision on CUDA: bfloat16 where the card has it (umT5-XXL overflows
    float16; Wan runs it in bfloat16), float16 on older cards."""
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


def load_pretrained(
    model_class: Any,
    model_dir: str | os.PathLike,
    what: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Any, torch.device, torch.dtype]:
    """``model_class.from_pretrained`` of the local folder ``model_dir``, in eval mode on its device.

    Returns the model, its device (CUDA when available unless given) and its dtype (float32 unless
    given). ``model_class`` is a transformers or diffusers model class; both take ``dtype``.
    """
    path = require_model_dir(model_dir, what)
    device, dtype = device_and_dtype(device, dtype)
    model = model_class.from_pretrained(path, local_files_only=True, dtype=dtype)
    return model.to(device).eval(), device, dtype
