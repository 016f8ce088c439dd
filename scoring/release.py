"""``python -m scoring.release``: the published SpatialAlign training data (latents, text embeddings, rewards)
into a store that the trainer reads as it reads one this project sampled and scored.

    python -m scoring.release --src DIR --store STORE [--csv prompts.csv] [--metadata CSV] [--tensors DIR]
        [--split train]

The release's format (a metadata CSV of rewards, one ``{prompt_id}.tensors.pth`` of latents and text
embedding per prompt) and its checks: `scoring.release_format`.

What the store gets
===================

- Prompt table: the ``--csv`` rows of the metadata's ids when given; else the metadata's own SPEC
  columns; a column it lacks is read from its ``prompt`` text (`spatialalign_jax.common.prompt_parse`,
  the template of SPEC section 2). Every row gets ``--split`` (default train).
- Text: the context's rows up to its last non-zero row (the prompt's tokens), as SPEC section 6 stores
  them; bfloat16 when every file's context is bfloat16 (lossless), else float32.
- Latents: ``latents_data[i]`` as float32. Seeds: the release has none. A seed is the store's marker
  that a sample's latents are written (>= 0), so each sample gets a placeholder: ``k`` when the
  metadata's ``video`` names end in ``seed<k>.mp4`` (``calc_dsr_score.py``'s names), else its sample
  index. Either way it is not a seed this project's sampler reproduces the sample from.
- Scores: a reward in [0, 1] is the DSR-Score with status VALID; ``-100`` is status
  TOO_FEW_TRACKED_FRAMES with a NaN DSR. The release's -100 does not say which validity rule failed;
  in every case fewer than 20 frames with both boxes reached its DSR-Score (a video its detection
  rules rejected has none), which is that status's meaning. Boxes stay NaN (the release has none).
- ``samples_per_prompt`` is the largest N; a prompt with fewer samples leaves the rest empty (seed -1,
  unscored), which the trainer skips. ``num_frames`` is the VAE's ``4 (F - 1) + 1``.

Every file and row is checked before anything is written (`plan_release`). The store is created
complete and empty in one rename, with ``release_import.json`` (``"complete": false``); prompts are
then filled one by one (a prompt counts as done when all its seeds, statuses and its text length are
written, each the last write of its kind), and the flag turns true at the end. A rerun after a kill
skips the finished prompts; a rerun whose files or options differ from the first run's is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from spatialalign_jax.common.atomic import atomic_output, file_in_the_way, write_text_atomic
from spatialalign_jax.common.prompt_table import PromptTableError
from spatialalign_jax.common.store import SPLITS, Status, Store, StoreError, create_store, decoded_frames

from scoring.release_format import (INVALID_REWARD, METADATA_NAMES, Entry, Plan, ReleaseError, file_arrays,
                                    load_tensors_file, plan_release)

MARKER = "release_import.json"
INVALID_STATUS = Status.TOO_FEW_TRACKED_FRAMES

__all__ = ["MARKER", "INVALID_STATUS", "ReleaseError", "import_prompt", "import_release", "main", "plan_release",
           "summary"]


def _write_marker(path: Path, plan: Plan, complete: bool) -> None:
    write_text_atomic(path / MARKER, json.dumps({
        "tool": "scoring.release", "metadata": plan.source, "fingerprint": plan.fingerprint(),
        "complete": complete, "seeds": "placeholders (video names' seed<k>, else the sample index)",
        "invalid_status": INVALID_STATUS.name}, indent=1))


def _done(store: Store, plan: Plan) -> np.ndarray:
    seeds, status, text_len = store.read_seeds(), store.read_status(), store.read_text_lengths()
    return np.array([text_len[p] > 0 and (seeds[p, :len(e.rewards)] >= 0).all()
                     and (status[p, :len(e.rewards)] != Status.UNSCORED).all() for p, e in enumerate(plan.entries)])


def import_prompt(store: Store, p: int, entry: Entry) -> None:
    """Writes prompt ``p``: latents and seeds, text, then scores (each kind's commit marker last)."""
    lat, ctx = file_arrays(entry.path, load_tensors_file(entry.path))
    for s, seed in enumerate(entry.seeds):
        store.write_latents(p, s, lat[s].float().numpy(), seed)
    store.write_text_embedding(p, ctx[:entry.text_len].float().numpy())
    for s, r in enumerate(entry.rewards):
        if r == INVALID_REWARD:
            store.write_score(p, s, status=INVALID_STATUS)
        else:
            store.write_score(p, s, status=Status.VALID, dsr=r)


def import_release(src: str | Path, store_path: str | Path, *, csv_path: str | Path | None = None,
                   metadata: str | Path | None = None, tensors: str | Path | None = None, split: str = "train",
                   log: Callable[[str], None] = print) -> Store:
    """Checks the release, creates the store (or resumes a stopped import into it) and fills it."""
    plan = plan_release(src, csv_path=csv_path, metadata=metadata, tensors=tensors, split=split)
    store_path = Path(store_path)
    blocking = file_in_the_way(store_path)
    if blocking is not None:
        raise ReleaseError(f"--store {str(store_path)!r} must be a folder, but {str(blocking)!r} is a file")
    if store_path.exists():
        marker = store_path / MARKER
        if not marker.is_file():
            raise ReleaseError(f"--store {store_path} exists and is no import of scoring.release (no {MARKER}); "
                               "choose a new --store")
        info = json.loads(marker.read_text())
        if info.get("fingerprint") != plan.fingerprint():
            raise ReleaseError(f"--store {store_path} was imported from other files or options (metadata "
                               f"{info.get('metadata')}); delete it to import again, or choose a new --store")
        store = Store.open(store_path, mode="r+")
        if info.get("complete"):
            log(f"{store_path}: already imported completely; nothing to do")
            return store
        log(f"{store_path}: resuming a stopped import")
    else:
        with atomic_output(store_path) as tmp:
            create_store(tmp, [e.row for e in plan.entries], samples_per_prompt=plan.samples_per_prompt,
                         latent_shape=plan.latent_shape, num_frames=decoded_frames(plan.latent_shape[1]),
                         text_dim=plan.text_dim, max_text_len=plan.max_text_len, text_dtype=plan.text_dtype)
            _write_marker(tmp, plan, complete=False)
        store = Store.open(store_path, mode="r+")
    done = _done(store, plan)
    todo = [p for p in range(len(plan.entries)) if not done[p]]
    for k, p in enumerate(todo, start=1):
        import_prompt(store, p, plan.entries[p])
        if k % 50 == 0 or k == len(todo):
            log(f"imported {k}/{len(todo)} prompts" + (f" ({len(plan.entries) - len(todo)} were done)" if done.any()
                                                       else ""))
    _write_marker(store_path, plan, complete=True)
    log(summary(store))
    return store


def summary(store: Store, tau: float = 0.7) -> str:
    """Samples per status and the prompts that hold a DPO pair (a winner >= tau and a valid loser below)."""
    status, dsr = store.read_status(), store.read_dsr()
    valid = status == Status.VALID
    win, lose = (valid & (dsr >= tau)).any(1), (valid & (dsr < tau)).any(1)
    return (f"{store.path}: {store.num_prompts} prompts x {store.samples_per_prompt} samples; {int(valid.sum())} "
            f"valid ({int((valid & (dsr >= tau)).sum())} with DSR >= {tau}), {int((status == INVALID_STATUS).sum())} "
            f"invalid; {int((win & lose).sum())} prompts hold a winner/loser pair")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scoring.release", description=__doc__.split("\n\n")[0],
                                epilog="The release's format: scoring/release_format.py; what the store gets: "
                                       "scoring/release.py (their module docstrings).")
    p.add_argument("--src", required=True, help="the release folder (metadata CSV, tensors/ or the .tensors.pth files)")
    p.add_argument("--store", required=True, help="the store to create (or to resume a stopped import into)")
    p.add_argument("--csv", default=None, help="prompt CSV with the SPEC columns for the metadata's prompt ids")
    p.add_argument("--metadata", default=None, help=f"metadata CSV (default: {' or '.join(METADATA_NAMES)} in --src)")
    p.add_argument("--tensors", default=None, help="folder of the .tensors.pth files (default: --src/tensors or --src)")
    p.add_argument("--split", choices=SPLITS, default="train", help="split of every prompt (default train)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import_release(args.src, args.store, csv_path=args.csv, metadata=args.metadata, tensors=args.tensors,
                       split=args.split)
    except (ReleaseError, PromptTableError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
