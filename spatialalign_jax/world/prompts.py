"""World prompts in the SPEC template, and the split that keeps test prompts unseen in training.

The world has 4 scenes x 4 animals x 4 objects x 6 types x 5 verbs = 1,920 prompts. The held-out
test set is defined by (animal, object, type) *triples*: ``TEST_TRIPLES_PER_TYPE`` triples of every
type are test-only, so no DPO training prompt shares a test prompt's text nor its triple (the base
model's pretraining sees the whole world, as a real base model has seen the web).
"""

from __future__ import annotations

import itertools

import numpy as np

from spatialalign_jax.common.dsr_types import DSR_TYPES, dsr_prompt
from spatialalign_jax.world.vocab import ANIMALS, OBJECTS, SCENES, VERBS

TEST_TRIPLES_PER_TYPE = 4
SPLIT_SEED = 2026  # fixes which triples are held out; the shipped reference model does not depend on it


def prompt_row(scene: str, animal: str, obj: str, dsr_type: str, verb: str, prompt_id: str,
               split: str) -> dict[str, str]:
    t = DSR_TYPES[dsr_type]
    return {"type": dsr_type, "prompt_id": prompt_id, "scene": scene, "initial_SR": t.initial_phrase,
            "final_SR": t.final_phrase, "animal": animal, "object": obj,
            "prompt": dsr_prompt(scene, animal, obj, dsr_type, verb), "split": split}


def all_rows() -> list[dict[str, str]]:
    """Every prompt of the world, in a fixed order (split 'train': pretraining sees them all)."""
    combos = itertools.product(SCENES, ANIMALS, OBJECTS, DSR_TYPES, VERBS)
    return [prompt_row(s, a, o, t, v, f"world{i:04d}_{t}", "train") for i, (s, a, o, t, v) in enumerate(combos)]


def held_out_triples() -> set[tuple[str, str, str]]:
    """The held-out (animal, object, type) triples: ``TEST_TRIPLES_PER_TYPE`` of each type, spread so
    that every animal and every object is held out with every type it can be."""
    rng = np.random.default_rng(SPLIT_SEED)
    pairs = list(itertools.product(ANIMALS, OBJECTS))
    held = set()
    for k, t in enumerate(DSR_TYPES):
        # a Latin-square-like walk over the 16 (animal, object) pairs, then a shuffle within it
        offset = int(rng.integers(len(pairs)))
        chosen = [pairs[(offset + 5 * j + k) % len(pairs)] for j in range(TEST_TRIPLES_PER_TYPE)]
        held.update((a, o, t) for a, o in chosen)
    return held


def split_rows(num_train: int, num_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``num_train`` DPO training prompts from the train triples and ``num_test`` test prompts from
    the held-out ones, each balanced over the six types, scenes and verbs drawn with ``seed``."""
    if num_train % len(DSR_TYPES) or num_test % len(DSR_TYPES):
        raise ValueError(f"prompt counts must be multiples of {len(DSR_TYPES)} (one share per DSR type), "
                         f"got {num_train} train and {num_test} test")
    rng = np.random.default_rng(seed)
    held = held_out_triples()
    out = {}
    for split, count in (("train", num_train), ("test", num_test)):
        rows = []
        for t in DSR_TYPES:
            triples = sorted((a, o) for a, o in itertools.product(ANIMALS, OBJECTS) if ((a, o, t) in held) == (split == "test"))
            picks = [triples[i] for i in rng.permutation(len(triples))]
            for j in range(count // len(DSR_TYPES)):
                a, o = picks[j % len(picks)]
                scene = list(SCENES)[rng.integers(len(SCENES))]
                verb = VERBS[rng.integers(len(VERBS))]
                rows.append(prompt_row(scene, a, o, t, verb, f"{split}{len(rows):03d}_{t}", split))
        out[split] = rows
    return out["train"], out["test"]
