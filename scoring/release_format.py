"""The published SpatialAlign training release: its format, read and checked by `plan_release`.

The format, as the release's own training code reads it (fengming001ntu/SpatialAlign: ``train.py``'s
``TensorDataset``, and ``calc_dsr_score.py``, which writes the rewards); the data files themselves
were not at hand to check against:

- A metadata CSV, ``DIR/train_metadata.csv`` or ``DIR/metadata.csv`` (``run_train.sh``'s name;
  ``--metadata`` names another): one row per prompt with ``prompt_id`` and ``reward``, a Python list literal of the
  DSR-Scores of the prompt's samples in the order of its latents, ``-100`` for an invalid sample
  (``"[0.81, -100, 0.42]"``; ``rewards`` is read too). ``calc_dsr_score.py`` writes the prompt CSV's row
  plus ``video`` (the scored videos' names) and ``reward``, so the prompt columns are usually there.
- One ``{prompt_id}.tensors.pth`` per prompt, in ``DIR/tensors/`` or ``DIR`` itself (``--tensors``): a dict
  saved with ``torch.save`` holding ``latents_data``, the Wan VAE latents of the prompt's N samples
  ``(N, 16, 21, 60, 104)``; ``prompt_emb``, a dict whose ``context`` is the umT5 embedding
  ``(1, 512, 4096)`` as DiffSynth's ``WanPrompter`` returns it (rows past the prompt's tokens are zero);
  and ``prompt_id``. Other keys are ignored. Every file is read with ``torch.load(weights_only=True)``:
  a .pth file is a pickle, i.e. code, and nothing but tensors, strings and containers is loaded.

`plan_release` reads the metadata and every tensors file (memory-mapped: only the text rows are read
in full) and checks them against this format and each other before anything is written: a missing
or extra file, other keys or shapes, a reward list of another length or with a value that is neither
a DSR-Score nor -100. The problems found are listed together, each with its file and the fix.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spatialalign_jax.common.dsr_types import DSR_TYPES
from spatialalign_jax.common.prompt_parse import parse_dsr_prompt
from spatialalign_jax.common.prompt_table import load_prompt_csv
from spatialalign_jax.common.store import OPTIONAL_PROMPT_COLUMNS, PROMPT_COLUMNS, SPLITS

METADATA_NAMES = ("train_metadata.csv", "metadata.csv")
SUFFIX = ".tensors.pth"
INVALID_REWARD = -100
MAX_LISTED = 12  # problems listed in one error; the count says how many more


class ReleaseError(ValueError):
    """Release files or a store that cannot be imported; the message names the file and the fix."""


@dataclass(frozen=True)
class Entry:
    """One prompt of the release: its store row, tensors file, rewards and placeholder seeds."""

    row: dict[str, str]
    path: Path
    rewards: tuple[float, ...]
    seeds: tuple[int, ...]
    text_len: int


@dataclass(frozen=True)
class Plan:
    """Everything checked, nothing written: what `import_release` will write."""

    entries: tuple[Entry, ...]
    latent_shape: tuple[int, int, int, int]
    samples_per_prompt: int
    max_text_len: int
    text_dim: int
    text_dtype: str
    source: str

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for key in ("latent_shape", "samples_per_prompt", "max_text_len", "text_dim", "text_dtype"):
            h.update(repr(getattr(self, key)).encode())
        for e in self.entries:
            h.update(json.dumps([e.row, e.path.name, e.rewards, e.seeds, e.text_len], sort_keys=True).encode())
        return h.hexdigest()[:16]


def load_tensors_file(path: Path) -> dict[str, Any]:
    """A release tensors file, with ``torch.load(weights_only=True)``; memory-mapped where the format allows."""
    import pickle

    import torch

    try:
        try:
            obj = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, weights_only=True, map_location="cpu")  # the pre-zip format cannot be mapped
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            why = str(e)[str(e).find("Unsupported global"):].split(" was not", 1)[0].splitlines()[0]
            raise ReleaseError(f"{path}: torch.load(weights_only=True) refuses it ({why}): it holds Python objects "
                               "besides tensors, and a .pth file is a pickle, i.e. code this importer will not run; "
                               "save the file again with tensors, strings and dicts only") from None
        raise ReleaseError(f"{path}: not a torch file (an LFS pointer, an HTML page or a damaged download?): "
                           "download it again") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        raise ReleaseError(f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); the file "
                           "is truncated or corrupt: download it again") from None
    if not isinstance(obj, dict):
        raise ReleaseError(f"{path}: holds a {type(obj).__name__}, expected the release's dict with 'latents_data' "
                           "and 'prompt_emb' (see scoring/release_format.py)")
    return obj


def file_arrays(path: Path, obj: dict[str, Any]) -> tuple[Any, Any]:
    """(latents (N, C, F, H, W), context (L, D)) torch tensors of a loaded file; refuses other layouts."""
    import torch

    expected = "'latents_data' (N, C, F, H, W) and 'prompt_emb': {'context': (1, L, D)}"
    missing = [k for k in ("latents_data", "prompt_emb") if k not in obj]
    if missing:
        raise ReleaseError(f"{path}: lacks key(s) {missing} (has {sorted(map(str, obj))}); a release tensors file "
                           f"holds {expected}: is it a file of the SpatialAlign training release?")
    lat, emb = obj["latents_data"], obj["prompt_emb"]
    if not isinstance(lat, torch.Tensor) or lat.ndim != 5 or not lat.is_floating_point() or min(lat.shape) < 1:
        what = f"shape {tuple(lat.shape)} {lat.dtype}" if isinstance(lat, torch.Tensor) else type(lat).__name__
        raise ReleaseError(f"{path}: 'latents_data' is {what}; expected a float tensor (N, C, F, H, W) of the N "
                           "samples' latents")
    ctx = emb.get("context") if isinstance(emb, dict) else None
    if not isinstance(ctx, torch.Tensor):
        raise ReleaseError(f"{path}: 'prompt_emb' must be a dict with a 'context' tensor (1, L, D), got "
                           f"{type(emb).__name__}" + (f" with keys {sorted(emb)}" if isinstance(emb, dict) else ""))
    if ctx.ndim == 3 and ctx.shape[0] == 1:
        ctx = ctx[0]
    if ctx.ndim != 2 or not ctx.is_floating_point() or min(ctx.shape) < 1:
        raise ReleaseError(f"{path}: prompt_emb['context'] has shape {tuple(obj['prompt_emb']['context'].shape)} "
                           f"{ctx.dtype}; expected a float tensor (1, L, D) (L text rows of D features)")
    return lat, ctx


def _text_len(ctx: Any) -> int:
    nonzero = np.flatnonzero(ctx.float().abs().amax(dim=1).numpy() > 0)
    return int(nonzero[-1]) + 1 if len(nonzero) else 0


def _read_metadata(path: Path) -> list[dict[str, str]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ReleaseError(f"metadata {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip() for h in reader.fieldnames or []]
    if "prompt_id" not in header or not {"reward", "rewards"} & set(header):
        raise ReleaseError(f"metadata {path} needs columns 'prompt_id' and 'reward' (a list per prompt); found "
                           f"{header}")
    rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
    if not rows:
        raise ReleaseError(f"metadata {path} has no rows")
    return rows


def _rewards(text: str) -> tuple[float, ...] | str:
    """The reward list, or what is wrong with it."""
    try:
        value = ast.literal_eval(text)  # literals only: never code
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return f"reward {text[:60]!r} is not a list of numbers like [0.81, -100, 0.42]"
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return f"reward {text[:60]!r} is not a non-empty list of numbers like [0.81, -100, 0.42]"
    bad = [(i, v) for i, v in enumerate(value) if v != INVALID_REWARD and not (math.isfinite(v) and 0 <= v <= 1)]
    if bad:
        i, v = bad[0]
        return (f"reward {v!r} (sample {i}) is neither a DSR-Score in [0, 1] nor {INVALID_REWARD} (invalid); fix "
                f"the value" + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""))
    return tuple(float(v) for v in value)


def _seeds(raw: dict[str, str], n: int) -> tuple[int, ...]:
    """Placeholder seeds: ``k`` from video names ending in ``seed<k>.mp4`` when all n have one, else 0..n-1."""
    try:
        videos = ast.literal_eval(raw.get("video") or "None")
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        videos = None
    if isinstance(videos, (list, tuple)) and len(videos) == n:
        found = [re.search(r"seed(\d+)\.mp4$", str(v)) for v in videos]
        if all(found):
            return tuple(int(m[1]) for m in found)
    return tuple(range(n))


def _prompt_row(raw: dict[str, str], csv_rows: dict[str, dict[str, str]] | None, split: str) -> dict[str, str] | str:
    """The store's prompt row of a metadata row, or what is wrong."""
    pid = raw["prompt_id"]
    if csv_rows is not None:
        if pid not in csv_rows:
            return "is not in --csv"
        row = {k: v for k, v in csv_rows[pid].items() if k != "split"}
    else:
        parts = parse_dsr_prompt(raw["prompt"]) if raw.get("prompt") else None
        derived = {}
        if parts is not None:
            t = DSR_TYPES[parts.dsr_type]
            derived = {"type": t.name, "scene": parts.scene, "initial_SR": t.initial_phrase,
                       "final_SR": t.final_phrase, "animal": parts.animal, "object": parts.object}
        row = {c: raw.get(c) or derived.get(c, "") for c in PROMPT_COLUMNS}
        row.update({c: raw[c] for c in OPTIONAL_PROMPT_COLUMNS if raw.get(c)})
        missing = [c for c in PROMPT_COLUMNS if not row[c]]
        if missing:
            return (f"lacks {missing} and its prompt {raw.get('prompt', '')[:80]!r} is not in the SPEC template to "
                    "read them from; pass the prompt table with --csv")
        clash = [c for c in ("type", "animal", "object") if derived and derived[c] != row[c]]
        if clash:
            c = clash[0]
            return f"its prompt text names another {c} ({derived[c]!r}) than its column ({row[c]!r})"
        if row["type"] not in DSR_TYPES:
            return f"type {row['type']!r} is not one of {sorted(DSR_TYPES)}"
    row["split"] = split
    return row


