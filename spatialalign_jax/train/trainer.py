"""The training loop behind `run_train.py`: mesh, model, data, the jitted step, checkpoints, logs.

A run lives in `run.dir`: `config.yaml` (the resolved config), `checkpoints/<step>/` (Orbax: LoRA,
AdamW state, data-sampler state), `lora/step_<step>/` (the LoRA as a converted checkpoint that
`python -m converters.to_diffusers` exports), `metrics.jsonl` and `tb/` (TensorBoard). Starting a run
whose folder holds checkpoints resumes from the latest one: same step, same next pairs, same noise.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters.load import load_transformer
from spatialalign_jax.common.atomic import file_in_the_way
from spatialalign_jax.model.checkpoint import save_checkpoint
from spatialalign_jax.model.lora import BASE, flat_params, set_params
from spatialalign_jax.model.sharding import make_mesh, microbatch_sharding, param_shardings
from spatialalign_jax.model.transformer import WanTransformer3DModel

from .losses import pairing_for
from .metrics_log import MetricsLogger, ProgressBar
from .pairs import PairSampler, make_synthetic_store
from .run_checkpoint import RunCheckpointer, SigtermGuard
from .run_config import RunConfig
from .step import init_train_state, make_optimizer, make_train_step

log = logging.getLogger(__name__)

# Arrays of a sampler batch the step consumes; the rest (DSR values, indices) are for logs.
STEP_KEYS = ("latents_w", "latents_l", "text_emb")


class NonFiniteLoss(RuntimeError):
    pass


def build_model(rc: RunConfig, mesh: jax.sharding.Mesh) -> WanTransformer3DModel:
    m = rc.model
    if m.path:
        return load_transformer(m.path, mesh=mesh, dtype=m.dtype, param_dtype=m.param_dtype, attention=m.attention,
                                remat=m.remat, scan_unroll=m.scan_unroll, lora=rc.lora_config(),
                                lora_seed=m.init_seed)
    # Random init (smoke runs, benchmarks): built on one device, then each parameter placed sharded.
    model = WanTransformer3DModel(rc.wan_config(), lora=rc.lora_config(), dtype=m.dtype, param_dtype=m.param_dtype,
                                  attention=m.attention, remat=m.remat, scan_unroll=m.scan_unroll,
                                  rngs=nnx.Rngs(m.init_seed))
    params = flat_params(model)
    shardings = param_shardings({k: v.shape for k, v in params.items()}, mesh)
    set_params(model, {k: jax.device_put(v, shardings[k]) for k, v in params.items()})
    return model


def _ensure_store(rc: RunConfig) -> None:
    path = Path(rc.data.store)
    if rc.data.synthetic is not None:
        if jax.process_index() == 0 and not path.exists():
            log.info("building a synthetic store at %s", path)
            make_synthetic_store(path, **rc.data.synthetic_kwargs())
        if jax.process_count() > 1:  # every process waits, whether or not the store was there
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("synthetic store ready")
    if not path.exists():
        raise FileNotFoundError(f"data.store {str(path)!r} does not exist; score samples into it with "
                                "`python -m scoring score ...`, or set data.synthetic for a smoke run")


def _global_batch(micro_batches: list[dict[str, np.ndarray]], mesh, grad_accum: int) -> dict[str, jax.Array]:
    """Stacks this host's micro-batches to (grad_accum, pairs, ...) global arrays split over the mesh."""
    out = {}
    for k in STEP_KEYS:
        local = np.stack([mb[k] for mb in micro_batches])
        global_shape = (grad_accum, local.shape[1] * jax.process_count(), *local.shape[2:])
        out[k] = jax.make_array_from_process_local_data(microbatch_sharding(mesh, local.ndim), local, global_shape)
    return out


# What a resumed run must share with the run that saved the checkpoint to draw the same pairs and
# noise and continue the same optimisation.
_RESUME_KEYS = ("model.path", "model.config", "model.init_seed", "lora", "loss", "optim", "train.seed",
                "train.per_device_batch", "train.grad_accum", "data.store", "data.tau", "data.split",
                "data.max_text_len")


def _check_resumable(rc: RunConfig, meta: dict[str, Any], pairs_per_micro_step: int) -> None:
    saved_pairs = meta.get("sampler", {}).get("global_batch_size")
    if saved_pairs is not None and saved_pairs != pairs_per_micro_step:
        raise ValueError(
            f"{rc.run.dir} holds a checkpoint trained with {saved_pairs} pairs per micro-step (devices x "
            f"train.per_device_batch), this run has {pairs_per_micro_step}; resume on as many devices, or use a "
            "new run.dir")
    if "config" not in meta:
        return
    changed = [line for line in RunConfig.from_dict(meta["config"]).diff(rc)
               if any(line.startswith((k + ":", k + ".")) for k in _RESUME_KEYS)]
    if changed:
        raise ValueError(
            f"{rc.run.dir} holds a checkpoint of a run with other settings ({'; '.join(changed)}, there -> now); "
            "resuming would not continue that run. Use a new run.dir, or the original settings")


def _lora_export_path(rc: RunConfig, step: int) -> Path:
    return Path(rc.run.dir) / "lora" / f"step_{step:07d}"


def _export_lora(rc: RunConfig, model: WanTransformer3DModel, lora_state, step: int) -> Path:
    lora_flat = {".".join(map(str, p)): np.asarray(jax.device_get(v[...])) for p, v in nnx.to_flat_state(lora_state)}
    dst = _lora_export_path(rc, step)
    return save_checkpoint(dst, model.config, None, rc.lora_config(), lora_flat, overwrite=True,
                           extra_meta={"run": rc.run.name, "step": step,
                                       "base": str(Path(rc.model.path).absolute()) if rc.model.path else None})


