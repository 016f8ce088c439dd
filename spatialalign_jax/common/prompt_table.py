"""DSR prompt tables in the published CSV formats (SPEC section 2): `load_prompt_csv`.

Two layouts exist: ``eval120.csv`` (``group,type,prompt_id,scene,initial_SR,final_SR,animal,object,prompt``)
and ``eval30.csv`` (the same without ``group``, columns in another order). Columns are matched by
name, so any order works; extra columns are ignored. A ``split`` column, when present, gives each
row's split; otherwise every row gets the split the caller names.

In the bottom layer because both processes read prompt CSVs: the scorer (``scoring.prompts`` re-exports
this module), the loop and the dataset generator (``spatialalign_jax.dataset --test-csv``).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from .dsr_types import DSR_TYPES
from .store_layout import OPTIONAL_PROMPT_COLUMNS, PROMPT_COLUMNS, SPLITS


class PromptTableError(ValueError):
    """A prompt CSV that cannot be used, with the file, row and column at fault."""


def load_prompt_csv(path: str | os.PathLike, split: str | None = "test") -> list[dict[str, str]]:
    """Rows of a DSR prompt CSV as dicts with the SPEC columns plus ``split`` (and ``group`` if given).

    Without a ``split`` column every row gets ``split``; with one, ``split`` selects those rows
    (None keeps all). Errors name the file, the row (1-based, after the header) and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptTableError(f"prompt CSV {str(path)!r} does not exist")
    if split is not None and split not in SPLITS:
        raise PromptTableError(f"split must be one of {SPLITS}, got {split!r}")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # newlines as they are: the csv module reads them
    except UnicodeDecodeError as e:
        raise PromptTableError(f"prompt CSV {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason}); save it as "
                               "UTF-8 (in Excel: 'CSV UTF-8')") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in PROMPT_COLUMNS if c not in header]
    if missing:
        raise PromptTableError(
            f"prompt CSV {str(path)!r} lacks column(s) {missing}; it needs {list(PROMPT_COLUMNS)} "
            f"(optionally {list(OPTIONAL_PROMPT_COLUMNS)} and 'split'), found {header}"
        )
    has_split = "split" in header
    rows: list[dict[str, str]] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(reader, start=1):
        # Extra fields beyond the header land under the key None; they are ignored.
        raw = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        where = f"prompt CSV {str(path)!r} row {n}"
        empty = [c for c in PROMPT_COLUMNS if not raw.get(c)]
        if empty:
            raise PromptTableError(f"{where} ({raw.get('prompt_id') or 'no prompt_id'}): empty column(s) {empty}")
        pid = raw["prompt_id"]
        if raw["type"] not in DSR_TYPES:
            raise PromptTableError(
                f"{where} ({pid}): DSR type {raw['type']!r} is not one of {sorted(DSR_TYPES)}"
            )
        if pid in seen:
            raise PromptTableError(f"{where}: prompt_id {pid!r} already used by row {seen[pid]}")
        seen[pid] = n
        row = {c: raw[c] for c in PROMPT_COLUMNS}
        for c in OPTIONAL_PROMPT_COLUMNS:
            if raw.get(c):
                row[c] = raw[c]
        if has_split:
            if raw.get("split") not in SPLITS:
                raise PromptTableError(f"{where} ({pid}): split {raw.get('split')!r} is not one of {SPLITS}")
            if split is not None and raw["split"] != split:
                continue
            row["split"] = raw["split"]
        else:
            row["split"] = split or "test"
        rows.append(row)
    if not rows:
        raise PromptTableError(f"prompt CSV {str(path)!r} has no rows" + (f" of split {split!r}" if has_split else ""))
    return rows
