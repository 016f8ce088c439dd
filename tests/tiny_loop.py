"""The real-model loop (``run_train.py --config configs/wan2.1_t2v_1.3b.yaml --set loop.enabled=true``) on
tiny random models: every folder the loop reads (a diffusers Wan transformer, the Wan VAE, umT5 with its
tokenizer, Grounding DINO, SAM 2 video) saved with ``save_pretrained`` by the test builders, small prompt
CSVs, and the ``--set`` overrides that point the shipped config at them. Used by tests/test_loop_models.py
and benchmarks/bench_loop.py.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import tiny_scoring_models as tiny
from conv_tiny import tiny_transformer

REPO = Path(__file__).resolve().parent.parent
CONFIG = "configs/wan2.1_t2v_1.3b.yaml"
LATENT_SHAPE = (4, 6, 8, 8)  # the tiny VAE decodes it to 21 frames of 64 x 64: enough for a DSR-Score
TEXT_DIM = 32  # the tiny umT5's d_model, which the tiny transformer's text_dim matches
MAX_TEXT_LEN = 32

# Animals and objects the tiny tokenizers know (tiny_scoring_models.WORDS); one prompt per DSR type.
_PROMPTS = [
    ("LR", "cat", "chair", "In a park,", "on the left of", "to the right of", "runs"),
    ("RL", "dog", "box", "In a room,", "on the right of", "to the left of", "walks"),
    ("TL", "fox", "table", "In a park,", "on the top of", "to the left of", "jumps"),
    ("LT", "cat", "box", "In a room,", "on the left of", "to the top of", "jumps"),
    ("RT", "dog", "table", "In a park,", "on the right of", "to the top of", "jumps"),
    ("TR", "fox", "chair", "In a room,", "on the top of", "to the right of", "jumps"),
]


def _rows(split: str, picks: Sequence[int]) -> list[dict[str, str]]:
    rows = []
    for i in picks:
        kind, animal, obj, scene, initial, final, verb = _PROMPTS[i]
        rows.append({"type": kind, "prompt_id": f"{split}_{kind}_{i}", "scene": scene, "initial_SR": initial,
                     "final_SR": final, "animal": animal, "object": obj,
                     "prompt": f"{scene} a {animal} is {initial} a {obj}, then the {animal} {verb} {final} the {obj}."})
    return rows


def write_prompts(folder: Path, train: int = 4, test: int = 2) -> tuple[Path, Path]:
    """train.csv (the first ``train`` prompts) and test.csv (the last ``test``), in the published columns."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for split, picks in (("train", range(train)), ("test", range(len(_PROMPTS) - test, len(_PROMPTS)))):
        path = folder / f"{split}.csv"
        rows = _rows(split, picks)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        out.append(path)
    return out[0], out[1]


def build_models(root: Path) -> dict[str, Path]:
    """Saves every model folder the loop reads under ``root``; returns {name: folder}."""
    root.mkdir(parents=True, exist_ok=True)
    transformer = root / "transformer"
    # in = out channels (the sampler feeds the output back in), text_dim = the tiny umT5's width
    tiny_transformer(seed=0, in_channels=LATENT_SHAPE[0], out_channels=LATENT_SHAPE[0],
                     text_dim=TEXT_DIM).save_pretrained(transformer)
    return {
        "transformer": transformer,
        "umt5": tiny.umt5(root / "umt5"),
        "vae": tiny.wan_vae(root / "vae", z_dim=LATENT_SHAPE[0]),
        "detector": tiny.grounding_dino(root / "gdino"),
        "tracker": tiny.sam2_video(root / "sam2"),
    }


def overrides(run_dir: Path, models: dict[str, Path], train_csv: Path, test_csv: Path, *,
              samples_per_prompt: int = 3, test_seeds: Sequence[int] = (0, 1), scorers: int = 2,
              sample_steps: int = 2, train_steps: int = 6, checkpoint_every: int = 2) -> list[str]:
    """The ``key=value`` settings that point configs/wan2.1_t2v_1.3b.yaml's loop at the tiny models."""
    return [
        "loop.enabled=true", f"run.dir={run_dir}", "mesh=null",
        f"model.path={models['transformer']}", "model.dtype=float32", "model.param_dtype=float32",
        "model.remat=none",
        f"loop.train_csv={train_csv}", f"loop.test_csv={test_csv}",
        f"loop.samples_per_prompt={samples_per_prompt}", f"loop.test_seeds=[{','.join(map(str, test_seeds))}]",
        f"loop.latent_shape=[{','.join(map(str, LATENT_SHAPE))}]", f"loop.text_dim={TEXT_DIM}",
        f"data.max_text_len={MAX_TEXT_LEN}",
        f"loop.text_encoder={models['umt5']}", f"loop.vae={models['vae']}", f"loop.detector={models['detector']}",
        f"loop.tracker={models['tracker']}", f"loop.scorers={scorers}", f"loop.sample_steps={sample_steps}",
        f"train.steps={train_steps}", "train.grad_accum=1", "train.per_device_batch=1",
        f"train.checkpoint_every={checkpoint_every}", "train.keep_checkpoints=2",
        "optim.warmup_steps=1", f"optim.total_steps={train_steps + 2}",
    ]


def write_stand_in_labels(store_path: Path) -> None:
    """Labels written as `python -m scoring score` writes them (Store.write_score, status VALID), standing
    in for a reward model: Grounding DINO and SAM 2 with random weights recognise nothing, so every video
    is invalid and there would be no winner / loser pair to train on. Per prompt and every 3 samples: one
    winner (DSR >= 0.7) and two losers."""
    from spatialalign_jax.common.store import Store
    from spatialalign_jax.common.store_layout import Status

    store = Store.open(store_path, mode="r+")
    for p in range(store.num_prompts):
        for s in range(store.samples_per_prompt):
            store.write_score(p, s, status=Status.VALID, dsr=(0.9, 0.2, 0.5)[s % 3])


def command(sets: Sequence[str], *extra: str) -> list[str]:
    return [sys.executable, "run_train.py", "--config", CONFIG, "--no-progress",
            *[a for kv in sets for a in ("--set", kv)], *extra]


def environment() -> dict[str, str]:
    """One CPU device for JAX; one thread per scoring process (two of them share the cores)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "CUDA_VISIBLE_DEVICES")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def start(sets: Sequence[str], *extra: str, log: Path | None = None) -> subprocess.Popen:
    """The loop's command in its own process group (so a kill reaches the scorers it starts)."""
    out = open(log, "a") if log is not None else subprocess.PIPE
    return subprocess.Popen(command(sets, *extra), cwd=REPO, env=environment(), stdout=out,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run(sets: Sequence[str], *extra: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(command(sets, *extra), cwd=REPO, env=environment(), capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)
