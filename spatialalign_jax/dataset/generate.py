"""Train and test prompt tables drawn from a vocabulary (SPEC section 2), and the "from ... to ..." variant.

`generate` draws, for each of the six DSR types, its share of the prompts from every (animal, verb,
object, scene) combination of the vocabulary (the animal's own verbs only), without replacement and
seeded:

- Shares: ``n`` prompts give each type ``n // 6``; the remaining ``n % 6`` go one each to the first
  types in the SPEC table's order (LR, RL, LT, TL, RT, TR), so 500 is 84, 84, 83, 83, 83, 83.
- Weights: each combination is weighted ``1 / (its animal's verb count)``, so every animal (and every
  object and scene) is drawn about equally often; a long verb list only varies the wording.
- Disjointness: a type's train and test prompts are one draw without replacement, so no prompt text
  is in both. A published test set (``test_rows``) is used as given and its prompt texts (compared
  case- and space-insensitively) are left out of the train draw; with ``disjoint_triples`` so is every
  (animal, object, type) triple of a test prompt, for generated and published test sets alike.
- Order and ids: rows are shuffled over types (same seed); ids are ``train0000_LR``, ``test0007_TL``...
  (``{group}_{type}`` as the published ids), so train and test ids never collide.

The same vocabulary, counts and seed give the same rows on every machine (numpy's ``Generator``).
`rephrase_from_to` turns a row into the generalisation variant of the paper's section 5 (SPEC section
2): "a fox sprints from the left of a chair to the right of the chair"; only ``prompt`` changes.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from spatialalign_jax.common.dsr_types import DSR_TYPES, dsr_prompt, get_dsr_type
from spatialalign_jax.common.prompt_parse import parse_dsr_prompt

from .vocabulary import Vocabulary

COLUMNS = ("group", "type", "prompt_id", "scene", "initial_SR", "final_SR", "animal", "object", "prompt", "split")
VARIANTS = ("from_to",)
DEFAULT_TRAIN = 500
DEFAULT_TEST = 120


class DatasetError(ValueError):
    """Prompt counts the vocabulary cannot meet, or a test table the generator cannot use."""


def type_counts(n: int) -> dict[str, int]:
    """Prompts per type for ``n`` prompts: ``n // 6`` each, one more for the first ``n % 6`` types in the
    SPEC table's order."""
    if n < 0:
        raise DatasetError(f"a prompt count must be >= 0, got {n}")
    base, extra = divmod(n, len(DSR_TYPES))
    return {t: base + (i < extra) for i, t in enumerate(DSR_TYPES)}


def normalise(text: str) -> str:
    """A prompt's text as compared for disjointness: spaces collapsed, case folded."""
    return " ".join(text.split()).casefold()


def from_to_prompt(scene: str, animal: str, obj: str, dsr_type: str, verb: str) -> str:
    """The variant sentence: ``{scene}, a {animal} {verb} from the left of a {object} to the right of the
    {object}.`` (the initial phrase's "on" becomes "from", the final phrase is kept)."""
    t = get_dsr_type(dsr_type)
    origin = "from " + t.initial_phrase.removeprefix("on ")
    return f"{scene}, a {animal} {verb} {origin} a {obj} {t.final_phrase} the {obj}."


def rephrase_from_to(row: Mapping[str, str]) -> dict[str, str]:
    """``row`` with its prompt in the from/to variant; the prompt must be in the SPEC template and name
    the row's animal, object and type."""
    parts = parse_dsr_prompt(row["prompt"])
    pid = row.get("prompt_id", "?")
    if parts is None:
        raise DatasetError(f"prompt {pid} is not in the SPEC template ('{{scene}}, a {{animal}} is {{initial}} a "
                           f"{{object}}, then the {{animal}} {{verb}} {{final}} the {{object}}.'), so it cannot be "
                           f"rephrased: {row['prompt']!r}")
    found = (parts.animal, parts.object, parts.dsr_type)
    if found != (row["animal"], row["object"], row["type"]):
        raise DatasetError(f"prompt {pid}: its text names (animal, object, type) {found}, its columns "
                           f"{(row['animal'], row['object'], row['type'])}; fix the row before rephrasing it")
    out = dict(row)
    out["prompt"] = from_to_prompt(parts.scene, parts.animal, parts.object, parts.dsr_type, parts.verb)
    return out


def _row(scene: str, animal: str, obj: str, dsr_type: str, verb: str, split: str) -> dict[str, str]:
    t = DSR_TYPES[dsr_type]
    return {"group": "", "type": dsr_type, "prompt_id": "", "scene": scene, "initial_SR": t.initial_phrase,
            "final_SR": t.final_phrase, "animal": animal, "object": obj,
            "prompt": dsr_prompt(scene, animal, obj, dsr_type, verb), "split": split}


def _combinations(vocab: Vocabulary) -> tuple[list[tuple[str, str, str, str]], np.ndarray]:
    """Every (animal, verb, object, scene) in file order, and its weight 1 / (the animal's verb count)."""
    combos, weights = [], []
    for animal, verbs in vocab.animals.items():
        for verb in verbs:
            for obj in vocab.objects:
                for scene in vocab.scenes:
                    combos.append((animal, verb, obj, scene))
                    weights.append(1.0 / len(verbs))
    return combos, np.asarray(weights)


def _draw(rng: np.random.Generator, pool: Sequence[int], weights: np.ndarray, k: int) -> list[int]:
    if k == 0:
        return []
    w = weights[list(pool)]
    picked = rng.choice(len(pool), size=k, replace=False, p=w / w.sum())
    return [pool[i] for i in picked]


