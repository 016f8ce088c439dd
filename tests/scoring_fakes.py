"""Deterministic stand-ins for the scoring models, and synthetic DSR videos with known boxes.

A video is a green field with the animal as a red rectangle and the object as a blue one (an
optional yellow "person" makes frames redundant). The fake detector finds rectangles by colour, the
fake tracker follows the colour found under its seed box, and the fake decoder renders frames from
"latents" that carry the boxes, so every stage of the real pipeline runs except the networks.

Boxes are inclusive pixel boxes ``(x0, y0, x1, y1)``, as the SAM 2 trackers report a mask's extent.
"""

from __future__ import annotations

import numpy as np

from scoring.detect import Detection

H, W = 96, 128
BG = (60, 140, 60)
RED, BLUE, YELLOW = (220, 30, 30), (30, 30, 220), (230, 220, 40)
# Positions relative to the object: each 16 x 16 and far enough apart that distances clip at 1.
# Even starts and sizes keep the rectangles exact through yuv420p mp4 encoding.
OBJECT = (56, 56, 71, 71)
LEFT, RIGHT, TOP = (20, 56, 35, 71), (92, 56, 107, 71), (56, 20, 71, 35)
TOP_LEFT, TOP_RIGHT = (20, 20, 35, 35), (92, 20, 107, 35)
POSITION = {"L": LEFT, "R": RIGHT, "T": TOP}


def trajectory(dsr_type: str, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Ideal boxes of a DSR type: 3+ frames at the initial position, the end at the final one,
    passing over the object in between (never overlapping it)."""
    start, end = POSITION[dsr_type[0]], POSITION[dsr_type[1]]
    third = num_frames // 3
    mid_a = TOP_LEFT if start == LEFT else TOP_RIGHT if start == RIGHT else TOP
    mid_b = TOP_LEFT if end == LEFT else TOP_RIGHT if end == RIGHT else TOP
    a = [start] * third + [mid_a] * (num_frames // 2 - third) + [mid_b] * (num_frames - num_frames // 2 - third) + [end] * third
    a = a[:num_frames]
    return np.array(a, np.float32), np.array([OBJECT] * num_frames, np.float32)


def _fill(frame: np.ndarray, box: np.ndarray, color: tuple[int, int, int]) -> None:
    if np.isfinite(box).all():
        x0, y0, x1, y1 = (int(v) for v in box)
        frame[y0 : y1 + 1, x0 : x1 + 1] = color


def render(animal: np.ndarray, obj: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
    """(T, H, W, 3) uint8 frames; NaN rows are not drawn."""
    frames = np.empty((len(animal), H, W, 3), np.uint8)
    frames[:] = BG
    for t in range(len(animal)):
        _fill(frames[t], obj[t], BLUE)
        _fill(frames[t], animal[t], RED)
        if extra is not None:
            _fill(frames[t], extra[t], YELLOW)
    return frames


def _color_box(frame: np.ndarray, color) -> np.ndarray | None:
    diff = np.abs(frame.astype(np.int16) - np.array(color, np.int16)).max(axis=-1)
    ys, xs = np.nonzero(diff < 60)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)


class ColorDetector:
    """Detections by colour: red -> the animal, blue -> the object, yellow -> "person"."""

    def __init__(self):
        self.calls = 0

    def detect(self, frames, animal, obj):
        self.calls += 1
        out = []
        for f in frames:
            dets = []
            for color, label in ((RED, animal), (BLUE, obj), (YELLOW, "person")):
                box = _color_box(f, color)
                if box is not None:
                    dets.append(Detection(label, box, 0.9))
            out.append(dets)
        return out


class ColorTracker:
    """Follows, in every frame, the colour under the centre of each seed box."""

    def __init__(self, fail_on: str | None = None):
        self.fail_on = fail_on

    def track(self, frames, start_frame, boxes):
        out = {}
        for name, box in boxes.items():
            x = int(round((box[0] + box[2]) / 2))
            y = int(round((box[1] + box[3]) / 2))
            color = frames[start_frame, y, x]
            rows = [_color_box(f, color) for f in frames]
            out[name] = np.array([r if r is not None else [np.nan] * 4 for r in rows], np.float32)
        return out


# Fake latents (1, T, 3, 4): channel 0 the animal's boxes, 1 the object's, 2 a mode flag.
MODE_OK, MODE_RAISE, MODE_DROP_FRAME = 0, 1, 2


def fake_latents(animal: np.ndarray, obj: np.ndarray, mode: int = MODE_OK) -> np.ndarray:
    lat = np.zeros((1, len(animal), 3, 4), np.float32)
    lat[0, :, 0], lat[0, :, 1], lat[0, :, 2] = animal, obj, mode
    return lat


class FakeDecoder:
    """'Decodes' fake latents by rendering their boxes; the mode flag makes it fail on purpose."""

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        mode = int(latents[0, 0, 2, 0])
        if mode == MODE_RAISE:
            raise RuntimeError("fake VAE failure")
        frames = render(latents[0, :, 0], latents[0, :, 1])
        return frames[:-1] if mode == MODE_DROP_FRAME else frames
