"""DSR-Score (SPEC section 3): per-frame static-spatial-relation scores and their combination.

Boxes are ``(x0, y0, x1, y1)`` in pixels with image y pointing down; a row of NaNs is a frame
without a box. Everything is computed in float64 so that scores match the reference to 1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from spatialalign_jax.common.dsr_types import DSR_TYPES, RELATIONS, DsrType, get_dsr_type  # noqa: F401  (re-exported)

# Fewer kept frames than this make a video invalid for the DSR-Score.
MIN_KEPT_FRAMES = 20
# r_init / r_f average this many frames at each end of the kept sequence.
ENDPOINT_FRAMES = 3
# Correctness@tau is reported on this grid; tau = 0.7 is the headline number.
CORRECTNESS_TAUS = tuple(i / 10 for i in range(10))
HEADLINE_TAU = 0.7


@dataclass(frozen=True)
class SsrScores:
    """The SSR sequences of one video over its kept frames, in time order."""

    frames: np.ndarray  # (K,) int indices of the kept frames in the video
    initial: np.ndarray  # (K,) float64 SSR of the initial relation
    final: np.ndarray  # (K,) float64 SSR of the final relation


def _as_boxes(boxes: np.ndarray, what: str) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{what} must have shape (T, 4) as (x0, y0, x1, y1) rows, got {boxes.shape}")
    return boxes


def kept_frames(animal_boxes: np.ndarray, object_boxes: np.ndarray) -> np.ndarray:
    """Indices of the frames the DSR-Score uses: both boxes present, positive widths, positive mean height."""
    a = _as_boxes(animal_boxes, "animal_boxes")
    o = _as_boxes(object_boxes, "object_boxes")
    if a.shape != o.shape:
        raise ValueError(f"animal_boxes {a.shape} and object_boxes {o.shape} must have the same number of frames")
    present = np.isfinite(a).all(axis=1) & np.isfinite(o).all(axis=1)
    with np.errstate(invalid="ignore"):
        w_a, w_o = a[:, 2] - a[:, 0], o[:, 2] - o[:, 0]
        h_a, h_o = a[:, 3] - a[:, 1], o[:, 3] - o[:, 1]
        keep = present & (w_a > 0) & (w_o > 0) & (0.5 * (w_a + w_o) > 0) & (0.5 * (h_a + h_o) > 0)
    return np.flatnonzero(keep)


def ssr(animal_boxes: np.ndarray, object_boxes: np.ndarray, relation: str) -> np.ndarray:
    """Per-frame SSR score in [-1, 1] of ``relation`` ("L", "R", "T") for (K, 4) box rows that are all kept."""
    a = _as_boxes(animal_boxes, "animal_boxes")
    o = _as_boxes(object_boxes, "object_boxes")
    # v points from the object's centre to the animal's centre.
    vx = 0.5 * (a[:, 0] + a[:, 2]) - 0.5 * (o[:, 0] + o[:, 2])
    vy = 0.5 * (a[:, 1] + a[:, 3]) - 0.5 * (o[:, 1] + o[:, 3])
    norm = np.hypot(vx, vy)
    safe = np.where(norm > 0, norm, 1.0)
    if relation in ("L", "R"):
        d = np.clip(np.abs(vx) / (0.5 * ((a[:, 2] - a[:, 0]) + (o[:, 2] - o[:, 0]))), 0.0, 1.0)
        cos = np.where(norm > 0, vx / safe, 0.0)
        return cos * d if relation == "R" else -cos * d
    if relation == "T":
        d = np.clip(np.abs(vy) / (0.5 * ((a[:, 3] - a[:, 1]) + (o[:, 3] - o[:, 1]))), 0.0, 1.0)
        cos = np.where(norm > 0, vy / safe, 0.0)
        # y points down: the animal is on top when v_y < 0.
        return -cos * d
    raise ValueError(f"unknown relation {relation!r}; relations are {RELATIONS}")


def ssr_scores(animal_boxes: np.ndarray, object_boxes: np.ndarray, dsr_type: str) -> SsrScores:
    """The initial and final SSR sequences over the kept frames of a video."""
    t = get_dsr_type(dsr_type)
    keep = kept_frames(animal_boxes, object_boxes)
    a = _as_boxes(animal_boxes, "animal_boxes")[keep]
    o = _as_boxes(object_boxes, "object_boxes")[keep]
    return SsrScores(frames=keep, initial=ssr(a, o, t.initial), final=ssr(a, o, t.final))


def dsr_from_ssr(s_i: np.ndarray, s_f: np.ndarray) -> float:
    """DSR-Score in [0, 1] from the initial/final SSR sequences; NaN when fewer than 20 frames."""
    s_i, s_f = np.asarray(s_i, np.float64), np.asarray(s_f, np.float64)
    K = len(s_i)
    if K != len(s_f):
        raise ValueError(f"SSR sequences differ in length: {K} vs {len(s_f)}")
    if K < MIN_KEPT_FRAMES:
        return float("nan")
    n = ENDPOINT_FRAMES
    r_init = s_i[:n].mean()
    r_f = s_f[K - n:].mean()
    # Signed gaps, as in the released reference code (the paper's text says "absolute").
    g_init = 0.5 * (s_i[0] - s_i[K - 1])
    g_f = 0.5 * (s_f[K - 1] - s_f[0])
    return float((r_init + g_init + r_f + g_f) / 8.0 + 0.5)


def dsr_score(animal_boxes: np.ndarray, object_boxes: np.ndarray, dsr_type: str) -> float:
    """DSR-Score of one video (SPEC section 3); NaN when fewer than 20 frames have both boxes."""
    s = ssr_scores(animal_boxes, object_boxes, dsr_type)
    return dsr_from_ssr(s.initial, s.final)


def correctness_at(dsr_values: Sequence[float] | np.ndarray, tau: float) -> float:
    """Share of all samples with a DSR-Score >= tau; NaN (invalid or failed) samples count as incorrect."""
    v = np.asarray(dsr_values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("correctness_at needs at least one sample")
    with np.errstate(invalid="ignore"):
        return float(np.count_nonzero(np.isfinite(v) & (v >= tau)) / v.size)


def correctness_curve(dsr_values: Sequence[float] | np.ndarray,
                      taus: Sequence[float] = CORRECTNESS_TAUS) -> dict[float, float]:
    """Correctness@tau for each tau (default 0, 0.1, ..., 0.9)."""
    return {float(t): correctness_at(dsr_values, t) for t in taus}