def plan_release(src: str | Path, *, csv_path: str | Path | None = None, metadata: str | Path | None = None,
                 tensors: str | Path | None = None, split: str = "train") -> Plan:
    """Reads and checks the release (metadata, every tensors file, the prompt table); raises `ReleaseError`
    listing every problem found, each with its file and fix."""
    src = Path(src)
    if not src.is_dir():
        raise ReleaseError(f"--src {str(src)!r} is not a folder")
    if split not in SPLITS:
        raise ReleaseError(f"--split must be one of {SPLITS}, got {split!r}")
    if metadata is None:
        found = [src / n for n in METADATA_NAMES if (src / n).is_file()]
        if not found:
            raise ReleaseError(f"no metadata CSV in {src} (looked for {list(METADATA_NAMES)}); name it with --metadata")
        metadata = found[0]
    metadata = Path(metadata)
    if not metadata.is_file():
        raise ReleaseError(f"--metadata {str(metadata)!r} does not exist")
    folder = Path(tensors) if tensors is not None else (src / "tensors" if (src / "tensors").is_dir() else src)
    if not folder.is_dir():
        raise ReleaseError(f"--tensors {str(folder)!r} is not a folder")
    files = {p.name[: -len(SUFFIX)]: p for p in sorted(folder.glob(f"*{SUFFIX}"))}
    csv_rows = None
    if csv_path is not None:
        csv_rows = {r["prompt_id"]: r for r in load_prompt_csv(csv_path, split=None)}

    problems: list[str] = []
    entries: list[Entry] = []
    shapes: dict[Path, tuple[tuple[int, ...], tuple[int, int], Any]] = {}
    seen: dict[str, int] = {}
    for n, raw in enumerate(_read_metadata(metadata), start=1):
        pid = raw.get("prompt_id", "")
        where = f"{metadata} row {n} ({pid or 'no prompt_id'})"
        if not pid:
            problems.append(f"{where}: empty prompt_id")
            continue
        if pid in seen:
            problems.append(f"{where}: prompt_id also on row {seen[pid]}; keep one row per prompt")
            continue
        seen[pid] = n
        path = files.get(pid)
        if path is None:
            problems.append(f"{where}: no tensors file {folder / (pid + SUFFIX)}; put it there, or drop the row")
            continue
        rewards = _rewards(raw.get("reward") or raw.get("rewards") or "")
        row = _prompt_row(raw, csv_rows, split)
        for what in (rewards, row):
            if isinstance(what, str):
                problems.append(f"{where}: {what}" + (f" {csv_path}" if what == "is not in --csv" else ""))
        try:
            obj = load_tensors_file(path)
            lat, ctx = file_arrays(path, obj)
            if "prompt_id" in obj and obj["prompt_id"] != pid:
                raise ReleaseError(f"{path}: holds prompt_id {obj['prompt_id']!r}, its name says {pid!r}; rename the "
                                   "file after the prompt it holds")
        except ReleaseError as e:
            problems.append(str(e))
            continue
        shapes[path] = (tuple(lat.shape[1:]), tuple(ctx.shape), ctx.dtype)
        text_len = _text_len(ctx)
        if text_len == 0:
            problems.append(f"{path}: prompt_emb['context'] is all zeros; the prompt was never encoded, encode it "
                            "again")
        if not isinstance(rewards, str) and len(rewards) != lat.shape[0]:
            problems.append(f"{where}: {len(rewards)} rewards for the {lat.shape[0]} samples of {path}; the list "
                            f"needs one reward per sample, in latents order ({INVALID_REWARD} for an invalid one)")
        elif not isinstance(rewards, str) and not isinstance(row, str):
            entries.append(Entry(row, path, rewards, _seeds(raw, len(rewards)), text_len))
    for pid, path in files.items():
        if pid not in seen:
            problems.append(f"{path}: no row of {metadata} has prompt_id {pid!r}; add its row (with its rewards) or "
                            f"move the file out of {folder}")
    latent_shape = text_shape = None
    if shapes:
        latent_shape = Counter(s[0] for s in shapes.values()).most_common(1)[0][0]
        text_shape = Counter(s[1] for s in shapes.values()).most_common(1)[0][0]
        for path, (lat_s, txt_s, _) in shapes.items():
            if lat_s != latent_shape:
                problems.append(f"{path}: samples of latents_data are {lat_s}, most files' are {latent_shape}; "
                                "a store holds one latent shape: leave this prompt out (file and metadata row)")
            if txt_s[1] != text_shape[1]:
                problems.append(f"{path}: text embedding has {txt_s[1]} features, most files' {text_shape[1]}; "
                                "encode its prompt with the same text encoder")
    if problems:
        listed = "\n  - ".join(problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise ReleaseError(f"the release in {src} has {len(problems)} problem(s); nothing was written:\n  - "
                           f"{listed}{more}")
    import torch

    return Plan(
        entries=tuple(entries), latent_shape=latent_shape, samples_per_prompt=max(len(e.rewards) for e in entries),
        max_text_len=max(s[1][0] for s in shapes.values()), text_dim=text_shape[1],
        text_dtype="bfloat16" if all(s[2] == torch.bfloat16 for s in shapes.values()) else "float32",
        source=str(metadata.resolve()))


