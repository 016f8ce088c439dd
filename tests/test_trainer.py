"""run_train.py end to end on configs/tiny.yaml: smoke run, 8-device mesh, two processes, kill and resume,
NaN stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_train(run_dir: Path, *extra: str, devices: int = 1, wait: bool = True, check: bool = True,
               env_extra: dict[str, str] | None = None):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.update(env_extra or {})
    cmd = [sys.executable, "run_train.py", "--config", "configs/tiny.yaml", "--no-progress",
           "--set", f"run.dir={run_dir}", "--set", f"data.store={run_dir.parent / 'store'}", *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny config's full run on one device: the losses every other run must reproduce."""
    run = tmp_path_factory.mktemp("ref") / "run"
    out = _run_train(run)
    assert "finished at step 30" in out.stdout
    return run, _losses(run)


def test_tiny_config_end_to_end(reference):
    run, losses = reference
    assert sorted(losses) == list(range(1, 31))
    assert all(np.isfinite(v) for v in losses.values())
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "20", "30"]
    assert (run / "lora" / "step_0000030" / "spatialalign.json").is_file()
    assert any((run / "tb").iterdir()) and (run / "config.yaml").is_file()
    # the LoRA moved the policy away from the reference: its DPO margin is no longer zero
    assert abs(json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["margin"]) > 1e-4


def test_mesh_data2_fsdp4_matches_one_device(reference, tmp_path):
    _, losses = reference
    run = tmp_path / "run"
    # one device: the tiny config's 1 pair per device x 2 micro-steps; 8 devices see 8 pairs per micro-step,
    # so compare against a one-device run with the same global batch
    _run_train(run, "--mesh", "data=2,fsdp=4", "--set", "train.steps=4", devices=8)
    single = tmp_path / "single"
    _run_train(single, "--set", "train.steps=4", "--set", "train.per_device_batch=8")
    np.testing.assert_allclose([_losses(run)[s] for s in range(1, 5)], [_losses(single)[s] for s in range(1, 5)],
                               rtol=2e-5)


