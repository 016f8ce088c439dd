"""A colour-segmentation detector and tracker for world videos, behind the scorer's interfaces.

``ColourDetector`` implements the ``Detector`` interface that Grounding DINO implements and
``ColourTracker`` the ``Tracker`` interface of SAM 2, so world videos go through the same validity
rules and DSR-Score as real ones (``scoring.validity.boxes_for_video``, ``scoring.dsr.dsr_score``).

Each pixel takes the label of the nearest colour of the world's palette (every sprite and every
background) when it lies within ``MAX_COLOUR_DISTANCE``; a detection is a group of one sprite's
pixels that lie within ``GAP`` pixels of each other (a sprite drawn with holes is still one
object), boxed tightly around those pixels. Its score is the share of its sprite's pixels it holds
(at most 1), and, as Grounding DINO's boxes, it is kept when the score reaches SPEC's box threshold
(0.4): a stray speck of a sprite's colour is no detection, a sprite drawn in part is. Like Grounding DINO, the detector reports
what it sees under the entity's own name: a frog in a video prompted with a fox is a detection
labelled "frog", which the validity rules count as a wrong label (a redundant frame). Boxes are
``(x0, y0, x1, y1)`` with inclusive ends, as the SAM 2 tracker's mask boxes.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from spatialalign_jax.common.detection import BOX_THRESHOLD, Detection, check_frames
from spatialalign_jax.world.render import SPATIAL_SCALE
from spatialalign_jax.world.vocab import ENTITIES, SCENES

MAX_COLOUR_DISTANCE = 70.0
GAP = 2  # one latent pixel: pixels of one colour this close belong to one object

_NAMES = list(ENTITIES) + [None] * len(SCENES)  # None: background
_SPRITE_PIXELS = [int(sprite.mask.sum()) * SPATIAL_SCALE ** 2 for sprite in ENTITIES.values()]
_PALETTE = np.array([s.colour for s in ENTITIES.values()] + list(SCENES.values()), np.float32)


def label_map(frame: np.ndarray) -> np.ndarray:
    """(H, W) int index into the world's entities per pixel; -1 for background or unknown colour."""
    dist = np.linalg.norm(frame[:, :, None, :].astype(np.float32) - _PALETTE, axis=-1)
    nearest = dist.argmin(-1)
    labels = np.where(nearest < len(ENTITIES), nearest, -1)
    return np.where(dist.min(-1) <= MAX_COLOUR_DISTANCE, labels, -1)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    padded = np.pad(mask, r)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def groups(mask: np.ndarray, gap: int = GAP) -> list[np.ndarray]:
    """``mask``'s pixels grouped by ``components`` of the mask dilated by ``gap``, each group as an
    (N, 2) array of the mask's own (y, x) pixels."""
    out = []
    for comp in components(_dilate(mask, gap)):
        inside = comp[mask[comp[:, 0], comp[:, 1]]]
        if len(inside):
            out.append(inside)
    return out


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected components of a boolean (H, W) mask, each as an (N, 2) array of (y, x)."""
    seen = np.zeros_like(mask)
    out = []
    h, w = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        stack, pixels = [(y, x)], []
        while stack:
            cy, cx = stack.pop()
            pixels.append((cy, cx))
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(np.array(pixels))
    return out


def _box(pixels: np.ndarray) -> np.ndarray:
    (y0, x0), (y1, x1) = pixels.min(0), pixels.max(0)
    return np.array([x0, y0, x1, y1], np.float32)


def _kept(index: int, pixels: np.ndarray) -> float | None:
    """The detection score of a group of entity ``index``'s pixels, or None below the box threshold."""
    score = min(1.0, len(pixels) / _SPRITE_PIXELS[index])
    return score if score >= BOX_THRESHOLD else None


def frame_detections(frame: np.ndarray) -> list[Detection]:
    """Every group of one sprite's colour in an (H, W, 3) frame that scores at least the box threshold."""
    labels = label_map(frame)
    out = []
    for index in np.unique(labels[labels >= 0]):
        for pixels in groups(labels == index):
            score = _kept(index, pixels)
            if score is not None:
                out.append(Detection(_NAMES[index], _box(pixels), score))
    return out


class ColourDetector:
    """The world's detector: ``detect(frames, animal, obj)`` as Grounding DINO's."""

    def detect(self, frames: np.ndarray, animal: str, obj: str) -> list[list[Detection]]:
        for name in (animal, obj):
            if name.strip().lower() not in ENTITIES:
                raise ValueError(f"{name!r} is not in the synthetic world (it knows {', '.join(ENTITIES)})")
        return [frame_detections(frame) for frame in check_frames(frames)]


class ColourTracker:
    """The world's tracker: follows each seed box's colour from ``start_frame`` forward, then backward.

    An object's label is the entity colour most of its seed box's pixels carry; on every frame its box
    is that of the label's component nearest the box of the frame before (in propagation order), so a
    second sprite of the same colour elsewhere does not capture it. No component: a NaN row, and the
    search goes on from the last box found.
    """

    def track(self, frames: np.ndarray, start_frame: int,
              boxes: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        frames = check_frames(frames)
        if not 0 <= start_frame < len(frames):
            raise ValueError(f"start_frame {start_frame} is outside the video's {len(frames)} frames")
        labels = [label_map(f) for f in frames]
        out = {}
        for name, seed in boxes.items():
            x0, y0, x1, y1 = np.asarray(seed, np.float32).round().astype(int)
            inside = labels[start_frame][max(y0, 0):y1 + 1, max(x0, 0):x1 + 1]
            inside = inside[inside >= 0]
            track = np.full((len(frames), 4), np.nan, np.float32)
            if inside.size:
                label = np.bincount(inside).argmax()
                order = [range(start_frame, len(frames)), range(start_frame - 1, -1, -1)]
                for frame_order in order:
                    centre = (np.asarray(seed[:2]) + np.asarray(seed[2:])) / 2
                    for t in frame_order:
                        comps = [c for c in groups(labels[t] == label) if _kept(label, c) is not None]
                        if not comps:
                            continue
                        best = min(comps, key=lambda c: np.sum((c.mean(0)[::-1] - centre) ** 2))
                        track[t] = _box(best)
                        centre = (track[t, :2] + track[t, 2:]) / 2
            out[name] = track
        return out
