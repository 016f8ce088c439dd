"""The validity rules of SPEC section 4, and per-video boxes: detect, check, seed, track.

Per frame, with the detections of Grounding DINO:

- *valid*: exactly two detections, labelled the animal and the object (one each);
- *redundant*: more than two detections, or any detection whose label is neither the animal nor
  the object, or the same entity twice (two animals, two objects): the prompt asks for one of each;
- otherwise (no detection, or only one correctly labelled box) the frame is *missing*.

A video is invalid when more than 16 frames are redundant, fewer than 20 are valid, or no run of 4
consecutive valid frames exists (checked in that order; the first failing rule names the status).
A valid video's tracker is seeded with the animal's and the object's boxes on the first frame of
its first run of >= 4 consecutive valid frames.
"""

from __future__ import annotations

import enum
from typing import Sequence

import numpy as np

from scoring.detect import Detection, Detector, check_frames, normalize_label
from scoring.track import Tracker
from spatialalign_jax.common.store import Status

MAX_REDUNDANT_FRAMES = 16
MIN_VALID_FRAMES = 20
MIN_VALID_RUN = 4


class FrameKind(enum.Enum):
    VALID = "valid"
    REDUNDANT = "redundant"
    MISSING = "missing"


def classify_frame(detections: Sequence[Detection], animal: str, obj: str) -> FrameKind:
    """Whether one frame's detections are valid, redundant or missing (see the module docstring)."""
    labels = sorted(normalize_label(d.label) for d in detections)
    expected = sorted([normalize_label(animal), normalize_label(obj)])
    if len(labels) > 2 or any(label not in expected for label in labels):
        return FrameKind.REDUNDANT
    if labels == expected:
        return FrameKind.VALID
    if len(labels) == 2:  # the same entity twice
        return FrameKind.REDUNDANT
    return FrameKind.MISSING


def first_valid_run(kinds: Sequence[FrameKind], length: int = MIN_VALID_RUN) -> int | None:
    """The first frame of the first run of >= ``length`` consecutive valid frames, or None."""
    run = 0
    for i, kind in enumerate(kinds):
        run = run + 1 if kind is FrameKind.VALID else 0
        if run == length:
            return i - length + 1
    return None


def video_status(kinds: Sequence[FrameKind]) -> tuple[Status, int | None]:
    """The video's status under the SPEC section 4 rules, and the seed frame when it is valid."""
    redundant = sum(kind is FrameKind.REDUNDANT for kind in kinds)
    valid = sum(kind is FrameKind.VALID for kind in kinds)
    if redundant > MAX_REDUNDANT_FRAMES:
        return Status.TOO_MANY_REDUNDANT_FRAMES, None
    if valid < MIN_VALID_FRAMES:
        return Status.TOO_FEW_VALID_FRAMES, None
    seed = first_valid_run(kinds)
    if seed is None:
        return Status.NO_VALID_RUN, None
    return Status.VALID, seed


def _seed_boxes(detections: Sequence[Detection], animal: str, obj: str) -> dict[str, np.ndarray]:
    """The animal's and the object's boxes on a valid frame (an animal named like its object
    takes the first of the two boxes)."""
    remaining = list(detections)
    seeds = {}
    for key, name in (("animal", animal), ("object", obj)):
        i = next(i for i, d in enumerate(remaining) if normalize_label(d.label) == normalize_label(name))
        seeds[key] = np.asarray(remaining.pop(i).box, dtype=np.float32)
    return seeds


def boxes_for_video(
    frames: np.ndarray, animal: str, obj: str, detector: Detector, tracker: Tracker
) -> tuple[np.ndarray, np.ndarray, Status]:
    """Per-frame boxes of the animal and the object, and the video's status.

    ``frames`` is (T, H, W, 3) uint8. Returns ``(animal_boxes, object_boxes, status)``, boxes
    (T, 4) float32 ``(x0, y0, x1, y1)`` pixels with NaN rows where a box is missing. When the
    detections break a validity rule, the boxes are all NaN and ``status`` names the rule; otherwise
    ``status`` is ``Status.VALID`` and the boxes are the tracker's. ``Status.VALID`` here says the
    detection rules passed; whether enough frames have both boxes for a DSR-Score (SPEC section 3)
    is the DSR's own check (``scoring.dsr``).
    """
    frames = check_frames(frames)
    detections = detector.detect(frames, animal, obj)
    if len(detections) != len(frames):
        raise RuntimeError(f"the detector returned {len(detections)} frames of detections for {len(frames)} frames")
    kinds = [classify_frame(frame_dets, animal, obj) for frame_dets in detections]
    status, seed = video_status(kinds)
    if seed is None:
        missing = np.full((len(frames), 4), np.nan, dtype=np.float32)
        return missing, missing.copy(), status
    tracked = tracker.track(frames, seed, _seed_boxes(detections[seed], animal, obj))
    return tracked["animal"].astype(np.float32), tracked["object"].astype(np.float32), status