def test_two_processes_match_one_process(tmp_path):
    """A multi-host run (two processes of one device each, found through JAX_COORDINATOR_ADDRESS) trains
    exactly as one process with both devices: each host reads its half of every batch, only the chief
    writes run files and exports LoRA, and neither waits on the other at a checkpoint."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    args = ("--mesh", "data=2,fsdp=1", "--set", "train.steps=4", "--set", "train.checkpoint_every=2")
    run = tmp_path / "multi" / "run"
    procs = [_run_train(run, *args, wait=False, env_extra={
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
        for i in range(2)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    single = tmp_path / "single" / "run"
    _run_train(single, *args, devices=2)
    multi_rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    single_rows = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "e_w", "e_l", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in multi_rows], [r[key] for r in single_rows], rtol=1e-6, err_msg=key)
    assert sorted(p.name for p in (run / "lora").iterdir()) == ["step_0000002", "step_0000004"]


def test_resume_rewrites_a_missing_lora_export(tmp_path):
    """A run stopped between its checkpoint and its LoRA export gets the export when it resumes."""
    run = tmp_path / "run"
    args = ("--set", "train.steps=2", "--set", "train.checkpoint_every=2")
    _run_train(run, *args)
    shutil.rmtree(run / "lora" / "step_0000002")
    assert "already at step 2" in _run_train(run, *args).stdout  # no step to run, but the export is rewritten
    assert (run / "lora" / "step_0000002" / "spatialalign.json").is_file()


def test_mesh_that_does_not_match_devices_is_an_error(tmp_path):
    out = _run_train(tmp_path / "run", "--mesh", "data=3,fsdp=1", devices=2, check=False)
    assert out.returncode != 0 and "data=3 x fsdp=1 = 3 devices, but 2 are available" in out.stdout + out.stderr
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_kill_and_resume_continues_with_the_same_losses(reference, tmp_path):
    _, losses = reference
    run = tmp_path / "run"
    proc = _run_train(run, "--set", "train.checkpoint_every=5", wait=False)
    # SIGKILL once the first checkpoint exists: no chance to save anything more
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "checkpoints" / "5").is_dir():
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert 5 <= saved < 30 and saved % 5 == 0, "the kill came too late to leave steps to resume"
    _run_train(run, "--set", "train.checkpoint_every=5")
    resumed = _losses(run)
    assert sorted(resumed) == list(range(1, 31))
    for step in range(saved + 1, 31):
        np.testing.assert_allclose(resumed[step], losses[step], rtol=1e-5, err_msg=f"step {step}")


def test_sigterm_saves_before_exit(tmp_path):
    run = tmp_path / "run"
    proc = _run_train(run, "--set", "train.steps=100000", "--set", "train.checkpoint_every=1000", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "metrics.jsonl").exists()
                                          and len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.2)
    # a second trainer in the same run folder (a requeued job while the old one runs) is refused
    second = _run_train(run, "--set", "train.steps=100000", "--set", "train.checkpoint_every=1000", check=False)
    assert second.returncode == 1 and "another trainer is running" in second.stderr, second.stderr
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    last = max(_losses(run))
    assert (run / "checkpoints" / str(last)).is_dir(), out


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    out = _run_train(run, "--set", "optim.lr=1e30", "--set", "optim.warmup_steps=0",
                     "--set", "train.checkpoint_every=1", check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "loss is" in out.stderr and "last good checkpoint" in out.stderr
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) < 30


def test_resume_with_other_settings_is_an_error(tmp_path):
    run = tmp_path / "run"
    _run_train(run, "--set", "train.steps=2", "--set", "train.checkpoint_every=2")
    out = _run_train(run, "--set", "train.steps=4", "--set", "optim.lr=0.5", check=False)
    assert out.returncode == 1 and "other settings (optim" in out.stderr, out.stderr
    out = _run_train(run, "--set", "train.steps=4", "--mesh", "data=2,fsdp=1", devices=2, check=False)
    assert out.returncode == 1 and "pairs per micro-step" in out.stderr, out.stderr
    _run_train(run, "--set", "train.steps=4")  # more steps, same run: resumes
    assert sorted(_losses(run)) == [1, 2, 3, 4]


def test_messages_for_a_finished_run_a_mismatched_model_and_an_early_nan(tmp_path, capsys):
    from converters import to_diffusers

    run = tmp_path / "run"
    _run_train(run, "--set", "train.steps=2", "--set", "train.checkpoint_every=2")
    out = _run_train(run, "--set", "train.steps=2")
    assert "nothing to do" in out.stdout and "already at step 2 (train.steps=2)" in out.stdout, out.stdout

    # Exporting from the run folder or its Orbax step folder names the LoRA export to pass instead.
    for src in (run, run / "checkpoints" / "2"):
        assert to_diffusers.main(["--src", str(src), "--dst", str(tmp_path / "out")]) == 1
        assert f"pass one of its LoRA exports, such as {str(run / 'lora' / 'step_0000002')!r}" in capsys.readouterr().err

    # The store (64-d text, from the run above) does not fit the model: said before any step is traced.
    out = _run_train(tmp_path / "other", "--set", "model.config.text_dim=32", "--set", "data.synthetic=null",
                     check=False)
    assert out.returncode == 1 and "64-d text embeddings; the model's text_dim is 32" in out.stderr, out.stderr

    (tmp_path / "afile").write_text("")
    out = _run_train(tmp_path / "afile" / "run", check=False)
    assert out.returncode == 1 and "is a file" in out.stderr, out.stderr

    out = _run_train(tmp_path / "nan", "--set", "optim.lr=1e30", "--set", "optim.warmup_steps=0", check=False)
    assert out.returncode == 1 and "No checkpoint was saved yet, so a rerun starts over" in out.stderr, out.stderr
