"""The synthetic world's vocabulary: animals, objects, scenes and verbs, and how each looks.

Every entity is a flat-coloured sprite; animals are told apart from each other (and objects from
objects) by colour *and* shape, so a model has to render both, while the colour detector only
needs the colour. Scenes are flat background colours, dark enough that every sprite colour stands
well apart from every background. Edit the tables to change the world; the pretrained reference
model that ships in ``assets/`` was trained on these exact tables, so a change means pretraining
again (README: "The synthetic world").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sprite:
    name: str
    colour: tuple[int, int, int]
    shape: tuple[str, ...]  # rows of '#' (ink) and '.' (transparent)

    @property
    def mask(self) -> np.ndarray:
        return np.array([[c == "#" for c in row] for row in self.shape], dtype=bool)


ANIMALS: dict[str, Sprite] = {s.name: s for s in (
    Sprite("fox", (255, 128, 0), (".#.", "###", "###")),
    Sprite("frog", (70, 230, 70), ("#.#", "###", "#.#")),
    Sprite("cat", (235, 70, 235), ("#.#", "###", ".#.")),
    Sprite("rabbit", (245, 245, 245), ("#.#", "#.#", "###")),
)}

OBJECTS: dict[str, Sprite] = {s.name: s for s in (
    Sprite("stump", (225, 40, 40), ("####", "####", "####", ".##.")),
    Sprite("chair", (60, 100, 255), ("#...", "####", "#..#", "#..#")),
    Sprite("barrel", (245, 220, 40), (".##.", "####", "####", ".##.")),
    Sprite("rock", (40, 215, 225), (".##.", "####", "####", "####")),
)}

# Scene phrase (as the prompt's first clause) -> background colour.
SCENES: dict[str, tuple[int, int, int]] = {
    "In a dark forest": (20, 48, 22),
    "On a moonlit night": (16, 18, 52),
    "In a dim cave": (46, 42, 40),
    "On a dusty plain": (64, 40, 22),
}

VERBS = ("runs", "walks", "jumps", "hops", "moves")

ENTITIES: dict[str, Sprite] = {**ANIMALS, **OBJECTS}


def words() -> list[str]:
    """Every word a world prompt can hold, as written (case kept), for the tokenizer; the
    punctuation marks "," and "." are not words."""
    from spatialalign_jax.common.dsr_types import DSR_TYPES

    text = " ".join([*SCENES, *ANIMALS, *OBJECTS, *VERBS, "a is then the"]
                    + [t.initial_phrase + " " + t.final_phrase for t in DSR_TYPES.values()])
    return sorted(set(text.replace(",", " ").replace(".", " ").split()))