def _short(vocab: Vocabulary, vocab_name: str, dsr_type: str, available: int, need: int, counts: str,
           why: str) -> DatasetError:
    verbs = sum(len(v) for v in vocab.animals.values())
    return DatasetError(
        f"{vocab_name} makes {vocab.prompts_per_type()} distinct prompts of each type ({verbs} animal "
        f"verbs x {len(vocab.objects)} objects x {len(vocab.scenes)} scenes){why}, so {available} of type "
        f"{dsr_type} are left, but {counts} need {need} of it; add animals, verbs, objects or scenes to the "
        f"vocabulary, or ask for fewer prompts")


def _number(rows: list[dict[str, str]], prefix: str) -> None:
    width = max(4, len(str(len(rows) - 1)))
    for i, row in enumerate(rows):
        row["group"] = f"{prefix}{i:0{width}d}"
        row["prompt_id"] = f"{row['group']}_{row['type']}"


def generate(
    vocab: Vocabulary,
    *,
    num_train: int = DEFAULT_TRAIN,
    num_test: int = DEFAULT_TEST,
    seed: int = 0,
    test_rows: Sequence[Mapping[str, str]] | None = None,
    disjoint_triples: bool = False,
    variant: str | None = None,
    source: str = "",
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train rows, test rows) with the columns `COLUMNS` (see the module docstring).

    ``test_rows`` (a published set, e.g. from `load_prompt_csv`) replaces the generated test set and
    ``num_test`` is then unused. ``variant="from_to"`` rephrases every prompt of both tables after the
    draw, so the rows are those of the standard run with the same arguments. ``source`` names the
    vocabulary in errors.
    """
    if variant is not None and variant not in VARIANTS:
        raise DatasetError(f"unknown variant {variant!r}; the variants are {list(VARIANTS)}")
    train_counts = type_counts(num_train)
    generate_test = test_rows is None
    test_counts = type_counts(num_test) if generate_test else {t: 0 for t in DSR_TYPES}
    counts = f"--train {num_train}" + (f" --test {num_test}" if generate_test else " beside the --test-csv prompts")
    vocab_name = f"the vocabulary {source!r}" if source else "the vocabulary"

    published = [dict(r) for r in test_rows] if test_rows is not None else []
    for row in published:
        row["split"] = "test"
    held_text = {normalise(r["prompt"]) for r in published}
    held_triples = {(r["animal"], r["object"], r["type"]) for r in published} if disjoint_triples else set()
    why = ""
    if published:
        why = " less the published test prompts" + (" and their (animal, object, type) triples"
                                                     if disjoint_triples else "")

    rng = np.random.default_rng(seed)
    combos, weights = _combinations(vocab)
    train: list[dict[str, str]] = []
    test: list[dict[str, str]] = []
    for t in DSR_TYPES:
        pool = [i for i, (a, v, o, s) in enumerate(combos) if (a, o, t) not in held_triples
                and not (held_text and normalise(dsr_prompt(s, a, o, t, v)) in held_text)]
        need = train_counts[t] + test_counts[t]
        if need > len(pool):
            raise _short(vocab, vocab_name, t, len(pool), need, counts, why)
        if disjoint_triples and generate_test:
            drawn_test = _draw(rng, pool, weights, test_counts[t])
            test_triples = {(combos[i][0], combos[i][2]) for i in drawn_test}
            rest = [i for i in pool if (combos[i][0], combos[i][2]) not in test_triples]
            if train_counts[t] > len(rest):
                raise _short(vocab, vocab_name, t, len(rest), train_counts[t], counts,
                             " less the (animal, object, type) triples of the test prompts drawn")
            drawn_train = _draw(rng, rest, weights, train_counts[t])
        else:
            drawn = _draw(rng, pool, weights, need)
            drawn_test, drawn_train = drawn[:test_counts[t]], drawn[test_counts[t]:]
        for split, drawn_rows, out in (("train", drawn_train, train), ("test", drawn_test, test)):
            out.extend(_row(s, a, o, t, v, split) for a, v, o, s in (combos[i] for i in drawn_rows))
    train = [train[i] for i in rng.permutation(len(train))]
    _number(train, "train")
    if generate_test:
        test = [test[i] for i in rng.permutation(len(test))]
        _number(test, "test")
    else:
        test = published
        clash = sorted({r["prompt_id"] for r in train} & {r["prompt_id"] for r in test})
        if clash:
            raise DatasetError(f"the test CSV already uses prompt id(s) {clash[:5]} of the generated train set; "
                               "rename them in the test CSV")
    _check_disjoint(train, test, disjoint_triples)
    if variant == "from_to":
        train, test = [rephrase_from_to(r) for r in train], [rephrase_from_to(r) for r in test]
        _check_disjoint(train, test, disjoint_triples)
    return train, test


def _check_disjoint(train: Iterable[Mapping[str, str]], test: Iterable[Mapping[str, str]], triples: bool) -> None:
    """The promise of the module docstring, checked on the result (a bug here must not leak test prompts)."""
    train, test = list(train), list(test)
    shared = {normalise(r["prompt"]) for r in train} & {normalise(r["prompt"]) for r in test}
    if shared:
        raise AssertionError(f"train and test share prompt(s) {sorted(shared)[:3]}")
    if triples:
        key = lambda r: (r["animal"], r["object"], r["type"])  # noqa: E731
        both = {key(r) for r in train} & {key(r) for r in test}
        if both:
            raise AssertionError(f"train and test share (animal, object, type) triple(s) {sorted(both)[:3]}")
