"""`python run_train.py`'s synthetic-world cycle, short: every stage runs through the user's command
(shipped reference model and text encoder, JAX sampler, scoring subprocesses, trainer, export,
report) and the invariants hold; a rerun of the finished cycle skips every stage."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spatialalign_jax.common.store import Store
from spatialalign_jax.common.store_layout import Status
from spatialalign_jax.loop.cycle import ROUND_STAGES, STAGE_NAMES, WORLD_ASSETS
from spatialalign_jax.train.pairs import build_pair_table, usable_mask

REPO = Path(__file__).resolve().parent.parent
# A few prompts and steps, SPEC's pairing threshold.
TAU = 0.7
SHORT = ["loop.train_prompts=12", "loop.test_prompts=6", "loop.samples_per_prompt=8", "loop.test_seeds=[0,1]",
         "loop.sample_steps=12", "train.steps=4", "train.per_device_batch=2", "optim.warmup_steps=1",
         "optim.total_steps=5", "train.checkpoint_every=2", "train.log_every=1", f"data.tau={TAU}"]


def _hash_tree(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    return h.hexdigest()


def _run(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    sets = [a for kv in SHORT + [f"run.dir={run_dir}"] for a in ("--set", kv)]
    return subprocess.run([sys.executable, "run_train.py", "--no-progress", *sets, *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_world_cycle_end_to_end_and_resumed(tmp_path):
    reference_before = _hash_tree(WORLD_ASSETS / "reference")
    run = tmp_path / "run"
    r = _run(run)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    done = json.loads((run / "stages.json").read_text())["done"]
    assert list(done) == list(STAGE_NAMES)

    # summary.json: exactly the interface's keys, sane values
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert set(summary) == {"reference", "finetuned"}
    for model in summary.values():
        assert set(model) == {"correctness", "valid_rate"}
        curve = model["correctness"]
        assert list(curve) == [f"{t / 10:.1f}" for t in range(10)]
        values = list(curve.values())
        assert all(0 <= v <= 1 for v in values) and values == sorted(values, reverse=True)
        assert 0 <= model["valid_rate"] <= 1 and curve["0.0"] == pytest.approx(model["valid_rate"])
    for name in ("report.md", "correctness.png", "samples.png", "results.json"):
        assert (run / "report" / name).is_file(), name
    assert "Correctness@0.7 by DSR type" in (run / "report" / "report.md").read_text()
    assert (run / "export" / "lora" / "pytorch_lora_weights.safetensors").is_file()

    # pairs by SPEC's rules: winner DSR >= tau, loser valid and below, both of the same prompt
    store = Store.open(run / "data" / "train")
    dsr, status = store.read_dsr(), store.read_status()
    assert not (status == Status.UNSCORED).any()
    table = build_pair_table(dsr, usable_mask(status, dsr, store.read_seeds(), store.read_text_lengths()), tau=TAU)
    assert len(table.prompts) > 0
    for p, pairs in zip(table.prompts, table.pairs):
        assert (dsr[p, pairs[:, 0]] >= TAU).all() and (dsr[p, pairs[:, 1]] < TAU).all()
        assert (status[p, pairs.ravel()] == Status.VALID).all()

    # the training curve is finite, the LoRA changed the outputs, the reference weights did not change
    metrics = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(np.isfinite(m["loss"]) for m in metrics)
    ref, ft = Store.open(run / "data" / "test_reference"), Store.open(run / "data" / "test_finetuned")
    np.testing.assert_array_equal(ref.read_seeds(), ft.read_seeds())
    diffs = [np.abs(ref.read_latents(p, s)[0] - ft.read_latents(p, s)[0]).max()
             for p in range(ref.num_prompts) for s in range(ref.samples_per_prompt)]
    assert min(diffs) > 0
    assert _hash_tree(WORLD_ASSETS / "reference") == reference_before

    # a rerun of the finished cycle resumes: every stage is skipped, nothing is rewritten
    r = _run(run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("skipped") == len(STAGE_NAMES)
    assert json.loads((run / "stages.json").read_text())["done"] == done
    status_view = subprocess.run([sys.executable, "run_train.py", "--status", "--set", f"run.dir={run}"], cwd=REPO,
                                 capture_output=True, text=True, timeout=300)
    assert status_view.returncode == 0 and status_view.stdout.count("done") == len(STAGE_NAMES)

    # --rounds 2 continues the finished run with a second, on-policy round
    r = _run(run, "--rounds", "2")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rounds_done = json.loads((run / "stages.json").read_text())["done"]
    assert list(rounds_done) == list(STAGE_NAMES) + ["merge@2"] + [f"{s}@2" for s in ROUND_STAGES]
    assert {k: rounds_done[k] for k in done} == done  # round 1 untouched
    # round 2 starts from round 1's fine-tuned model: its base is the merge, and it samples like base + LoRA
    from converters.load import load_transformer
    from spatialalign_jax.model.lora import BASE, flat_params

    merged = load_transformer(run / "round2" / "base", lora=None)
    reference = load_transformer(WORLD_ASSETS / "reference", lora=None)
    changed = [k for k, v in flat_params(merged, BASE).items()
               if not np.array_equal(np.asarray(v), np.asarray(flat_params(reference, BASE)[k]))]
    assert changed and all(k.endswith(".kernel") and ("attn2.to_" in k or "text_embedder" in k) for k in changed)
    train2 = Store.open(run / "round2" / "data" / "train")
    assert [row["prompt_id"] for row in train2.prompts] == [row["prompt_id"] for row in store.prompts]
    np.testing.assert_array_equal(train2.read_text_lengths(), store.read_text_lengths())
    assert not np.isin(train2.read_seeds(), store.read_seeds()).any()  # fresh noise for the new round
    assert not (train2.read_status() == Status.UNSCORED).any()
    metrics2 = [json.loads(line) for line in (run / "round2" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics2] == [1, 2, 3, 4]
    results = json.loads((run / "report" / "results.json").read_text())
    assert list(results) == ["reference", "round 1", "round 2"]
    summary2 = json.loads((run / "report" / "summary.json").read_text())
    assert summary2["reference"] == summary["reference"]
    assert summary2["finetuned"]["correctness"] == results["round 2"]["correctness"]
    assert results["round 1"]["correctness"] == summary["finetuned"]["correctness"]
    assert "## Rounds" in (run / "report" / "report.md").read_text()


@pytest.mark.slow
def test_world_pretrain_command_makes_loadable_assets(tmp_path):
    """The command that made the shipped assets, a few steps long: a text encoder, a reference model that
    load_transformer reads with the world's architecture, and its record."""
    out = tmp_path / "assets"
    r = subprocess.run([sys.executable, "-m", "spatialalign_jax.loop.world_pretrain", "--out", str(out), "--steps", "2",
                        "--batch", "2", "--save-every", "50"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    from converters.load import load_transformer
    from spatialalign_jax.model.config import WanConfig
    from spatialalign_jax.world.settings import MODEL_CONFIG

    model = load_transformer(out / "reference")
    assert model.config == WanConfig.from_diffusers(MODEL_CONFIG)
    record = json.loads((out / "pretrain.json").read_text())
    assert record["steps"] == 2 and np.isfinite(record["final_loss_mean_of_last_100"])
    # the text encoder is the shipped one: the same tokenizer and weights from the same seed
    shipped = WORLD_ASSETS / "text_encoder" / "model.safetensors"
    assert (out / "text_encoder" / "model.safetensors").read_bytes() == shipped.read_bytes()
