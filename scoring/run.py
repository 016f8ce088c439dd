"""Scoring runs: samples of a store or a folder of mp4 files -> boxes, DSR-Score and status.

The models come in as objects (a detector, a tracker and, for a store, a latent decoder), so the
same code runs the real models and the tests' deterministic fakes. Both sources (a store's latents,
a folder's mp4 files) hand their videos to one driver loop, which scores and saves each of them.

Scale and robustness:

- ``shard=(i, n)`` scores the prompts with ``index % n == i``: n processes (one per GPU, under any
  launcher) write disjoint prompts, hence disjoint chunks or files, at once.
- Resumable: samples whose status is not UNSCORED are skipped (``retry_failed`` re-scores the
  failure statuses too). Every result is written as soon as it exists, atomically, so a crash
  loses at most the sample in flight.
- A sample that cannot be scored (unreadable video, wrong frame count, missing prompt row, a
  model error) gets a failure status and a logged error naming it; the run goes on.
"""

from __future__ import annotations

import logging
import math
import os
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
from tqdm.auto import tqdm

from scoring.dsr import dsr_score
from scoring.metrics import write_json_atomic
from scoring.video import DEFAULT_FPS, VideoError, read_video, video_name, write_video
from scoring.video_results import (VideoItem, list_videos, load_video_results, result_is_current, result_path,
                                    video_fingerprint)
from spatialalign_jax.common.store import Status, Store

log = logging.getLogger("scoring")

T = TypeVar("T")

Decoder = Callable[[np.ndarray], np.ndarray]  # latents (C, F, H, W) -> frames (T, H, W, 3) uint8


@dataclass
class ItemResult:
    """One video's scoring outcome."""

    status: Status
    dsr: float = float("nan")
    boxes_animal: np.ndarray | None = None
    boxes_object: np.ndarray | None = None
    error: str | None = None
    # Set on a device failure: the result is saved, then the run stops. Not written anywhere.
    abort: str | None = None


@dataclass
class RunSummary:
    """What a run did: counts per status of the samples it scored, and what it skipped."""

    scored: Counter = field(default_factory=Counter)
    skipped_done: int = 0
    skipped_no_latents: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        n = sum(self.scored.values())
        rate = n / self.seconds if self.seconds > 0 else float("nan")
        parts = ", ".join(f"{k}={v}" for k, v in sorted(self.scored.items()))
        extra = f"; skipped {self.skipped_done} already scored"
        if self.skipped_no_latents:
            extra += f", {self.skipped_no_latents} without latents yet"
        return f"scored {n} videos in {self.seconds:.1f}s ({rate:.2f} videos/s): {parts or 'none'}{extra}"


def score_frames(frames: np.ndarray, animal: str, obj: str, dsr_type: str, detector: Any, tracker: Any) -> ItemResult:
    """Detect, validate, track and score one decoded video (SPEC sections 3 and 4)."""
    from scoring.validity import boxes_for_video

    boxes_a, boxes_o, status = boxes_for_video(frames, animal, obj, detector, tracker)
    if status != Status.VALID:
        return ItemResult(Status(status), float("nan"), boxes_a, boxes_o)
    dsr = dsr_score(boxes_a, boxes_o, dsr_type)
    if math.isnan(dsr):
        return ItemResult(Status.TOO_FEW_TRACKED_FRAMES, dsr, boxes_a, boxes_o)
    return ItemResult(Status.VALID, dsr, boxes_a, boxes_o)


# After this many model errors with no tracked video between them the run stops: a broken setup would
# otherwise mark every remaining video of the shard MODEL_ERROR, which only --retry-failed undoes.
MAX_CONSECUTIVE_MODEL_ERRORS = 8
# Outcomes for which every model ran, so the models work; the invalid statuses stop before the
# tracker and leave the count of errors in a row as it is.
_MODELS_RAN = (Status.VALID, Status.TOO_FEW_TRACKED_FRAMES)


