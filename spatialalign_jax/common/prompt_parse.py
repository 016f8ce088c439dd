"""A DSR prompt read back into its parts: the inverse of `dsr_types.dsr_prompt` (SPEC section 2's template)

    {scene}, a {animal} is {initial} a {object}, then the {animal} {verb} {final} the {object}.

with the initial and final phrases of the six types from `dsr_types.DSR_TYPES`. The dataset generator
uses it to rephrase published prompts, the release importer (`scoring.release`) to recover a prompt's
columns from its text. Standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .dsr_types import DSR_TYPES


@dataclass(frozen=True)
class PromptParts:
    """The template's fields of one prompt."""

    scene: str
    animal: str
    object: str
    dsr_type: str
    verb: str


_TYPE_BY_PHRASES = {(t.initial_phrase, t.final_phrase): t.name for t in DSR_TYPES.values()}


def _alternatives(phrases: set[str]) -> str:
    return "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))


_TEMPLATE = re.compile(
    r"(?P<scene>.+), an? (?P<animal>[^,]+?) is "
    rf"(?P<initial>{_alternatives({t.initial_phrase for t in DSR_TYPES.values()})}) an? (?P<object>[^,]+?), "
    r"then the (?P=animal) (?P<verb>[^,]+?) "
    rf"(?P<final>{_alternatives({t.final_phrase for t in DSR_TYPES.values()})}) the (?P=object)\.",
    re.DOTALL,
)


def parse_dsr_prompt(text: str) -> PromptParts | None:
    """The fields of a prompt written in the SPEC template (``a`` or ``an``), or None when ``text`` is not
    in it (another sentence, or an initial/final pair that is none of the six types)."""
    m = _TEMPLATE.fullmatch(" ".join(text.split()))
    if m is None:
        return None
    dsr_type = _TYPE_BY_PHRASES.get((m["initial"], m["final"]))
    if dsr_type is None:
        return None
    return PromptParts(scene=m["scene"], animal=m["animal"], object=m["object"], dsr_type=dsr_type, verb=m["verb"])
