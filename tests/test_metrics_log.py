"""Metrics logging: JSONL records, resume truncation, TensorBoard event files, the progress bar."""

import io
import json
import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from spatialalign_jax.train.metrics_log import (METRICS_FILE, TENSORBOARD_SUBDIR, MetricsLogger, ProgressBar,
                                          format_postfix, read_metrics)


def _events(run_dir):
    """All events of the run's TensorBoard files (TFRecord framing: length, crc, payload, crc)."""
    out = []
    for path in sorted((run_dir / TENSORBOARD_SUBDIR).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            out.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
            pos += 12 + length + 4
    return out


def _scalars(run_dir):
    return [(e.step, v.tag, v.simple_value) for e in _events(run_dir) for v in e.summary.value]


def test_jsonl_records_and_event_file(tmp_path):
    with MetricsLogger(tmp_path) as log:
        record = log.log(1, {"loss": jnp.float32(0.5), "margin": np.float64(-0.25), "reward_accuracy": 1.0,
                             "count": np.int32(3), "per_layer": jnp.arange(3.0), "note": "warm-up"})
        assert record["loss"] == 0.5 and isinstance(record["loss"], float) and record["count"] == 3
        # Each line reaches the file at once (a crash right after keeps it).
        assert json.loads((tmp_path / METRICS_FILE).read_text())["step"] == 1
        log.log(2, {"loss": float("nan"), "lr": 1e-4})
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["per_layer"] == [0.0, 1.0, 2.0] and records[0]["note"] == "warm-up"
    assert math.isnan(records[1]["loss"]) and records[1]["lr"] == 1e-4 and records[1]["time"] >= records[0]["time"]
    scalars = _scalars(tmp_path)
    assert (1, "loss", 0.5) in scalars and (1, "margin", -0.25) in scalars and (2, "lr", pytest.approx(1e-4)) in scalars
    assert not [s for s in scalars if s[1] in ("note", "per_layer")]  # only scalars go to TensorBoard


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    with MetricsLogger(tmp_path) as log:
        for step in range(1, 8):
            log.log(step, {"loss": float(step)})
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 8, "lo')  # a line a kill cut short
    with MetricsLogger(tmp_path, resume_step=5) as log:
        assert log.dropped == 3
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
        log.log(6, {"loss": 60.0})
    records = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 60.0)]
    # TensorBoard is told to purge the old events from step 6 on.
    starts = [e.step for e in _events(tmp_path) if e.session_log.status == event_pb2.SessionLog.START]
    assert 6 in starts
    with MetricsLogger(tmp_path, resume_step=0, tensorboard=False) as log:  # a fresh start clears the file
        assert log.dropped == 6
    assert read_metrics(tmp_path) == []


def test_disabled_logger_writes_nothing(tmp_path):
    with MetricsLogger(tmp_path / "run", enabled=False) as log:
        assert log.log(1, {"loss": 1.0})["loss"] == 1.0
    assert not (tmp_path / "run").exists()


def test_bad_metrics(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        with pytest.raises(ValueError, match="reserved"):
            log.log(1, {"step": 3})
        with pytest.raises(TypeError, match="metric 'obj'"):
            log.log(1, {"obj": object()})


def test_progress_bar_postfix():
    metrics = {"loss": jnp.float32(0.693147), "margin": 0.0123, "reward_accuracy": 0.75, "lr": 1e-4,
               "step_time": 1.234, "e_w": 3.0}
    assert format_postfix(metrics) == "loss=0.6931 margin=+0.012 acc=0.75 lr=1.00e-04 s/step=1.23"
    assert format_postfix({"loss": float("nan")}) == "loss=nan"
    out = io.StringIO()
    with ProgressBar(total=10, initial=4, file=out) as bar:
        bar.update(5, metrics)
        bar.update(7, {"loss": 0.5})
        assert bar.n == 7
        bar.write("checkpoint saved")
    text = out.getvalue()
    assert "7/10" in text and "loss=0.5000" in text and "checkpoint saved" in text
    quiet = io.StringIO()
    with ProgressBar(total=10, enabled=False, file=quiet) as bar:
        bar.update(3, metrics)
        bar.write("hidden")
    assert quiet.getvalue() == ""
