"""Training checkpoints: round trips (optax AdamW state, nnx LoRA state, shardings), keep-last-K,
resume from the latest, crash leftovers ignored (also a process killed mid-save), NaN refusal and
the SIGTERM/SIGINT guard."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from spatialalign_jax.train.run_checkpoint import CHECKPOINT_SUBDIR, RunCheckpointer, SigtermGuard

REPO = Path(__file__).resolve().parent.parent


def _lora(seed=0):
    rng = np.random.default_rng(seed)
    return {"blocks": {"attn2": {"to_k": {"lora_A": jnp.asarray(rng.standard_normal((2, 8, 4)), jnp.float32),
                                          "lora_B": jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)}}},
            "text": {"lora_A": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)}}


def _optimizer():
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 2, 10, 0.0)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))


def _trained(steps=3, seed=0):
    """LoRA and AdamW state after a few real updates, so moments and counts are non-trivial."""
    lora, opt = _lora(seed), _optimizer()
    state = opt.init(lora)
    for i in range(steps):
        grads = jax.tree.map(lambda x: jnp.sin(x + i), lora)
        updates, state = opt.update(grads, state, lora)
        lora = optax.apply_updates(lora, updates)
    return lora, state


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_with_adamw_state(tmp_path):
    lora, opt_state = _trained()
    meta = {"sampler": {"step": 7, "seed": 0, "pairing": "threshold"}, "config": {"train": {"steps": 30}}}
    with RunCheckpointer(tmp_path, keep=3, save_every=5) as ck:
        assert ck.latest_step() is None
        assert ck.save(5, lora, opt_state, meta)
        ck.wait()
    fresh_lora, fresh_opt = _lora(1), _optimizer().init(_lora(1))  # targets: same structure, other values
    with RunCheckpointer(tmp_path) as ck:
        assert ck.latest_step() == 5
        got_lora, got_opt, got_meta = ck.restore(None, fresh_lora, fresh_opt)
        assert ck.meta()["sampler"] == meta["sampler"]
    _assert_tree_equal(got_lora, lora)
    _assert_tree_equal(got_opt, opt_state)
    assert int(got_opt[1][0].count) == 3  # optax's step count of ScaleByAdamState survived
    assert got_meta["step"] == 5 and got_meta["sampler"] == meta["sampler"] and got_meta["config"] == meta["config"]
    assert got_meta["saved_at"] <= time.time()
    # The restored state continues training exactly like the original.
    grads = jax.tree.map(jnp.cos, lora)
    u1, _ = _optimizer().update(grads, opt_state, lora)
    u2, _ = _optimizer().update(grads, got_opt, got_lora)
    _assert_tree_equal(u1, u2)


def test_nnx_lora_state_and_shardings(tmp_path):
    model = nnx.LoRA(8, 4, 16, rngs=nnx.Rngs(0))
    lora = nnx.state(model, nnx.LoRAParam)
    opt_state = optax.adamw(1e-3).init(lora)
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
    lora = jax.device_put(lora, NamedSharding(mesh, P()))
    with RunCheckpointer(tmp_path, save_every=1) as ck:
        ck.save(1, lora, opt_state, {})
        ck.wait()
        # Restore onto another placement: lora_a split over fsdp, given as ShapeDtypeStructs.
        split = NamedSharding(mesh, P(None, "fsdp"))
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=split), lora)
        got, got_opt, meta = ck.restore(1, target, None)
    assert isinstance(got, nnx.State) and got_opt is None and meta["step"] == 1
    _assert_tree_equal(got, lora)
    assert all(leaf.sharding == split for leaf in jax.tree.leaves(got))
    with RunCheckpointer(tmp_path) as ck:  # no target: the LoRA as saved, as nested dicts
        raw, _, _ = ck.restore()
    np.testing.assert_array_equal(np.asarray(raw["lora_a"]["value"]), np.asarray(lora["lora_a"][...]))


def test_async_save_survives_donated_buffers(tmp_path):
    lora, opt_state = _trained()
    expected = jax.tree.map(np.asarray, (lora, opt_state))
    with RunCheckpointer(tmp_path, save_every=1, async_save=True) as ck:
        ck.save(1, lora, opt_state)
        for x in jax.tree.leaves((lora, opt_state)):  # what a donating train step does to the buffers
            x.delete()
        ck.wait()
        got_lora, got_opt, _ = ck.restore(1, *expected)
    _assert_tree_equal((got_lora, got_opt), expected)


def test_save_every_keep_last_k_and_resume(tmp_path):
    lora, opt_state = _trained()
    with RunCheckpointer(tmp_path, keep=2, save_every=10) as ck:
        saved = [s for s in range(1, 41) if ck.save(s, jax.tree.map(lambda x: x + s, lora), opt_state, {"s": s})]
        assert saved == [10, 20, 30, 40]
        assert not ck.save(40, lora, opt_state, force=True)  # a step is never written twice
        assert ck.save(43, jax.tree.map(lambda x: x + 43, lora), opt_state, {"s": 43}, force=True)  # e.g. SIGTERM
        ck.wait()
        assert ck.all_steps() == [40, 43]
    on_disk = sorted(int(p.name) for p in (tmp_path / CHECKPOINT_SUBDIR).iterdir() if p.name.isdigit())
    assert on_disk == [40, 43]
    with RunCheckpointer(tmp_path, keep=2, save_every=10) as ck:  # a restarted run resumes from the latest
        assert ck.latest_step() == 43
        got, _, meta = ck.restore(None, lora, opt_state)
        assert meta["s"] == 43
        _assert_tree_equal(got, jax.tree.map(lambda x: x + 43, lora))
        _, _, older = ck.restore(40, lora, opt_state)
        assert older["s"] == 40
        with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 10 .*saved steps: \[40, 43\]"):
            ck.restore(10, lora, opt_state)


def test_leftover_temporary_dir_is_ignored_and_cleaned(tmp_path):
    lora, opt_state = _trained()
    with RunCheckpointer(tmp_path, save_every=10) as ck:
        ck.save(10, lora, opt_state, {"ok": True})
    # What a crash in the middle of saving step 20 leaves behind.
    tmp = tmp_path / CHECKPOINT_SUBDIR / "20.orbax-checkpoint-tmp"
    (tmp / "lora").mkdir(parents=True)
    (tmp / "lora" / "half_written").write_bytes(b"\0" * 100)
    with RunCheckpointer(tmp_path, save_every=10) as ck:
        assert ck.latest_step() == 10 and ck.all_steps() == [10]
        assert ck.restore(None, lora, opt_state)[2]["ok"]
        assert not tmp.exists()
        assert ck.save(20, lora, opt_state)  # the crashed step can be saved again
        ck.wait()
        assert ck.latest_step() == 20


_KILLED_CHILD = textwrap.dedent("""
    import os, sys, time
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax.numpy as jnp, optax
    from orbax.checkpoint._src.path import atomicity
    from spatialalign_jax.train.run_checkpoint import RunCheckpointer

    run_dir, marker = sys.argv[1], sys.argv[2]
    lora = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((3, 2))}
    opt_state = optax.adamw(1e-3).init(lora)
    ck = RunCheckpointer(run_dir, save_every=10, async_save=False)
    ck.save(10, lora, opt_state, {"tag": "good"})

    async def stuck_finalize(self):  # step 20's files are written, the commit never happens
        open(marker, "w").close()
        time.sleep(600)

    atomicity.AtomicRenameTemporaryPath.finalize = stuck_finalize
    ck.save(20, {k: v + 1 for k, v in lora.items()}, opt_state, {"tag": "bad"})
