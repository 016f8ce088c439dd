"""``python -m spatialalign_jax.sample``: sample the reference model into a store's latents.

    python -m spatialalign_jax.sample --model MODEL --store STORE [--steps 50] [--guidance 5.0]
        [--solver unipc|euler] [--noise jax|torch] [--shift 5.0] [--samples-per-prompt K | --seeds 0,1,2,3,4]
        [--base-seed 0] [--split train|test] [--shard i/n] [--mesh data=D,fsdp=F] [--batch N]
        [--dtype bfloat16|float32] [--use-lora]

For every prompt of this shard and every sample slot still without latents (``seed == -1``), the
sampler (``spatialalign_jax.sample.sampler``) turns the prompt's stored text embedding, zero-padded to
the store's ``max_text_len``, into latents, with the stored negative-prompt embedding for CFG, and
``Store.write_latents`` stores them with their seed (written last: the commit marker). A rerun
skips finished samples, so an interrupted run resumes where it stopped. The first run records its
sampler settings (noise, steps, guidance, shift, solver) in the store's ``sampling.json``; a later
run with other settings is refused.

Seeds (the initial noise is a function of the seed alone, see ``sampler.initial_noise``; with
``--noise torch`` it is the noise diffusers' ``WanPipeline`` starts from for that seed, so a sample
can be reproduced in PyTorch):

- ``test`` prompts: slot s gets seed s (SPEC section 2: seeds 0-4).
- ``train`` prompts: ``derived_seed(base_seed, prompt_id, s)``, random-looking and reproducible.
- ``--seeds a,b,c`` gives slots 0, 1, 2 those seeds for every prompt (and samples only them).

``--shard i/n`` samples the prompts with ``index % n == i`` (as ``python -m scoring score``):
n processes, one per GPU or host, write disjoint prompts at once. ``--mesh`` splits each batch over
this process's devices and FSDP-shards the model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from spatialalign_jax.common.atomic import write_text_atomic
from spatialalign_jax.common.store import SPLITS, Store, StoreError, shard_arg
from spatialalign_jax.model.attention import IMPLEMENTATIONS

from . import schedule
from .sampler import (DEFAULT_GUIDANCE, DEFAULT_SOLVER, DEFAULT_STEPS, MAX_SEED, NOISE_SOURCES, SOLVERS, check_seeds,
                      pad_text, sample)

log = logging.getLogger("spatialalign_jax.sample")

ENCODE_HINT = "python -m scoring encode-prompts --store {store} --text-encoder UMT5_DIR"


class SampleError(ValueError):
    """A store or model that cannot be sampled as asked; the message names the fix."""


def derived_seed(base_seed: int, prompt_id: str, sample: int) -> int:
    """A train sample's seed in [0, 2**31): a hash of (base seed, prompt id, slot), stable across runs."""
    digest = hashlib.sha256(f"{int(base_seed)}/{prompt_id}/{int(sample)}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & MAX_SEED


def seed_for(prompt: Mapping[str, Any], sample: int, base_seed: int = 0) -> int:
    """Slot ``sample``'s seed: ``sample`` for a test prompt, ``derived_seed`` for a train prompt."""
    if prompt.get("split") == "test":
        return int(sample)
    return derived_seed(base_seed, prompt["prompt_id"], sample)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be comma-separated integers like 0,1,2,3,4, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds is empty")
    return seeds


@dataclass
class SampleSummary:
    written: int = 0
    skipped_done: int = 0  # slots that already had latents
    prompts: int = 0  # prompts of this shard (and split)
    seconds: float = 0.0

    def line(self) -> str:
        rate = f", {self.seconds / self.written:.1f} s/sample" if self.written else ""
        return (f"sampled {self.written} latents over {self.prompts} prompts (skipped {self.skipped_done} already "
                f"sampled) in {self.seconds:.1f} s{rate}")


def plan_work(store: Store, *, slots: int | None = None, seeds: Sequence[int] | None = None, base_seed: int = 0,
              shard: tuple[int, int] = (0, 1), split: str | None = None) -> tuple[list[tuple[int, int, int]], SampleSummary]:
    """The (prompt, slot, seed) items still to sample in this shard, and the counts of what is done."""
    S = store.samples_per_prompt
    if seeds is not None and slots is not None:
        raise SampleError("give either --seeds or --samples-per-prompt, not both")
    if seeds is not None:
        if len(seeds) > S:
            raise SampleError(f"{len(seeds)} seeds given but store {store.path} has {S} sample slots per prompt")
        try:
            check_seeds(seeds)
        except ValueError as e:
            raise SampleError(f"--seeds: {e}") from None
    n_slots = len(seeds) if seeds is not None else S if slots is None else int(slots)
    if not 1 <= n_slots <= S:
        raise SampleError(f"--samples-per-prompt {n_slots}: store {store.path} has {S} sample slots per prompt")
    if split is not None and split not in SPLITS:
        raise SampleError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    splits = {row.get("split") for row in store.prompts}
    if split is not None and split not in splits:
        raise SampleError(f"--split {split!r}: store {store.path} has no prompt of that split (its prompts are "
                          f"in {sorted(map(str, splits))}); pass one of those")
    i, n = shard
    done = store.read_seeds()
    summary = SampleSummary()
    todo = []
    for p, row in enumerate(store.prompts):
        if p % n != i or (split is not None and row.get("split") != split):
            continue
        summary.prompts += 1
        for s in range(n_slots):
            if done[p, s] >= 0:
                summary.skipped_done += 1
            else:
                seed = int(seeds[s]) if seeds is not None else seed_for(row, s, base_seed)
                todo.append((p, s, seed))
    return todo, summary


def _check_shift(shift: float) -> None:
    if not shift > 0:  # the sigma grid collapses to 0 (or NaN) and every step divides by it
        raise SampleError(f"--shift must be > 0, got {shift} (the default is {schedule.SHIFT})")


def check_store_for_model(store: Store, model: Any, todo: Sequence[tuple[int, int, int]], guidance: float) -> None:
    """Refuses, before any sampling, a store the model cannot fill: shapes, text dims, missing embeddings."""
    store.check_model(model.config)
    lengths = store.read_text_lengths()
    missing = sorted({p for p, _, _ in todo if lengths[p] == 0})
    if missing:
        ids = [store.prompts[p]["prompt_id"] for p in missing[:5]]
        raise SampleError(f"store {store.path}: {len(missing)} prompt(s) to sample have no text embedding yet "
                          f"(e.g. {ids}); run `{ENCODE_HINT.format(store=store.path)}` first")
    if guidance > 1.0 and store.read_negative_text_embedding().shape[0] == 0:
        raise SampleError(f"store {store.path} has no negative-prompt embedding, which guidance {guidance} needs; run "
                          f"`{ENCODE_HINT.format(store=store.path)}` first (or sample with --guidance 1)")


# What makes a store's samples comparable, kept beside them by the first sampling run: a later run
# (a resume, another shard) with other settings would mix two distributions under the same seeds.
SETTINGS_FILE = "sampling.json"


def record_settings(store: Store, settings: Mapping[str, Any]) -> None:
    """Writes ``settings`` to the store's ``sampling.json``, or refuses ones that differ from it."""
    path = Path(store.path) / SETTINGS_FILE
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SampleError(f"{path} is not valid JSON ({e}); delete it to record this run's settings") from None
        differ = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if differ:
            raise SampleError(
                f"store {store.path} was sampled with other settings: "
                + ", ".join(f"{k} {old!r} there, {new!r} now" for k, (old, new) in differ.items())
                + f". Sample it with the same ones, or delete {path} to mix them knowingly."
            )
        return
    write_text_atomic(path, json.dumps(dict(settings), indent=1) + "\n")


def sample_store(store: Store, model: Any, *, slots: int | None = None, seeds: Sequence[int] | None = None,
                 base_seed: int = 0, shard: tuple[int, int] = (0, 1), split: str | None = None, batch_size: int = 1,
                 num_steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, shift: float = schedule.SHIFT,
                 solver: str = DEFAULT_SOLVER, noise: str = "jax",
                 use_lora: bool = False, mesh: Any = None, progress: bool = True) -> SampleSummary:
    """Fills this shard's unsampled slots of ``store`` (opened "r+") with the model's latents; resumable."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise SampleError(f"--batch must be >= 1, got {batch_size}")
    if noise not in NOISE_SOURCES:
        raise SampleError(f"--noise {noise!r}: choose one of {NOISE_SOURCES}")
    _check_shift(shift)
    if mesh is not None and batch_size % mesh.size:
        raise SampleError(f"--batch {batch_size} cannot be split over the mesh's {mesh.size} devices "
                          f"({dict(mesh.shape)}): use a multiple of {mesh.size}")
    if use_lora and not getattr(model, "lora_paths", ()):
        raise SampleError("--use-lora: the model carries no LoRA adapters (convert one in with "
                          "`python -m converters.to_flax --src BASE --lora LORA --dst DST`)")
    todo, summary = plan_work(store, slots=slots, seeds=seeds, base_seed=base_seed, shard=shard, split=split)
    check_store_for_model(store, model, todo, guidance)
    if not todo:
        return summary
    record_settings(store, {"noise": noise, "num_steps": int(num_steps), "guidance": float(guidance),
                            "shift": float(shift), "solver": solver})
    L = store.max_text_len
    neg = pad_text(store.read_negative_text_embedding(), L) if guidance > 1.0 else None
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc="sample", unit="sample", disable=not progress)
    for lo in range(0, len(todo), batch_size):
        items = todo[lo:lo + batch_size]
        # A short last batch repeats its last item, so every batch has one compiled shape.
        padded = items + [items[-1]] * (batch_size - len(items))
        rows = {p: pad_text(store.read_text_embedding(p), L) for p in dict.fromkeys(p for p, _, _ in padded)}
        text = np.stack([rows[p] for p, _, _ in padded])
        latents = np.asarray(sample(model, text, neg, seeds=[seed for _, _, seed in padded],
                                    latent_shape=store.latent_shape, num_steps=num_steps, guidance=guidance,
                                    shift=shift, solver=solver, use_lora=use_lora, mesh=mesh, noise=noise))
        if not np.isfinite(latents[: len(items)]).all():
            bad = [(store.prompts[p]["prompt_id"], s) for (p, s, _), x in zip(items, latents) if not np.isfinite(x).all()]
            raise FloatingPointError(f"non-finite latents for (prompt_id, slot) {bad[:5]}; nothing of this batch was "
                                     "written (check the model weights and --dtype)")
        for (p, s, seed), x in zip(items, latents):
            store.write_latents(p, s, x, seed)
        summary.written += len(items)
        bar.update(len(items))
    bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m spatialalign_jax.sample", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="diffusers transformer folder, original Wan checkpoint or converted checkpoint")
    ap.add_argument("--store", required=True, help="the store (python -m scoring create-store / encode-prompts)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--samples-per-prompt", type=int, default=None,
                       help="sample slots 0..K-1 of each prompt (default: all of the store's slots)")
    which.add_argument("--seeds", type=parse_seeds, default=None,
                       help="explicit seeds for slots 0, 1, ... of every prompt, e.g. 0,1,2,3,4")
    ap.add_argument("--base-seed", type=int, default=0, help="base of the train prompts' derived seeds (default 0)")
    ap.add_argument("--split", choices=SPLITS, default=None, help="only the prompts of this split (default: all)")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="CFG scale; <= 1 turns CFG off")
    ap.add_argument("--shift", type=float, default=schedule.SHIFT, help="flow shift of the sampling schedule")
    ap.add_argument("--solver", choices=SOLVERS, default=DEFAULT_SOLVER)
    ap.add_argument("--noise", choices=NOISE_SOURCES, default="jax",
                    help="initial noise per seed: JAX's generator (default), or torch's as diffusers' WanPipeline "
                         "draws it with generator=torch.Generator().manual_seed(seed)")
    ap.add_argument("--shard", type=shard_arg, default=(0, 1), help="i/n: the prompts with index %% n == i")
    ap.add_argument("--mesh", default=None, help="data=D,fsdp=F over this process's devices (default: one device)")
    ap.add_argument("--batch", type=int, default=1, help="samples per sampler call (a multiple of the mesh size)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="compute dtype")
    ap.add_argument("--param-dtype", default=None, choices=("bfloat16", "float32"), help="weights (default: --dtype)")
    ap.add_argument("--attention", default="auto", choices=IMPLEMENTATIONS,
                    help="attention implementation of the model (default auto)")
    ap.add_argument("--use-lora", action="store_true", help="sample with the LoRA the checkpoint carries")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if not Path(args.model).exists():
            raise SampleError(f"--model {args.model!r} does not exist (give a diffusers transformer folder or a "
                              "checkpoint converted with `python -m converters.to_flax`)")
        if args.steps < 1 or args.batch < 1:
            raise SampleError(f"--steps ({args.steps}) and --batch ({args.batch}) must be >= 1")
        _check_shift(args.shift)  # before the model load
        if not math.isfinite(args.guidance):
            raise SampleError(f"--guidance must be a finite number, got {args.guidance}")
        store = Store.open(args.store, mode="r+")
        # Validate the cheap things before the expensive model load.
        todo, _ = plan_work(store, slots=args.samples_per_prompt, seeds=args.seeds, base_seed=args.base_seed,
                            shard=args.shard, split=args.split)
        if not todo:
            print(f"nothing to sample in {args.store} (shard {args.shard[0]}/{args.shard[1]}): every slot has latents")
            return 0

        from converters.load import load_transformer
        from spatialalign_jax.model.sharding import make_mesh

        try:
            mesh = make_mesh(args.mesh) if args.mesh else None
        except ValueError as e:
            raise SampleError(f"--mesh {args.mesh!r}: {e}") from None
        try:
            model = load_transformer(args.model, mesh=mesh, dtype=args.dtype, param_dtype=args.param_dtype,
                                     attention=args.attention, lora="checkpoint" if args.use_lora else None)
        except ValueError as e:
            raise SampleError(f"--model {args.model!r} cannot be loaded: {e}") from None
        summary = sample_store(store, model, slots=args.samples_per_prompt, seeds=args.seeds, base_seed=args.base_seed,
                               shard=args.shard, split=args.split, batch_size=args.batch, num_steps=args.steps,
                               guidance=args.guidance, shift=args.shift, solver=args.solver, noise=args.noise,
                               use_lora=args.use_lora,
                               mesh=mesh, progress=not args.no_progress)
    except (SampleError, StoreError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
