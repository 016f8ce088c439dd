"""Evaluation metrics and the report: Correctness@tau curve (table, PNG) and the JSON report."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from scoring.dsr import CORRECTNESS_TAUS, HEADLINE_TAU, correctness_curve
from spatialalign_jax.common.atomic import atomic_path, write_text_atomic
from spatialalign_jax.common.dsr_types import DSR_TYPES
from spatialalign_jax.common.store import Status


def status_counts(status: Sequence[int] | np.ndarray) -> dict[str, int]:
    """Number of samples per status name (only statuses that occur)."""
    counts = Counter(int(s) for s in np.asarray(status).ravel())
    return {Status(code).name: n for code, n in sorted(counts.items())}


def correctness_by_type(dsr: Sequence[float] | np.ndarray, types: Sequence[str],
                        tau: float = HEADLINE_TAU) -> dict[str, float]:
    """Correctness@tau per DSR type; ``dsr`` and ``types`` have one entry per sample."""
    dsr = np.asarray(dsr, np.float64).ravel()
    types = np.asarray(types)
    if dsr.shape != types.shape:
        raise ValueError(f"{dsr.size} DSR values but {types.size} types")
    return {name: correctness_curve(dsr[types == name], taus=[tau])[float(tau)]
            for name in DSR_TYPES if (types == name).any()}


def correctness_table(curves: Mapping[str, Mapping[float, float]]) -> str:
    """A plain-text table, one column per curve, one row per tau."""
    names = list(curves)
    width = max([10, *(len(n) + 2 for n in names)])
    lines = ["tau".ljust(6) + "".join(n.rjust(width) for n in names)]
    taus = sorted({t for c in curves.values() for t in c})
    for t in taus:
        cells = "".join(
            (f"{100 * curves[n][t]:.1f}%" if t in curves[n] else "-").rjust(width) for n in names
        )
        lines.append(f"{t:<6.1f}{cells}")
    return "\n".join(lines)


def plot_correctness(curves: Mapping[str, Mapping[float, float]], path: str | os.PathLike,
                     title: str = "Correctness@tau") -> None:
    """Save the Correctness@tau curves as a PNG (like the paper's Figure 7a)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for name, curve in curves.items():
        taus = sorted(curve)
        ax.plot(taus, [100 * curve[t] for t in taus], marker="o", ms=3, label=name)
    ax.axvline(HEADLINE_TAU, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("tau (DSR-Score threshold)")
    ax.set_ylabel("Correctness@tau (%)")
    ax.set_xlim(-0.02, 0.92)
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, Path(path))
    plt.close(fig)


def save_figure_atomic(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _json_safe(x: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so the report is strict JSON."""
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json_safe(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict JSON (NaN -> null), atomically."""
    write_text_atomic(path, json.dumps(_json_safe(obj), indent=1, allow_nan=False))


def dsr_report(dsr: Sequence[float] | np.ndarray, status: Sequence[int] | np.ndarray,
               types: Sequence[str], curve: Mapping[float, float] | None = None) -> dict[str, Any]:
    """The DSR part of the report; one entry per sample in ``dsr``, ``status`` and ``types``.

    ``curve`` is ``correctness_curve(dsr, CORRECTNESS_TAUS)`` when the caller has it already (it
    also tables and plots it). Every sample counts in the denominator, unscored ones too (they are
    reported separately so a half-scored run is never mistaken for a finished one).
    """
    dsr = np.asarray(dsr, np.float64).ravel()
    status = np.asarray(status).ravel()
    if curve is None:
        curve = correctness_curve(dsr, CORRECTNESS_TAUS)
    return {
        "num_samples": int(dsr.size),
        "num_unscored": int(np.count_nonzero(status == Status.UNSCORED)),
        "status_counts": status_counts(status),
        f"correctness@{HEADLINE_TAU}": curve[HEADLINE_TAU],
        "correctness_curve": {f"{t:.1f}": v for t, v in curve.items()},
        f"correctness@{HEADLINE_TAU}_by_type": correctness_by_type(dsr, types),
        "mean_dsr_of_valid": float(np.nanmean(dsr)) if np.isfinite(dsr).any() else float("nan"),
        "status_descriptions": {s.name: s.description for s in Status},
    }