class ScoringAborted(RuntimeError):
    """The run stopped because every further video would fail the same way."""


def _is_device_failure(err: BaseException) -> bool:
    """A CUDA error that leaves the process's GPU context unusable (running out of memory does not)."""
    import torch

    if isinstance(err, torch.cuda.OutOfMemoryError):
        return False
    return isinstance(err, getattr(torch, "AcceleratorError", ())) or "CUDA error" in str(err)


def _model_error(what: str, err: BaseException) -> ItemResult:
    log.error("%s: model error: %s", what, err)
    log.debug("%s", "".join(traceback.format_exception(err)))
    result = ItemResult(Status.MODEL_ERROR, error=f"{type(err).__name__}: {err}")
    if _is_device_failure(err):
        result.abort = (
            f"{what}: {result.error}. The GPU is unusable for this process, so scoring stopped; this video is "
            "recorded as MODEL_ERROR and the videos before it are kept. Rerun the same command to continue "
            "(add --retry-failed to score this video again)."
        )
    return result


def _prefetch(loaders: Iterable[Callable[[], T]]) -> Iterator[tuple[T | None, BaseException | None]]:
    """Run each loader one step ahead in a thread (I/O and video decoding overlap the models)."""

    def run(loader: Callable[[], T]) -> tuple[T | None, BaseException | None]:
        try:
            return loader(), None
        except Exception as e:  # handed to the consumer, which records the item's failure
            return None, e

    it = iter(loaders)
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = next(it, None)
        pending = pool.submit(run, nxt) if nxt is not None else None
        while pending is not None:
            result = pending.result()
            nxt = next(it, None)
            pending = pool.submit(run, nxt) if nxt is not None else None
            yield result


def _inspection_outputs(frames: np.ndarray | None, result: ItemResult, dsr_type: str, name: str,
                        mp4_dir: Path | None, plots_dir: Path | None, fps: int) -> None:
    """Optional mp4 and SSR-curve PNG of one sample; failures here never fail the sample."""
    try:
        if mp4_dir is not None and frames is not None:
            write_video(mp4_dir / f"{name}.mp4", frames, fps=fps)
        if plots_dir is not None and result.boxes_animal is not None:
            from scoring.plots import plot_ssr_curves

            title = name if result.status == Status.VALID else f"{name} [{result.status.name}]"
            plot_ssr_curves(result.boxes_animal, result.boxes_object, dsr_type, plots_dir / f"{name}.png", title=title)
    except Exception as e:
        log.warning("%s: could not write the inspection mp4/plot: %s", name, e)


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="video", disable=not enabled, dynamic_ncols=True)


def _postfix(counts: Counter) -> str:
    return " ".join(f"{k.lower()}={v}" for k, v in sorted(counts.items()))


def _optional_path(path: str | os.PathLike | None) -> Path | None:
    return Path(path) if path is not None else None


def _is_done(status: Status, retry_failed: bool) -> bool:
    """Whether a resumed run skips a sample with this status."""
    return status != Status.UNSCORED and not (retry_failed and status.is_failure)


# -- the driver loop that every source feeds ----------------------------------------------------------


@dataclass
class _Video:
    """One video of a run as its source hands it to the driver: frames, or the failure that stopped them."""

    label: str  # names the video in model-error logs
    stem: str  # names its inspection mp4/PNG
    row: Mapping[str, str] | None  # None only with a failure (no prompt row matches)
    save: Callable[[ItemResult], None]  # writes the result where the source keeps results, atomically
    frames: np.ndarray | None = None
    failure: ItemResult | None = None


