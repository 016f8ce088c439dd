"""The stage runner: a loop of named stages, each resumable, recorded in the run folder when done.

A stage is a function of the run's context that does its work idempotently: it skips what its
outputs already hold (a store's sampled slots, scored samples, the trainer's checkpoints), so a
stage killed halfway picks up where it stopped. When it returns, its record (seconds, counts) is
written to ``stages.json`` atomically; a rerun skips recorded stages. So a kill at any point loses
at most the work in flight, and ``--from``/``--until`` pick a slice of the loop:

- ``until=S`` stops after stage S;
- ``start=S`` reruns S and everything after it, even if recorded (their own resumability still
  skips finished work inside them, so this redoes only what their outputs lack);
- ``status()`` lists each stage as done (with its time) or to do.

Both the synthetic-world cycle of ``python run_train.py`` and the real-scale loop are lists of these
stages (``spatialalign_jax.loop.cycle``), so the two cannot drift apart.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from spatialalign_jax.common.atomic import write_text_atomic

STATE_FILE = "stages.json"


class StageError(RuntimeError):
    """A stage that cannot run as asked (an unknown stage name, a failed subprocess), said plainly."""


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[], Mapping[str, Any] | None]  # does the work; returns a small JSON-able record
    about: str  # one line for the status view


class StageRunner:
    """Runs ``stages`` in order in ``run_dir``, skipping those ``stages.json`` records as done."""

    def __init__(self, run_dir: str | os.PathLike, stages: Sequence[Stage], *, log: Callable[[str], None] = print):
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        self.run_dir = Path(run_dir)
        self.stages = list(stages)
        self.log = log

    @property
    def state_path(self) -> Path:
        return self.run_dir / STATE_FILE

    def done(self) -> dict[str, dict[str, Any]]:
        """{stage name: its record} of the stages finished so far."""
        if not self.state_path.is_file():
            return {}
        try:
            return json.loads(self.state_path.read_text())["done"]
        except (ValueError, KeyError) as e:
            raise StageError(f"{self.state_path} is not a stage record ({e}); delete it to rerun every stage "
                             "(finished work inside the stages is kept and skipped)") from None

    def _index(self, name: str | None, flag: str, default: int) -> int:
        if name is None:
            return default
        names = [s.name for s in self.stages]
        if name not in names:
            raise StageError(f"{flag} {name!r} is not a stage of this loop; its stages are: {', '.join(names)}")
        return names.index(name)

    def run(self, *, start: str | None = None, until: str | None = None) -> dict[str, dict[str, Any]]:
        first = self._index(start, "--from", 0)
        last = self._index(until, "--until", len(self.stages) - 1)
        if first > last:
            raise StageError(f"--from {start} comes after --until {until}")
        done = self.done()
        for i, stage in enumerate(self.stages[first:last + 1], start=first + 1):
            head = f"[{i}/{len(self.stages)}] {stage.name}"
            if stage.name in done and start is None:
                self.log(f"{head}: done ({done[stage.name]['seconds']:.1f} s), skipped")
                continue
            self.log(f"{head}: {stage.about}")
            t0 = time.perf_counter()
            record = dict(stage.run() or {})
            record["seconds"] = round(time.perf_counter() - t0, 2)
            done[stage.name] = record
            self._save(done)
            self.log(f"{head}: finished in {record['seconds']:.1f} s")
        return done

    def _save(self, done: Mapping[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        order = [s.name for s in self.stages]
        done = {k: done[k] for k in sorted(done, key=lambda k: order.index(k) if k in order else len(order))}
        write_text_atomic(self.state_path, json.dumps({"done": done}, indent=2) + "\n")

    def status(self) -> str:
        """A table of the stages: done (with seconds) or to do."""
        done = self.done()
        width = max(len(s.name) for s in self.stages)
        lines = []
        for i, s in enumerate(self.stages, start=1):
            mark = f"done  {done[s.name]['seconds']:8.1f} s" if s.name in done else "to do"
            lines.append(f"{i:2d}. {s.name:<{width}}  {mark:<16}  {s.about}")
        return "\n".join(lines)
