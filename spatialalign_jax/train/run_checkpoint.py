"""Training checkpoints of a run: LoRA weights, optimiser state and a JSON record, via Orbax.

Layout: ``<run_dir>/checkpoints/<step>/{lora,opt_state,meta}``, one folder per saved step, the last
``keep`` kept. ``meta`` is JSON: the step, the data sampler's state, the run config, the wall time
and anything else the trainer adds.

Crash safety comes from Orbax: a step is written into ``<step>.orbax-checkpoint-tmp`` and renamed
to ``<step>`` only when complete (an atomic rename on a local or POSIX filesystem), so a kill at
any moment leaves the latest complete checkpoint intact; leftover temporary folders are never read
and are removed when the next ``RunCheckpointer`` opens the run. Saves are asynchronous by default:
``save`` returns once the arrays are copied to host memory (so the train step may donate their
buffers right after) and the files are written in the background; ``wait()`` or ``close()`` blocks
until they are on disk.

``SigtermGuard`` turns SIGTERM/SIGINT into a flag the training loop polls, so the loop saves and
exits at a step boundary instead of dying mid-step.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_SUBDIR = "checkpoints"
# A format name written into every checkpoint's meta (the module's path before the package had layers): keep it.
META_FORMAT = "spatialalign_jax.run_checkpoint"
META_VERSION = 1
ITEMS = ("lora", "opt_state", "meta")


def _abstract(tree: Any) -> Any:
    """Restore targets: arrays become ShapeDtypeStructs keeping their sharding (Orbax places shards by it)."""

    def leaf(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(leaf, tree)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _json_ready(meta: Mapping[str, Any], step: int) -> dict[str, Any]:
    try:
        out = json.loads(json.dumps(dict(meta)))
    except (TypeError, ValueError) as e:
        bad = [k for k, v in meta.items() if not _serialisable(v)]
        raise ValueError(f"checkpoint meta of step {step} is not JSON-serialisable ({e}); offending keys: {bad}. "
                         "Convert arrays with .tolist() / float() first") from None
    return out


def _serialisable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


class RunCheckpointer:
    """Saves and restores a run's training state under ``<run_dir>/checkpoints``.

    ``save_every``: ``save`` writes only at multiples of it unless forced. ``keep``: how many of the
    most recent checkpoints stay on disk. ``async_save``: write files in a background thread.
    """

    def __init__(self, run_dir: str | Path, keep: int = 3, save_every: int = 100, *, async_save: bool = True) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (checkpoints to keep), got {keep}")
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1 (steps between checkpoints), got {save_every}")
        self.directory = Path(run_dir).absolute() / CHECKPOINT_SUBDIR
        self.keep, self.save_every = int(keep), int(save_every)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            create=True,
            # A crash mid-save leaves `<step>.orbax-checkpoint-tmp`; remove it so that step can be saved again.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        handlers = {"lora": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # -- queries ------------------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    # -- saving -------------------------------------------------------------------------------------

    def save(self, step: int, lora: Any, opt_state: Any, meta: Mapping[str, Any] | None = None, *,
             force: bool = False) -> bool:
        """Saves the state after ``step`` optimiser steps; returns whether a checkpoint was written.

        Without ``force`` only steps that are multiples of ``save_every`` are saved; a step that is
        already saved is never written twice. Refuses (FloatingPointError) LoRA weights or optimiser
        state holding NaN/inf, so a diverged run cannot overwrite good checkpoints with bad ones.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if (not force and step % self.save_every) or step in self._manager.all_steps():
            return False
        if not bool(_all_finite((lora, opt_state))):
            raise FloatingPointError(f"refusing to save step {step}: the LoRA weights or optimiser state hold NaN/inf "
                                     f"(the last good checkpoint, step {self.latest_step()}, stays as it was)")
        record = _json_ready(meta or {}, step)
        if record.get("step", step) != step:
            raise ValueError(f"meta['step']={record['step']} differs from the step being saved ({step})")
        record.update(step=step, saved_at=time.time(), format=META_FORMAT, version=META_VERSION)
        args = ocp.args.Composite(lora=ocp.args.StandardSave(lora), opt_state=ocp.args.StandardSave(opt_state),
                                  meta=ocp.args.JsonSave(record))
        return bool(self._manager.save(step, args=args, force=True))

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.close()

    def __enter__(self) -> "RunCheckpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- restoring ----------------------------------------------------------------------------------

    def _resolve(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory}; saved steps: {steps}")
        return int(step)

    def meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON record of a checkpoint (default: the latest), without reading any arrays."""
        step = self._resolve(step)
        return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    def restore(self, step: int | None = None, lora_target: Any = None,
                opt_target: Any = None) -> tuple[Any, Any, dict[str, Any]]:
        """``(lora, opt_state, meta)`` of ``step`` (default: the latest complete checkpoint).

        Targets are pytrees of the same structure as what was saved (e.g. the freshly initialised
        LoRA state and optimiser state, or their ``jax.eval_shape``), with jax arrays or
        ShapeDtypeStructs as leaves; each restored array gets the target leaf's sharding, so a run
        resumes on another mesh. ``lora_target=None`` restores the LoRA as saved (nested dicts);
        ``opt_target=None`` skips the optimiser state and returns None for it.
        """
        step = self._resolve(step)
        items: dict[str, Any] = {"lora": ocp.args.StandardRestore(None if lora_target is None else _abstract(lora_target)),
                                 "meta": ocp.args.JsonRestore()}
        if opt_target is not None:
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_target))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"checkpoint {self.directory / str(step)} does not match the restore target: {e}. "
                             "Was it saved with another LoRA config (rank, targets) or optimiser? Use a new "
                             "run.dir or the settings the run was started with") from e
        opt_state = restored.opt_state if opt_target is not None else None
        return restored.lora, opt_state, dict(restored.meta)


class SigtermGuard:
    """Context manager that turns SIGTERM / SIGINT into ``guard.requested`` for the loop to poll.

    The first signal only sets the flag (the loop saves a checkpoint and exits at the next step
    boundary); a second one restores the previous handlers and re-delivers the signal, so a
    repeated Ctrl-C still stops a stuck run. Outside the main thread signals cannot be caught:
    the guard then does nothing. Multi-host runs must agree on stopping: ``should_stop()`` is True
    on every host as soon as one host got a signal (a small all-gather: call it at the same step
    on every host).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second signal: give up on the clean exit
            self._restore_handlers()
            signal.raise_signal(signum)
            return
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self) -> "SigtermGuard":
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore_handlers()

    def should_stop(self) -> bool:
        """Whether any process of the run was asked to stop (identical on all hosts)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array(self.requested, np.int32))
        return bool(np.any(flags))