class RunDirBusy(RuntimeError):
    """Another trainer is running in the same run folder."""


def _lock_run_dir(run_dir: Path):
    """An exclusive lock on the run folder, held until the returned file is closed (or the process
    ends): a second trainer there (a requeued job starting while the old one exits) would delete the first one's
    in-flight checkpoint and write the same steps."""
    import fcntl

    handle = open(run_dir / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise RunDirBusy(f"another trainer is running in {run_dir}; wait for it to finish, or use another "
                         "run.dir") from None
    return handle


def train(rc: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) the configured training; returns a summary of the last step."""
    run_dir = Path(rc.run.dir)
    blocking = file_in_the_way(run_dir)
    if blocking is not None:
        raise ValueError(f"run.dir {str(run_dir)!r} must be a folder, but {str(blocking)!r} is a file")
    mesh = make_mesh(rc.mesh)  # a mesh the devices cannot make fails before the run folder exists
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock_run_dir(run_dir) if jax.process_index() == 0 else None
    try:
        return _train(rc, run_dir, mesh, progress)
    finally:
        if lock is not None:
            lock.close()


def _train(rc: RunConfig, run_dir: Path, mesh: jax.sharding.Mesh, progress: bool) -> dict[str, Any]:
    pairs_micro = rc.pairs_per_micro_step(mesh.size)
    chief = jax.process_index() == 0  # the one process that writes run files (Orbax coordinates its own)
    _ensure_store(rc)
    sampler = PairSampler(rc.data.store, global_batch_size=pairs_micro, seed=rc.train.seed,
                          pairing=pairing_for(rc.loss.kind), tau=rc.data.tau, split=rc.data.split,
                          max_text_len=rc.data.max_text_len, num_hosts=jax.process_count(),
                          host_index=jax.process_index())

    sampler.store.check_model(rc.wan_config())  # before the weights load (minutes at full scale)
    model = build_model(rc, mesh)
    step_cfg = rc.step_config()
    optimizer = make_optimizer(step_cfg)
    state = init_train_state(model, optimizer, mesh)
    base = nnx.state(model, BASE)
    ckpt = RunCheckpointer(run_dir, keep=rc.train.keep_checkpoints, save_every=rc.train.checkpoint_every)
    start = 0
    if ckpt.latest_step() is not None:
        _check_resumable(rc, ckpt.meta(), pairs_micro)
        lora, opt_state, meta = ckpt.restore(None, state["lora"], state["opt_state"])
        start = int(meta["step"])
        state = {"lora": lora, "opt_state": opt_state,
                 "step": jax.device_put(jnp.asarray(start, jnp.int32), state["step"].sharding)}
        sampler.load_state_dict(meta["sampler"])
        log.info("resumed %s from step %d", run_dir, start)
        if chief and not _lora_export_path(rc, start).exists():  # the run stopped between the two writes
            _export_lora(rc, model, state["lora"], start)
    if chief:
        rc.save_yaml(run_dir / "config.yaml")
    step_fn = make_train_step(model, step_cfg, optimizer, mesh)
    key = jax.random.key(rc.train.seed)
    accum = rc.train.grad_accum

    # The next step's batch is read before this step's metrics come back (see the loop), so the sampler
    # runs ahead of the step being saved: its state is stated per optimiser step instead.
    sampler_start = sampler.step

    def save(step: int, force: bool = False) -> None:
        sampler_state = {**sampler.state_dict(), "step": sampler_start + (step - start) * accum}
        meta = {"step": step, "sampler": sampler_state, "config": rc.to_dict()}
        if ckpt.save(step, state["lora"], state["opt_state"], meta, force=force):
            logger.flush()  # a resume starts after this step: its metrics must not be left in a buffer
            if chief:
                _export_lora(rc, model, state["lora"], step)

    logger = MetricsLogger(run_dir, resume_step=start, enabled=chief)
    bar = ProgressBar(total=rc.train.steps, initial=start, enabled=progress and chief)
    summary: dict[str, Any] = {"step": start}
    try:
        with SigtermGuard() as guard, sampler.prefetch(rc.train.prefetch * accum) as batches:
            next_batch = lambda: _global_batch([next(batches) for _ in range(accum)], mesh, accum)  # noqa: E731
            batch = next_batch() if start < rc.train.steps else None
            for step in range(start, rc.train.steps):
                t0 = time.perf_counter()
                state, metrics = step_fn(state, base, batch, key)  # dispatched; runs while the host goes on
                if step + 1 < rc.train.steps:
                    batch = next_batch()  # reading and uploading the next batch overlaps this step
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                    last = ckpt.latest_step()
                    kept = (f"The last good checkpoint (step {last}) is intact in {ckpt.directory}; rerun to resume "
                            "from it" if last is not None else "No checkpoint was saved yet, so a rerun starts over")
                    raise NonFiniteLoss(
                        f"loss is {metrics['loss']} (gradient norm {metrics['grad_norm']}) at step {step + 1}; "
                        f"stopping without saving. {kept}, after lowering optim.lr or setting optim.grad_clip")
                done = step + 1
                metrics["step_time"] = time.perf_counter() - t0
                if done % rc.train.log_every == 0 or done == rc.train.steps:
                    logger.log(done, metrics)
                bar.update(done, metrics)
                summary = {"step": done, **metrics}
                stop = guard.should_stop()
                save(done, force=done == rc.train.steps or stop)  # else every train.checkpoint_every
                if stop:
                    log.warning("signal received: saved step %d and stopped", done)
                    break
    finally:
        ckpt.wait()
        ckpt.close()
        logger.close()
        bar.close()
    return summary
