"""The six DSR types (SPEC section 2): the one table of type names, their initial -> final static
spatial relations and the phrases prompts use for them.

Pure data, in the bottom layer: the scorer (`scoring.dsr`, `scoring.prompts`, `scoring.metrics`) and the
trainer's synthetic stores (`spatialalign_jax.train.pairs`) read the same table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DsrType:
    """A DSR type: the animal moves from the initial to the final static spatial relation."""

    name: str
    initial: str  # relation code: "L", "R" or "T"
    final: str
    initial_phrase: str  # as written in prompts, e.g. "on the left of"
    final_phrase: str


# SPEC section 2, table of the six types: the single source of truth for type names and phrases.
DSR_TYPES: dict[str, DsrType] = {
    t.name: t
    for t in (
        DsrType("LR", "L", "R", "on the left of", "to the right of"),
        DsrType("RL", "R", "L", "on the right of", "to the left of"),
        DsrType("LT", "L", "T", "on the left of", "to the top of"),
        DsrType("TL", "T", "L", "on the top of", "to the left of"),
        DsrType("RT", "R", "T", "on the right of", "to the top of"),
        DsrType("TR", "T", "R", "on the top of", "to the right of"),
    )
}
RELATIONS = ("L", "R", "T")


def get_dsr_type(name: str) -> DsrType:
    try:
        return DSR_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown DSR type {name!r}; the types are {sorted(DSR_TYPES)}") from None


def dsr_prompt(scene: str, animal: str, obj: str, dsr_type: str, verb: str) -> str:
    """The SPEC section 2 template: ``{scene}, a {animal} is {initial} a {object}, then the {animal}
    {verb} {final} the {object}.``"""
    t = get_dsr_type(dsr_type)
    return (f"{scene}, a {animal} is {t.initial_phrase} a {obj}, then the {animal} {verb} {t.final_phrase} "
            f"the {obj}.")
