"""The interfaces between videos and boxes: what a detector and a tracker give the validity rules.

Grounding DINO and SAM 2 (``scoring.detect``, ``scoring.track``) implement them for real videos, the
synthetic world's colour segmentation (``spatialalign_jax.world.detector``) for its own; the
validity rules and the DSR-Score (``scoring.validity``, ``scoring.dsr``) see only these.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Protocol

import numpy as np

# SPEC section 4: Grounding DINO keeps boxes scoring at least this; every detector applies it to its scores.
BOX_THRESHOLD = 0.4


class Detection(NamedTuple):
    """One detected box: its label, ``(x0, y0, x1, y1)`` in pixels of the input frame, its score."""

    label: str
    box: np.ndarray  # (4,) float32
    score: float


class Detector(Protocol):
    def detect(self, frames: np.ndarray, animal: str, obj: str) -> list[list[Detection]]:
        """Detections per frame of ``frames`` (T, H, W, 3) uint8, labelled ``animal``/``obj`` on a match."""
        ...


class Tracker(Protocol):
    def track(
        self, frames: np.ndarray, start_frame: int, boxes: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Boxes per frame, ``{name: (T, 4) float32}``, NaN rows where the object is lost.

        ``frames`` is (T, H, W, 3) uint8; ``boxes`` maps each object's name to its
        ``(x0, y0, x1, y1)`` pixel box on ``start_frame``.
        """
        ...


def check_frames(frames: np.ndarray) -> np.ndarray:
    """``frames`` as a (T, H, W, 3) uint8 array, or a clear error."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise ValueError(
            f"frames must be a (T, H, W, 3) uint8 array of T >= 1 RGB frames, got shape {frames.shape} "
            f"dtype {frames.dtype}"
        )
    return frames
