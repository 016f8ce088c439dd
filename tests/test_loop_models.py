"""The real-model loop end to end, on tiny random models, through the user's command:

    python run_train.py --config configs/wan2.1_t2v_1.3b.yaml --set loop.enabled=true --set ...

with every path pointed at folders saved by the test builders (tests/tiny_loop.py): a diffusers Wan
transformer, AutoencoderKLWan, umT5 + tokenizer, Grounding DINO and SAM 2 video, two scorers side by
side. Random detectors label no video valid, so the first run stops at `train` with the trainer's
"no usable pair" message; the test then writes labels as a scorer would and reruns, and the loop goes
on from `train` to the report. A second run folder is killed (SIGKILL to the process group, scorers
included) in the middle of `score` and in the middle of `train`, and its reruns must give what the
uninterrupted run gave: the same labels, and the same training curve with no gap or repeated step.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import tiny_loop
from spatialalign_jax.common.store import Store, StoreError, create_store
from spatialalign_jax.common.store_layout import Status
from spatialalign_jax.loop import cycle
from spatialalign_jax.loop.cycle import STAGE_NAMES

TRAIN_STEPS, CHECKPOINT_EVERY = 40, 2  # many small checkpoints: a kill in `train` lands between two of them
NO_PAIR = "no prompt has a usable pair"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop_models")
    models = tiny_loop.build_models(root / "models")
    train_csv, test_csv = tiny_loop.write_prompts(root / "prompts", train=4, test=2)
    return root, lambda run: tiny_loop.overrides(run, models, train_csv, test_csv, train_steps=TRAIN_STEPS,
                                                 checkpoint_every=CHECKPOINT_EVERY), models


def _labels(store_path: Path) -> dict[str, np.ndarray]:
    store = Store.open(store_path)
    boxes_animal, boxes_object = store.read_boxes()
    return {"status": store.read_status(), "dsr": store.read_dsr(), "boxes_animal": boxes_animal,
            "boxes_object": boxes_object}


def _latents(store_path: Path) -> np.ndarray:
    store = Store.open(store_path)
    return np.stack([[store.read_latents(p, s)[0] for s in range(store.samples_per_prompt)]
                     for p in range(store.num_prompts)])


def _done(run: Path) -> list[str]:
    return list(json.loads((run / "stages.json").read_text())["done"])


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]


def _checked(result, *, rc: int = 0):
    assert result.returncode == rc, result.stdout[-5000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted loop: stops at `train` (no pair), gets labels, is rerun to the end."""
    root, sets, _ = setup
    run = root / "reference"
    first = _checked(tiny_loop.run(sets(run)), rc=1)
    assert NO_PAIR in first.stderr and "data.tau" in first.stderr, first.stderr[-3000:]
    assert _done(run) == ["prompts", "encode", "sample", "score"]
    labels = _labels(run / "data" / "train")  # what uninterrupted scoring gave, before the stand-in labels
    assert not (labels["status"] == Status.UNSCORED).any()
    assert not any(Status(int(s)).is_failure for s in labels["status"].ravel())  # invalid, not failed
    latents = _latents(run / "data" / "train")

    tiny_loop.write_stand_in_labels(run / "data" / "train")
    second = _checked(tiny_loop.run(sets(run)))
    for i, name in enumerate(STAGE_NAMES[:4], start=1):  # continued from `train`
        assert f"[{i}/{len(STAGE_NAMES)}] {name}: done" in second.stdout, second.stdout[-3000:]
    assert f"[5/{len(STAGE_NAMES)}] train: LoRA" in second.stdout
    return {"run": run, "labels": labels, "latents": latents, "stdout": second.stdout}


@pytest.mark.slow
def test_loop_on_tiny_real_models(reference, setup):
    run = reference["run"]
    _, _, models = setup
    assert _done(run) == list(STAGE_NAMES)

    summary = json.loads((run / "report" / "summary.json").read_text())
    assert set(summary) == {"reference", "finetuned"}
    for model in summary.values():
        assert set(model) == {"correctness", "valid_rate"}
        assert list(model["correctness"]) == [f"{t / 10:.1f}" for t in range(10)]
        assert all(0 <= v <= 1 for v in model["correctness"].values()) and 0 <= model["valid_rate"] <= 1
    report = (run / "report" / "report.md").read_text()
    assert "Correctness@0.7 by DSR type" in report and report in reference["stdout"]
    for name in ("correctness.png", "samples.png"):
        assert (run / "report" / name).is_file(), name
    for name in ("test_reference", "test_finetuned"):  # score_test kept the decoded videos
        assert len(list((run / "report" / "mp4" / name).glob("*.mp4"))) == 4, name
        assert not (Store.open(run / "data" / name).read_status() == Status.UNSCORED).any()

    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, TRAIN_STEPS + 1))
    assert all(np.isfinite(m["loss"]) for m in metrics)

    # The test prompts sampled by both models with the same seeds; the LoRA changed the samples.
    ref, ft = run / "data" / "test_reference", run / "data" / "test_finetuned"
    np.testing.assert_array_equal(Store.open(ref).read_seeds(), Store.open(ft).read_seeds())
    assert np.abs(_latents(ref) - _latents(ft)).max() > 0

    # The exported LoRA: diffusers' file layout and metadata, loadable onto the base transformer.
    from diffusers import WanTransformer3DModel
    from safetensors import safe_open
    from safetensors.numpy import load_file

    lora_file = run / "export" / "lora" / "pytorch_lora_weights.safetensors"
    weights = load_file(lora_file)
    modules = ["condition_embedder.text_embedder.linear_1", "condition_embedder.text_embedder.linear_2"]
    modules += [f"blocks.{i}.attn2.to_{kv}" for i in range(2) for kv in "kv"]
    assert set(weights) == {f"transformer.{m}.lora_{f}.weight" for m in modules for f in "AB"}
    assert all(np.abs(weights[f"transformer.{m}.lora_B.weight"]).max() > 0 for m in modules)  # trained
    with safe_open(str(lora_file), "np") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.r"] == 16 and meta["transformer.lora_alpha"] == 16
    transformer = WanTransformer3DModel.from_pretrained(models["transformer"])
    transformer.load_lora_adapter(str(lora_file), prefix="transformer", use_safetensors=True)
    assert sum("lora_B" in name for name, _ in transformer.named_parameters()) == len(modules)