""")


def test_process_killed_mid_save_keeps_the_last_checkpoint(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "writing"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(run_dir), str(marker)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(f"the child ended early: {child.stdout.read().decode()[-3000:]}")
            assert time.time() < deadline, "the child never reached step 20's commit"
            time.sleep(0.1)
        assert (run_dir / CHECKPOINT_SUBDIR / "20.orbax-checkpoint-tmp").is_dir()
    finally:
        child.kill()
        child.wait()
    lora = {"a": jnp.zeros((2, 3)), "b": jnp.zeros((3, 2))}
    with RunCheckpointer(run_dir, save_every=10) as ck:
        assert ck.latest_step() == 10
        got, opt_state, meta = ck.restore(None, lora, optax.adamw(1e-3).init(lora))
    assert meta["tag"] == "good"
    np.testing.assert_array_equal(np.asarray(got["a"]), np.arange(6.0).reshape(2, 3))


def test_bad_inputs(tmp_path):
    lora, opt_state = _trained()
    with RunCheckpointer(tmp_path, save_every=1) as ck:
        with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
            ck.restore(None, lora, opt_state)
        bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), lora)
        with pytest.raises(FloatingPointError, match="refusing to save step 1"):
            ck.save(1, bad, opt_state)
        with pytest.raises(ValueError, match=r"not JSON-serialisable.*\['arr'\]"):
            ck.save(1, lora, opt_state, {"arr": np.zeros(3), "fine": 1})
        with pytest.raises(ValueError, match="differs from the step"):
            ck.save(1, lora, opt_state, {"step": 2})
        assert ck.all_steps() == []
        ck.save(1, lora, opt_state)
        ck.wait()
        other = {"text": lora["text"], "extra": jnp.zeros(3)}
        with pytest.raises(ValueError, match="does not match the restore target"):
            ck.restore(1, other, None)
    with pytest.raises(ValueError, match="keep must be >= 1"):
        RunCheckpointer(tmp_path, keep=0)


def _signal_main_thread(signum: int) -> None:
    # To the main thread itself: a process-directed signal may land on one of JAX's or torch's threads,
    # and the main thread then sees it only at some later bytecode.
    signal.pthread_kill(threading.main_thread().ident, signum)


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)  # the Python handler runs between bytecodes of the main thread


def test_sigterm_guard_sets_a_flag():
    before = signal.getsignal(signal.SIGTERM)
    with SigtermGuard() as guard:
        assert not guard.requested and not guard.should_stop()
        _signal_main_thread(signal.SIGTERM)
        _wait_for(lambda: guard.requested)
        assert guard.requested and guard.signal_name == "SIGTERM" and guard.should_stop()
    assert signal.getsignal(signal.SIGTERM) == before


def test_second_sigint_interrupts():
    # The guard hands a second signal to the handler it found; a job started in the background by a
    # non-interactive shell finds SIGINT ignored, so give it Python's default one to find.
    original = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with SigtermGuard() as guard:
                _signal_main_thread(signal.SIGINT)
                _wait_for(lambda: guard.requested)
                assert guard.requested
                _signal_main_thread(signal.SIGINT)  # a repeated Ctrl-C stops for real
                _wait_for(lambda: False, timeout=5.0)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, original)
