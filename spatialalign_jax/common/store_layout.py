"""The dataset store's layout: the one interface between the JAX trainer and the PyTorch scorer.

Layout version 1
================

One directory per dataset, a zarr v3 hierarchy written with TensorStore (``zarr3`` driver on the
``file`` kvstore)::

    STORE/
      zarr.json        zarr3 group node; its attributes repeat store.json (for zarr tools)
      store.json       {"layout_version": 1, "num_prompts": P, "samples_per_prompt": S,
                        "latent_shape": [C, F, H, W], "num_frames": T, "text_dim": D,
                        "max_text_len": 512, "text_dtype": "float32" | "bfloat16"}
      prompts.json     list of P dicts: type, prompt_id, scene, initial_SR, final_SR, animal,
                       object, prompt, split ("train" | "test"), optional group
      text_emb/        (P, L, D)  text_dtype  chunk (1, L, D)  rows [0, text_len[p]) are the
                                                               prompt's umT5 rows, zeros after
      text_len/        (P,)       int32       chunk (1,)       0 = not encoded yet
      neg_text_emb/    (L, D)     text_dtype  chunk (L, D)     the negative prompt, same rule
      neg_text_len/    (1,)       int32
      latents/         (P, S, C, F, H, W) float32  chunk (1, 1, C, F, H, W)
      seed/            (P, S)     int64       chunk (1, S)     -1 = no latents yet
      boxes_animal/    (P, S, T, 4) float32   chunk (1, S, T, 4)  (x0, y0, x1, y1) px, NaN = missing
      boxes_object/    (P, S, T, 4) float32   chunk (1, S, T, 4)
      dsr/             (P, S)     float32     chunk (1, S)     NaN = unscored or invalid
      status/          (P, S)     int8        chunk (1, S)     a ``Status`` code

with L = max_text_len. Every array is chunked along the prompt axis, so processes that write
disjoint prompts never touch the same chunk and need no locks; the file kvstore replaces a chunk
atomically (temp file + rename), so a reader never sees a torn chunk.

Commit markers: a sample's latents are written before its seed, and its boxes and DSR before its
status, so ``seed >= 0`` means the latents are complete and ``status != UNSCORED`` means the
score is complete, whenever a writer is interrupted. Likewise ``text_len > 0`` for text rows.

This module is the layout itself (names, codes, array specs), plain data and numpy; `store.py`
opens, creates, reads and writes stores with TensorStore. Both the JAX trainer and the PyTorch
scorer import them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

LAYOUT_VERSION = 1
STORE_JSON = "store.json"
PROMPTS_JSON = "prompts.json"

# The Wan VAE's compression, which relates a store's latent_shape to its decoded num_frames (its config's
# scale_factor_temporal / scale_factor_spatial): the first frame alone, then 4 frames per latent frame.
VAE_SCALE_TEMPORAL = 4
VAE_SCALE_SPATIAL = 8


def decoded_frames(latent_frames: int) -> int:
    """Frames the Wan VAE decodes ``latent_frames`` latent frames to: 21 -> 81."""
    return (latent_frames - 1) * VAE_SCALE_TEMPORAL + 1


# The prompt-table columns of SPEC section 2, plus the split; "group" is optional.
PROMPT_COLUMNS = ("type", "prompt_id", "scene", "initial_SR", "final_SR", "animal", "object", "prompt")
OPTIONAL_PROMPT_COLUMNS = ("group",)
SPLITS = ("train", "test")
TEXT_DTYPES = ("float32", "bfloat16")


class Status(enum.IntEnum):
    """Per-sample status codes stored in ``status`` (int8). Codes are part of layout version 1."""

    UNSCORED = 0
    VALID = 1
    # Invalid videos (SPEC section 4): the sample was scored, the video fails a validity rule.
    TOO_MANY_REDUNDANT_FRAMES = 2
    TOO_FEW_VALID_FRAMES = 3
    NO_VALID_RUN = 4
    TOO_FEW_TRACKED_FRAMES = 5
    # Failures: the sample could not be scored; re-scoring may succeed once the cause is fixed.
    UNREADABLE_VIDEO = 10
    WRONG_FRAME_COUNT = 11
    MISSING_PROMPT = 12
    MODEL_ERROR = 13

    @property
    def description(self) -> str:
        return STATUS_DESCRIPTIONS[self]

    @property
    def is_invalid(self) -> bool:
        """Scored, but the video breaks a validity rule (counts as incorrect in Correctness@tau)."""
        return self in _INVALID

    @property
    def is_failure(self) -> bool:
        """Not scored because of bad input or a model error."""
        return self in _FAILURE


STATUS_DESCRIPTIONS: dict[Status, str] = {
    Status.UNSCORED: "not scored yet",
    Status.VALID: "valid: DSR-Score computed",
    Status.TOO_MANY_REDUNDANT_FRAMES: "invalid: more than 16 redundant frames (extra or wrongly labelled detections)",
    Status.TOO_FEW_VALID_FRAMES: "invalid: fewer than 20 frames with exactly the animal and the object detected",
    Status.NO_VALID_RUN: "invalid: no run of 4 consecutive valid frames to seed the tracker",
    Status.TOO_FEW_TRACKED_FRAMES: "invalid: fewer than 20 frames with both tracked boxes for the DSR-Score",
    Status.UNREADABLE_VIDEO: "failed: the video is unreadable or corrupt",
    Status.WRONG_FRAME_COUNT: "failed: the video has the wrong number of frames",
    Status.MISSING_PROMPT: "failed: no prompt row for this video",
    Status.MODEL_ERROR: "failed: a model raised an error on this sample",
}
_INVALID = frozenset(
    {Status.TOO_MANY_REDUNDANT_FRAMES, Status.TOO_FEW_VALID_FRAMES, Status.NO_VALID_RUN, Status.TOO_FEW_TRACKED_FRAMES}
)
_FAILURE = frozenset({Status.UNREADABLE_VIDEO, Status.WRONG_FRAME_COUNT, Status.MISSING_PROMPT, Status.MODEL_ERROR})


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n): process i of n takes the prompts with ``index % n == i``.

    Sharding is by prompt because each prompt's data lives in its own chunks, so n processes write
    one store at once without locks (the scorer's and the sampler's ``--shard``).
    """
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text!r}: need n >= 1 and 0 <= i < n")
    return i, n


