"""Inspection plot of one video: its initial and final SSR curves (like the paper's Figure 2b)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from scoring.dsr import dsr_from_ssr, ssr_scores
from scoring.metrics import save_figure_atomic
from spatialalign_jax.common.dsr_types import get_dsr_type


def plot_ssr_curves(animal_boxes: np.ndarray, object_boxes: np.ndarray, dsr_type: str,
                    path: str | os.PathLike, title: str = "") -> None:
    """PNG of the SSR-Score of the initial and the final relation over the kept frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = get_dsr_type(dsr_type)
    s = ssr_scores(animal_boxes, object_boxes, dsr_type)
    dsr = dsr_from_ssr(s.initial, s.final)
    fig, ax = plt.subplots(figsize=(5, 3), dpi=120)
    ax.plot(s.frames, s.initial, marker=".", label=f"initial: {t.initial_phrase}")
    ax.plot(s.frames, s.final, marker=".", label=f"final: {t.final_phrase}")
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlim(0, max(len(np.asarray(animal_boxes)) - 1, 1))
    ax.set_xlabel("frame")
    ax.set_ylabel("SSR-Score")
    score = "invalid (fewer than 20 frames)" if np.isnan(dsr) else f"{dsr:.3f}"
    ax.set_title(f"{title}  {dsr_type}  DSR-Score {score}".strip(), fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, Path(path))
    plt.close(fig)