def _wait_for(condition, what: str, proc, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the loop exited (code {proc.returncode}) before {what}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _kill(proc) -> None:
    """SIGKILL to the loop's whole process group: the loop and the scorers it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _scored(store_path: Path) -> int:
    try:
        return int((Store.open(store_path).read_status() != Status.UNSCORED).sum())
    except (StoreError, FileNotFoundError, ValueError):  # not created yet
        return 0


def _checkpoints(run: Path) -> list[int]:
    folder = run / "train" / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


@pytest.mark.slow
def test_kill_in_score_and_in_train_then_resume(reference, setup):
    root, sets, _ = setup
    run = root / "killed"
    train_store = run / "data" / "train"
    # What a create killed before its store.json leaves: arrays but no store.json. `prompts` replaces it.
    half = create_store(root / "half", [{"type": "LR", "prompt_id": "x", "scene": "s", "initial_SR": "a",
                                         "final_SR": "b", "animal": "cat", "object": "box", "prompt": "p",
                                         "split": "train"}], samples_per_prompt=1, latent_shape=(4, 2, 2, 2),
                        num_frames=5, text_dim=8)
    (half.path / "store.json").unlink()
    train_store.parent.mkdir(parents=True)
    shutil.move(half.path, train_store)

    # -- a kill in the middle of `score` ------------------------------------------------------------
    log = root / "killed.log"
    proc = tiny_loop.start(sets(run), log=log)
    total = len(reference["labels"]["status"].ravel())
    try:
        _wait_for(lambda: _scored(train_store) > 0, "the first scored sample", proc)
        _kill(proc)
    finally:
        _kill(proc)
    scored = _scored(train_store)
    assert 0 < scored < total, f"the kill came too late ({scored} of {total} scored): {log.read_text()[-3000:]}"
    assert _done(run) == ["prompts", "encode", "sample"]
    # The samples are the reference run's (same seeds, same model): its labels are what scoring must give.
    np.testing.assert_array_equal(_latents(train_store), reference["latents"])

    out = _checked(tiny_loop.run(sets(run), "--until", "score"))
    skipped = sum(int(line.split("skipped ")[1].split()[0]) for line in out.stdout.splitlines()
                  if line.startswith("scored ") and "already scored" in line)
    assert skipped == scored, out.stdout[-3000:]  # what was scored before the kill is not scored again
    assert _done(run) == ["prompts", "encode", "sample", "score"]
    labels = _labels(train_store)
    for key, want in reference["labels"].items():
        np.testing.assert_array_equal(labels[key], want, err_msg=key)

    # -- a kill in the middle of `train` ------------------------------------------------------------
    tiny_loop.write_stand_in_labels(train_store)
    proc = tiny_loop.start(sets(run), "--until", "train", log=log)
    try:
        _wait_for(lambda: bool(_checkpoints(run)), "the first training checkpoint", proc)
        _kill(proc)
    finally:
        _kill(proc)
    saved = _checkpoints(run)
    assert saved and max(saved) < TRAIN_STEPS, f"the kill came too late: checkpoints {saved}"
    resume = max(saved)

    out = _checked(tiny_loop.run(sets(run), "--until", "train"))
    assert f"resumed {run / 'train'} from step {resume}" in out.stdout + out.stderr, out.stderr[-3000:]
    assert _done(run) == ["prompts", "encode", "sample", "score", "train"]
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, TRAIN_STEPS + 1))  # no gap, no step twice
    # The trainer resumes with the same pairs and noise: from the checkpoint on, the uninterrupted run's losses.
    want = {m["step"]: m["loss"] for m in _metrics(reference["run"])}
    np.testing.assert_allclose([m["loss"] for m in metrics[resume:]], [want[m["step"]] for m in metrics[resume:]],
                               rtol=1e-5)


def test_scorers_share_the_gpus_there_are(monkeypatch):
    """loop.scorers side by side get one GPU each, round robin over CUDA_VISIBLE_DEVICES or, without it,
    the GPUs JAX finds: more scorers than GPUs share them instead of being pointed at GPUs that do not
    exist (which left them on the CPU). Without a GPU, and for one scorer, the environment is left alone."""
    import jax

    class Device:
        def __init__(self, platform, i):
            self.platform, self.local_hardware_id = platform, i

    def pinned(n):
        return [cycle._scorer_env(i, n, gpus=True).get("CUDA_VISIBLE_DEVICES") for i in range(n)]

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(jax, "local_devices", lambda: [Device("gpu", 0), Device("gpu", 1)])
    assert pinned(4) == ["0", "1", "0", "1"]
    assert pinned(1) == [None]
    assert cycle._scorer_env(1, 2, gpus=False).get("CUDA_VISIBLE_DEVICES") is None  # the world: no GPU work
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")
    assert pinned(4) == ["3", "5", "7", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible: stays so
    assert pinned(2) == ["", ""]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(jax, "local_devices", lambda: [Device("cpu", 0)])
    assert pinned(2) == [None, None]
