"""``python -m spatialalign_jax.loop.world_pretrain``: make the synthetic world's reference model.

    python -m spatialalign_jax.loop.world_pretrain [--out spatialalign_jax/world/assets] [--steps 2000]
        [--batch 32] [--follow 0.25] [--seed 0] [--lr 1e-3] [--shift 1] [--init MODEL] [--save-every 250]

What ships in ``spatialalign_jax/world/assets`` and how it was made, in three steps:

1. ``text_encoder/``: the world's tiny umT5 and word-level tokenizer (``python -m scoring
   world-text-encoder``: random weights from a fixed seed, saved with ``save_pretrained``).
2. The text embeddings of all 1,920 world prompts, through the same ``python -m scoring
   encode-prompts`` the loop uses, into a scratch store.
3. ``reference/``: the project's Flax Wan transformer (``world.settings.MODEL_CONFIG``) trained from
   scratch with flow matching (``spatialalign_jax.train.pretrain``) on world videos whose motion
   follows the prompt only ``--follow`` of the time; otherwise the animal stays where it started.
   Which of the two a video does is read off its noise (``world.coupling``: the optimal-transport
   coupling), so the model learns to make that choice from the seed it samples. It is a mediocre
   base model at DSR, which is what SpatialAlign starts from. Saved as a converted
   checkpoint (``load_transformer`` reads it).

``assets/pretrain.json`` records the settings, the loss curve's tail and the time taken. The shipped
model was made by a chain of runs continued with ``--init`` (its ``history``); the last one was
``--init <the model before> --steps 1500 --lr 3e-4 --shift 3 --seed 5``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from spatialalign_jax.common.atomic import write_text_atomic
from spatialalign_jax.world import settings
from spatialalign_jax.world.prompts import all_rows
from spatialalign_jax.world.coupling import coupled_video
from spatialalign_jax.world.render import LATENT_SHAPE, NUM_FRAMES

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "world" / "assets"


def world_batches(rows: list[dict], text: np.ndarray, batch: int, follow: float,
                  seed: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Endless batches of (latents, text rows, noise): random prompts, each video following its prompt
    or staying put as its noise decides (``world.coupling``: ``follow`` of them follow)."""
    rng = np.random.default_rng(seed)
    while True:
        idx = rng.integers(len(rows), size=batch)
        videos = [coupled_video(rng, rows[i], follow) for i in idx]
        yield np.stack([v[0] for v in videos]), text[idx], np.stack([v[1] for v in videos])


def _run(argv: list[str]) -> None:
    subprocess.run([sys.executable, "-m", *argv], check=True)


def embed_world_prompts(text_encoder: Path, scratch: Path) -> np.ndarray:
    """(num prompts, max_text_len, text_dim) zero-padded umT5 rows of every world prompt."""
    from spatialalign_jax.common.store import Store, create_store
    from spatialalign_jax.sample.sampler import pad_text

    store_path = scratch / "prompts"
    create_store(store_path, all_rows(), samples_per_prompt=1, latent_shape=LATENT_SHAPE, num_frames=NUM_FRAMES,
                 text_dim=settings.TEXT_DIM, max_text_len=settings.MAX_TEXT_LEN)
    _run(["scoring", "encode-prompts", "--store", str(store_path), "--text-encoder", str(text_encoder),
          "--max-text-len", str(settings.MAX_TEXT_LEN), "--no-progress"])
    store = Store.open(store_path)
    return np.stack([pad_text(store.read_text_embedding(p), settings.MAX_TEXT_LEN) for p in range(store.num_prompts)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spatialalign_jax.loop.world_pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--steps", type=int, default=settings.PRETRAIN_STEPS)
    p.add_argument("--batch", type=int, default=settings.PRETRAIN_BATCH)
    p.add_argument("--lr", type=float, default=settings.PRETRAIN_LR)
    p.add_argument("--follow", type=float, default=settings.FOLLOW,
                   help="share of pretraining videos whose motion follows the prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shift", type=float, default=settings.PRETRAIN_SHIFT,
                   help="the schedule shift of the training sigmas (1: uniform; larger: more high-noise steps)")
    p.add_argument("--init", type=Path, help="continue from this reference checkpoint instead of a random init")
    p.add_argument("--save-every", type=int, default=250, help="save the model every N steps (a multiple of 50)")
    args = p.parse_args(argv)
    if not 0 <= args.follow <= 1:
        p.error(f"--follow must be in [0, 1], got {args.follow}")

    import jax
    from flax import nnx

    from spatialalign_jax.model.checkpoint import save_checkpoint
    from spatialalign_jax.model.config import WanConfig
    from spatialalign_jax.model.lora import flat_params
    from spatialalign_jax.model.transformer import WanTransformer3DModel
    from spatialalign_jax.train.pretrain import pretrain

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    encoder = args.out / "text_encoder"
    _run(["scoring", "world-text-encoder", "--out", str(encoder)])
    with tempfile.TemporaryDirectory() as scratch:
        text = embed_world_prompts(encoder, Path(scratch))
    rows = all_rows()
    cfg = WanConfig.from_diffusers(settings.MODEL_CONFIG)
    if args.init is not None:
        from converters.load import load_transformer

        model = load_transformer(args.init, scan_unroll=True, lora=None)
        if model.config != cfg:
            p.error(f"--init {args.init}: its architecture differs from the world's (world/settings.py MODEL_CONFIG)")
    else:
        model = WanTransformer3DModel(cfg, scan_unroll=True, rngs=nnx.Rngs(args.seed))

    def save(step: int) -> None:  # the model so far, atomically: a stopped run leaves its last save
        if step % args.save_every and step != args.steps:
            return
        base = {k: np.asarray(jax.device_get(v)) for k, v in flat_params(model).items()}
        save_checkpoint(args.out / "reference", cfg, base, overwrite=True,
                        extra_meta={"made_by": "python -m spatialalign_jax.loop.world_pretrain", "step": step,
                                    "init": str(args.init) if args.init else None})

    losses = pretrain(model, world_batches(rows, text, args.batch, args.follow, args.seed), steps=args.steps,
                      lr=args.lr, warmup=settings.PRETRAIN_WARMUP, shift=args.shift, seed=args.seed,
                      on_log=save)
    record = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "follow": args.follow, "seed": args.seed,
              "shift": args.shift, "init": str(args.init) if args.init else None, "final_loss_mean_of_last_100": float(np.mean(losses[-100:])),
              "seconds": round(time.perf_counter() - start, 1)}
    previous = args.out / "pretrain.json"
    if args.init is not None and previous.is_file():  # keep how the starting point was made
        record["init_record"] = json.loads(previous.read_text())
    write_text_atomic(previous, json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out / 'reference'} and {args.out / 'text_encoder'} in {record['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