def _score_videos(videos: Iterable[_Video], total: int, summary: RunSummary, shard: tuple[int, int],
                  detector: Any, tracker: Any, *, mp4_dir: Path | None, plots_dir: Path | None, fps: int,
                  progress: bool) -> RunSummary:
    """Score, save and inspect each video in turn; ``summary`` already holds the skip counts."""
    i, n = shard
    start = time.perf_counter()
    bar = _progress(total, f"score {i}/{n}", progress)
    failed_in_a_row = 0
    try:
        for video in videos:
            result = video.failure
            if result is None:
                row = video.row
                try:
                    result = score_frames(video.frames, row["animal"], row["object"], row["type"], detector, tracker)
                except Exception as e:
                    result = _model_error(video.label, e)
            # Saved before the (optional, slower) inspection outputs: a crash loses at most the video in flight.
            video.save(result)
            if result.abort:
                raise ScoringAborted(result.abort)
            if video.row is not None:
                _inspection_outputs(video.frames, result, video.row["type"], video.stem, mp4_dir, plots_dir, fps)
            summary.scored[result.status.name] += 1
            bar.update(1)
            bar.set_postfix_str(_postfix(summary.scored), refresh=False)
            if result.status == Status.MODEL_ERROR:
                failed_in_a_row += 1
            elif result.status in _MODELS_RAN:
                failed_in_a_row = 0
            if failed_in_a_row == MAX_CONSECUTIVE_MODEL_ERRORS:
                raise ScoringAborted(
                    f"{failed_in_a_row} videos failed with errors and none was tracked between them (the last: "
                    f"{result.error}); stopped instead of marking the rest of the shard failed. Fix the cause, "
                    "then rerun with --retry-failed to score those videos again."
                )
    finally:
        bar.close()
        if hasattr(videos, "close"):  # a generator: stops its read-ahead now, not when collected
            videos.close()
    summary.seconds = time.perf_counter() - start
    return summary


# -- store ---------------------------------------------------------------------------------------------


def _store_videos(store: Store, work: Sequence[tuple[int, int]], seeds: np.ndarray,
                  decode: Decoder) -> Iterator[_Video]:
    """The samples ``work`` of ``store``: latents read one ahead, decoded here (on the models' device)."""
    loaders = [(lambda p=p, s=s: store.read_latents(p, s)) for p, s in work]
    for (p, s), (loaded, err) in zip(work, _prefetch(loaders)):
        row = store.prompts[p]
        name = video_name(row["prompt_id"], seeds[p, s])

        def save(result: ItemResult, p: int = p, s: int = s) -> None:
            store.write_score(p, s, status=result.status, dsr=result.dsr,
                              boxes_animal=result.boxes_animal, boxes_object=result.boxes_object)

        video = _Video(name, Path(name).stem, row, save)
        if err is not None:
            video.failure = _model_error(f"{name} (reading latents)", err)
        else:
            try:
                video.frames = decode(loaded[0])
            except Exception as e:
                video.failure = _model_error(f"{name} (VAE decode)", e)
            else:
                # The frames stay set: --mp4-dir still shows what the VAE made of them.
                if len(video.frames) != store.num_frames:
                    msg = f"decoded {len(video.frames)} frames, the store expects {store.num_frames}"
                    log.error("%s: %s", name, msg)
                    video.failure = ItemResult(Status.WRONG_FRAME_COUNT, error=msg)
        yield video


def score_store(
    store: Store,
    detector: Any,
    tracker: Any,
    decode: Decoder,
    *,
    shard: tuple[int, int] = (0, 1),
    retry_failed: bool = False,
    mp4_dir: str | os.PathLike | None = None,
    plots_dir: str | os.PathLike | None = None,
    fps: int = DEFAULT_FPS,
    progress: bool = True,
) -> RunSummary:
    """Score the samples of ``store`` (opened "r+") in ``shard``: decode, detect, track, DSR, write."""
    if store.mode != "r+":
        raise ValueError(f"score_store needs the store opened with mode='r+', got {store.mode!r}")
    i, n = shard
    summary = RunSummary()
    seeds, status = store.read_seeds(), store.read_status()
    work = []
    for p in range(i, store.num_prompts, n):
        for s in range(store.samples_per_prompt):
            if _is_done(Status(int(status[p, s])), retry_failed):
                summary.skipped_done += 1
            elif seeds[p, s] < 0:
                summary.skipped_no_latents += 1
            else:
                work.append((p, s))
    return _score_videos(_store_videos(store, work, seeds, decode), len(work), summary, shard, detector, tracker,
                         mp4_dir=_optional_path(mp4_dir), plots_dir=_optional_path(plots_dir), fps=fps,
                         progress=progress)


