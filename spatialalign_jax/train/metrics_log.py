"""Training metrics: one JSON line per logged step, TensorBoard event files, and a progress bar.

Files under the run folder:

- ``metrics.jsonl``: ``{"step": int, "time": unix seconds, <metric>: float, ...}`` per logged step,
  flushed line by line. Non-finite values are written as JSON's ``NaN``/``Infinity`` extensions
  (Python's and pandas' readers accept them).
- ``tb/``: TensorBoard event files (tensorboardX), one scalar per metric with the step as x.

A resumed run continues from its checkpoint's step, so what was logged after that step is about to
be logged again: ``MetricsLogger(run_dir, resume_step=s)`` drops the JSON lines with ``step > s``
(and a line a crash cut short) and tells TensorBoard to purge its events from step ``s + 1`` on.
``resume_step=0`` (a fresh start) therefore clears what an earlier attempt in the same folder logged.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, TextIO

import numpy as np
from tqdm.auto import tqdm

from spatialalign_jax.common.atomic import write_text_atomic

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_SUBDIR = "tb"

# (metric key, progress-bar label, format) shown in the bar's postfix, in this order.
POSTFIX = (
    ("loss", "loss", "{:.4f}"),
    ("margin", "margin", "{:+.3f}"),
    ("reward_accuracy", "acc", "{:.2f}"),
    ("lr", "lr", "{:.2e}"),
    ("step_time", "s/step", "{:.2f}"),
)


def _to_json_value(key: str, value: Any) -> Any:
    """Scalars (Python, numpy or jax) become floats/ints; arrays become lists; strings stay."""
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, int):
        return value
    try:
        array = np.asarray(value)
    except Exception as e:  # noqa: BLE001 - report which metric could not be read
        raise TypeError(f"metric {key!r}: cannot convert {type(value).__name__} to a number ({e})") from None
    if array.dtype.kind not in "biuf":
        raise TypeError(f"metric {key!r}: expected a number or numeric array, got dtype {array.dtype}")
    if array.ndim == 0:
        return int(array) if array.dtype.kind in "biu" else float(array)
    return array.tolist()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/metrics.jsonl`` (a last line cut short by a crash is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _truncate(path: Path, resume_step: int) -> int:
    """Rewrites ``path`` without lines past ``resume_step`` (atomically); returns how many were dropped."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # cut short by a crash
            continue
        if not line.endswith("\n"):
            line += "\n"
        if int(record.get("step", 0)) <= resume_step:
            kept.append(line)
    if len(kept) == len(lines) and all(a == b for a, b in zip(kept, lines)):
        return 0
    write_text_atomic(path, "".join(kept))
    return len(lines) - len(kept)


class MetricsLogger:
    """Appends metrics of a run to ``metrics.jsonl`` and TensorBoard.

    ``resume_step``: the step the run continues from (its checkpoint's step; 0 for a fresh start);
    records after it are dropped. ``enabled=False`` (e.g. on hosts other than process 0) makes every
    method a no-op.
    """

    def __init__(self, run_dir: str | os.PathLike, *, resume_step: int = 0, tensorboard: bool = True,
                 enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.enabled = enabled
        self.dropped = 0
        self._file: TextIO | None = None
        self._writer = None
        if not enabled:
            return
        if resume_step < 0:
            raise ValueError(f"resume_step must be >= 0, got {resume_step}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.dropped = _truncate(self.path, resume_step)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: each record reaches the file whole
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / TENSORBOARD_SUBDIR), purge_step=resume_step + 1,
                                         flush_secs=10)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Records ``metrics`` of ``step``; returns the record as written (host numbers)."""
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        for key, value in metrics.items():
            if key in ("step", "time"):
                raise ValueError(f"metric name {key!r} is reserved for the record's own field")
            record[key] = _to_json_value(key, value)
        if not self.enabled:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, global_step=record["step"], walltime=record["time"])
        return record

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def format_postfix(metrics: Mapping[str, Any]) -> str:
    """``loss=0.6931 margin=+0.000 acc=0.50 lr=1.00e-04 s/step=1.23`` from the metrics present."""
    parts = []
    for key, label, fmt in POSTFIX:
        if key in metrics and metrics[key] is not None:
            value = float(np.asarray(metrics[key]))
            parts.append(f"{label}={fmt.format(value) if math.isfinite(value) else value}")
    return " ".join(parts)


class ProgressBar:
    """A tqdm bar over optimiser steps showing loss, margin, reward accuracy, lr and step time.

    ``initial``: the step a resumed run starts from. ``enabled=False`` hides it (other hosts, tests).
    """

    def __init__(self, total: int, initial: int = 0, *, desc: str = "train", enabled: bool = True,
                 file: TextIO | None = None) -> None:
        self.enabled = enabled
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled,
                         dynamic_ncols=True, file=file)

    @property
    def n(self) -> int:
        return self._bar.n

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Moves the bar to ``step`` (steps done) and shows the metrics."""
        if metrics:
            self._bar.set_postfix_str(format_postfix(metrics), refresh=False)
        self._bar.update(int(step) - self._bar.n)

    def write(self, message: str) -> None:
        """Prints a line without breaking the bar (nothing when the bar is disabled)."""
        if self.enabled:
            self._bar.write(message, file=self._bar.fp)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
