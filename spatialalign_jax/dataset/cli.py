"""``python -m spatialalign_jax.dataset``: write a DSR-Dataset's train and test prompt tables.

    python -m spatialalign_jax.dataset --out DIR [--train 500] [--test 120] [--seed 0]
        [--vocab configs/dsr_vocabulary.yaml] [--test-csv PATH] [--disjoint-triples] [--variant from_to]
        [--overwrite]

Writes ``DIR/train.csv`` and ``DIR/test.csv`` in the published CSV format (``group,type,prompt_id,
scene,initial_SR,final_SR,animal,object,prompt`` plus ``split``; `scoring.prompts.load_prompt_csv`
reads them), each file atomically, and prints the prompts per type. ``--test-csv`` takes a published
set (e.g. ``scoring/reference/eval120.csv``) as the test table instead of drawing one; the train
prompts are then drawn disjoint from it in text, and with ``--disjoint-triples`` also in (animal,
object, type). ``--variant from_to`` writes the same rows with the sentence rephrased ("a fox
sprints from the left of a chair to the right of the chair"). How prompts are drawn and balanced:
`spatialalign_jax.dataset.generate`; the vocabulary file's comments say what each key is.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

from spatialalign_jax.common.atomic import atomic_path, file_in_the_way
from spatialalign_jax.common.dsr_types import DSR_TYPES
from spatialalign_jax.common.prompt_table import PromptTableError, load_prompt_csv

from .generate import COLUMNS, DEFAULT_TEST, DEFAULT_TRAIN, VARIANTS, DatasetError, generate
from .vocabulary import DEFAULT_VOCABULARY, VocabularyError, load_vocabulary

OUTPUTS = ("train.csv", "test.csv")


def write_prompt_csv(path: str | Path, rows: Sequence[Mapping[str, str]]) -> None:
    """``rows`` as a prompt CSV with `COLUMNS` (a missing ``group`` is left empty), written atomically;
    "\\n" line ends and minimal quoting, as the published files."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: row.get(c, "") for c in COLUMNS} for row in rows)


def type_summary(rows: Sequence[Mapping[str, str]]) -> str:
    counts = Counter(r["type"] for r in rows)
    return ", ".join(f"{t} {counts.get(t, 0)}" for t in DSR_TYPES)


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a prompt count must be an integer, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"a prompt count must be >= 0, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spatialalign_jax.dataset",
                                description="Write DSR-Dataset train/test prompt CSVs from a vocabulary.")
    p.add_argument("--out", required=True, help="folder for train.csv and test.csv (made if missing)")
    p.add_argument("--train", type=_count, default=DEFAULT_TRAIN, help=f"train prompts (default {DEFAULT_TRAIN})")
    p.add_argument("--test", type=_count, default=None,
                   help=f"test prompts (default {DEFAULT_TEST}; not with --test-csv)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    p.add_argument("--vocab", default=None, help=f"vocabulary YAML (default {DEFAULT_VOCABULARY})")
    p.add_argument("--test-csv", default=None,
                   help="a published prompt CSV to use as the test set (its 'test' rows when it has a split column)")
    p.add_argument("--disjoint-triples", action="store_true",
                   help="no train prompt shares a test prompt's (animal, object, type)")
    p.add_argument("--variant", choices=VARIANTS, default=None,
                   help="from_to: the same prompts rephrased 'a fox sprints from the left of a chair to the right "
                        "of the chair'")
    p.add_argument("--overwrite", action="store_true", help="replace existing train.csv / test.csv in --out")
    return p


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    blocking = file_in_the_way(out)
    if blocking is not None:
        raise DatasetError(f"--out {args.out!r} must be a folder, but {str(blocking)!r} is a file")
    if args.test_csv is not None and args.test is not None:
        raise DatasetError("--test and --test-csv exclude each other: the test set is either drawn (--test N) or "
                           "the CSV's prompts")
    existing = [str(out / name) for name in OUTPUTS if (out / name).exists()]
    if existing and not args.overwrite:
        raise DatasetError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace, or choose another "
                           "--out")
    vocab_path = args.vocab if args.vocab is not None else DEFAULT_VOCABULARY
    vocab = load_vocabulary(vocab_path)
    test_rows = load_prompt_csv(args.test_csv, split="test") if args.test_csv is not None else None
    train, test = generate(vocab, num_train=args.train, num_test=DEFAULT_TEST if args.test is None else args.test,
                           seed=args.seed, test_rows=test_rows, disjoint_triples=args.disjoint_triples,
                           variant=args.variant, source=str(vocab_path))
    for name, rows in zip(OUTPUTS, (train, test)):
        write_prompt_csv(out / name, rows)
        print(f"wrote {out / name}: {len(rows)} prompts ({type_summary(rows)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (DatasetError, VocabularyError, PromptTableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