# -- folder of videos (results: video_results.py) -------------------------------------------------------


def _record(item: VideoItem, result: ItemResult) -> dict[str, Any]:
    """A video's result file (write_json_atomic turns NaN dsr and box rows into null)."""
    try:
        fingerprint = video_fingerprint(item.path)
    except OSError:
        fingerprint = {}
    return {
        "video": item.path.name,
        **fingerprint,
        "prompt_id": item.prompt["prompt_id"] if item.prompt else None,
        "seed": item.seed,
        "type": item.prompt["type"] if item.prompt else None,
        "status": int(result.status),
        "status_name": result.status.name,
        "dsr": result.dsr,
        "error": result.error,
        "boxes_animal": result.boxes_animal,
        "boxes_object": result.boxes_object,
    }


def _folder_videos(items: Sequence[VideoItem], results_dir: str | os.PathLike,
                   num_frames: int | None) -> Iterator[_Video]:
    """The videos ``items``, read and decoded one ahead."""

    def loader(item: VideoItem) -> Callable[[], np.ndarray | None]:
        return lambda: None if item.prompt is None else read_video(item.path, num_frames)

    for item, (frames, err) in zip(items, _prefetch(loader(it) for it in items)):

        def save(result: ItemResult, item: VideoItem = item) -> None:
            write_json_atomic(result_path(results_dir, item.key), _record(item, result))

        video = _Video(str(item.path), item.key, item.prompt, save, frames=frames)
        if item.prompt is None:
            msg = f"no prompt row matches {item.path.name!r} (expected {{prompt_id}}_{{seed}}.mp4 with a prompt_id of the CSV)"
            log.error("%s", msg)
            video.failure = ItemResult(Status.MISSING_PROMPT, error=msg)
        elif isinstance(err, VideoError):
            log.error("%s", err)
            video.failure = ItemResult(
                Status.WRONG_FRAME_COUNT if err.kind == "frame_count" else Status.UNREADABLE_VIDEO, error=str(err))
        elif err is not None:
            log.error("%s: unreadable: %s", item.path, err)
            video.failure = ItemResult(Status.UNREADABLE_VIDEO, error=f"{type(err).__name__}: {err}")
        yield video


def score_video_dir(
    video_dir: str | os.PathLike,
    prompts: Sequence[Mapping[str, str]],
    results_dir: str | os.PathLike,
    detector: Any,
    tracker: Any,
    *,
    shard: tuple[int, int] = (0, 1),
    num_frames: int | None = None,
    retry_failed: bool = False,
    plots_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> RunSummary:
    """Score the mp4 files of ``video_dir`` into ``results_dir/scores/{name}.json``, one file per video."""
    i, n = shard
    done = load_video_results(results_dir)
    summary = RunSummary()
    work = []
    for item in list_videos(video_dir, prompts):
        if item.shard_key % n != i:
            continue
        rec = done.get(item.key)
        if rec is not None and not result_is_current(rec, item.path):
            log.info("%s changed since it was scored: scoring it again", item.path.name)
        elif rec is not None and _is_done(Status(rec["status"]), retry_failed):
            summary.skipped_done += 1
            continue
        work.append(item)
    # The videos are the inspection mp4s already: only plots are written.
    return _score_videos(_folder_videos(work, results_dir, num_frames), len(work), summary, shard, detector, tracker,
                         mp4_dir=None, plots_dir=_optional_path(plots_dir), fps=DEFAULT_FPS, progress=progress)
