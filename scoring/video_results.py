"""A folder's scores: ``OUT/scores/{name}.json``, one result file per mp4 of the video folder.

The folder's videos resolved against the prompt table (``{prompt_id}_{seed}.mp4``), where each
video's result file lives, reading the files back, and whether a result still describes its video
(size and modification time recorded when it was scored). ``scoring.run`` writes the files;
``scoring.evaluate`` reads them.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from scoring.video import parse_video_name

log = logging.getLogger("scoring")


RESULTS_SUBDIR = "scores"


@dataclass(frozen=True)
class VideoItem:
    """One mp4 of a video folder, resolved against the prompt table."""

    path: Path
    prompt: Mapping[str, str] | None  # None: no prompt row matches the file name
    seed: int | None
    shard_key: int

    @property
    def key(self) -> str:
        return self.path.stem


def list_videos(video_dir: str | os.PathLike, prompts: Sequence[Mapping[str, str]]) -> list[VideoItem]:
    """The ``*.mp4`` files of ``video_dir`` (``{prompt_id}_{seed}.mp4``), sorted by name."""
    video_dir = Path(video_dir)
    if not video_dir.is_dir():
        raise FileNotFoundError(f"video folder {str(video_dir)!r} does not exist")
    index = {row["prompt_id"]: k for k, row in enumerate(prompts)}
    items = []
    for path in sorted(video_dir.glob("*.mp4")):
        parsed = parse_video_name(path.name, index)
        if parsed is None:
            # Unmatched files still get a stable shard so exactly one process reports them.
            items.append(VideoItem(path, None, None, zlib.crc32(path.stem.encode())))
        else:
            pid, seed = parsed
            items.append(VideoItem(path, prompts[index[pid]], seed, index[pid]))
    return items


def result_path(results_dir: str | os.PathLike, key: str) -> Path:
    return Path(results_dir) / RESULTS_SUBDIR / f"{key}.json"


def load_video_results(results_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """All per-video results in ``results_dir``, by video key (file stem)."""
    out = {}
    for path in sorted((Path(results_dir) / RESULTS_SUBDIR).glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("ignoring unreadable result file %s (%s); its video will be re-scored", path, e)
            continue
        out[path.stem] = rec
    return out


def video_fingerprint(path: Path) -> dict[str, int]:
    """Size and modification time of a video file: a score belongs to the file as it was then."""
    st = path.stat()
    return {"video_size": st.st_size, "video_mtime_ns": st.st_mtime_ns}


def result_is_current(rec: Mapping[str, Any], path: Path) -> bool:
    """Whether a result record still describes the file at ``path`` (records without a fingerprint
    predate it and are trusted)."""
    if "video_size" not in rec:
        return True
    try:
        return video_fingerprint(path) == {k: rec.get(k) for k in ("video_size", "video_mtime_ns")}
    except OSError:
        return False


def record_boxes(rec: Mapping[str, Any], name: str) -> np.ndarray | None:
    """A result record's (T, 4) boxes with NaN rows, or None."""
    rows = rec.get(name)
    if rows is None:
        return None
    return np.array([[np.nan if x is None else x for x in row] for row in rows], dtype=np.float32).reshape(-1, 4)