def shard_arg(text: str) -> tuple[int, int]:
    """`parse_shard` as an argparse type: a bad --shard is a usage error with this message."""
    import argparse

    try:
        return parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class StoreError(ValueError):
    """A store that does not exist, has another layout, or is inconsistent with store.json."""


@dataclass(frozen=True)
class Score:
    """One sample's scoring result, as stored."""

    boxes_animal: np.ndarray  # (T, 4) float32, NaN rows = missing
    boxes_object: np.ndarray  # (T, 4) float32
    dsr: float  # NaN unless status is VALID
    status: Status


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    chunk: tuple[int, ...]
    dtype: str
    fill_value: Any
    compress: bool


def array_specs(meta: Mapping[str, Any]) -> dict[str, ArraySpec]:
    """Shape, chunking, dtype and fill of every array: the single definition of the layout."""
    P, S = meta["num_prompts"], meta["samples_per_prompt"]
    L, D, T = meta["max_text_len"], meta["text_dim"], meta["num_frames"]
    C, F, H, W = meta["latent_shape"]
    text = meta["text_dtype"]
    nan = "NaN"
    return {
        # Text rows past text_len are zeros: zstd makes the padding nearly free on disk.
        "text_emb": ArraySpec((P, L, D), (1, L, D), text, 0, True),
        "text_len": ArraySpec((P,), (1,), "int32", 0, False),
        "neg_text_emb": ArraySpec((L, D), (L, D), text, 0, True),
        "neg_text_len": ArraySpec((1,), (1,), "int32", 0, False),
        # Latents are noise-like: compression would cost CPU for almost no space.
        "latents": ArraySpec((P, S, C, F, H, W), (1, 1, C, F, H, W), "float32", 0, False),
        "seed": ArraySpec((P, S), (1, S), "int64", -1, False),
        "boxes_animal": ArraySpec((P, S, T, 4), (1, S, T, 4), "float32", nan, True),
        "boxes_object": ArraySpec((P, S, T, 4), (1, S, T, 4), "float32", nan, True),
        "dsr": ArraySpec((P, S), (1, S), "float32", nan, False),
        "status": ArraySpec((P, S), (1, S), "int8", int(Status.UNSCORED), False),
    }


# What create_store writes before store.json: one of them in a folder without store.json is a stopped create.
CREATED_BEFORE_STORE_JSON = frozenset(array_specs(
    {"num_prompts": 1, "samples_per_prompt": 1, "max_text_len": 1, "text_dim": 1, "num_frames": 1,
     "latent_shape": [1, 1, 1, 1], "text_dtype": "float32"})) | {PROMPTS_JSON, "zarr.json"}


def zarr3_metadata(spec: ArraySpec) -> dict[str, Any]:
    """The zarr v3 array metadata a store's array is created with (its codecs are part of the layout)."""
    codecs: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if spec.compress:
        codecs.append({"name": "zstd", "configuration": {"level": 1}})
    return {
        "shape": list(spec.shape),
        "data_type": spec.dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(spec.chunk)}},
        "fill_value": spec.fill_value,
        "codecs": codecs,
    }
