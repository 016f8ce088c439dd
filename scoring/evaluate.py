"""Evaluation of a scored store or video folder: Correctness@tau, quality metrics, the report.

Outputs in ``out_dir``: ``report.json`` (strict JSON, NaN as null), ``correctness.png`` and
``correctness.txt`` (the curve as a table and the quality metrics' means, also printed).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from scoring.dsr import CORRECTNESS_TAUS, correctness_curve
from scoring.metrics import correctness_table, dsr_report, plot_correctness, write_json_atomic, write_text_atomic
from scoring.video_results import list_videos, load_video_results, record_boxes, result_is_current
from scoring.video import read_video, video_name
from spatialalign_jax.common.store import Status, Store

log = logging.getLogger("scoring")

# A quality metric: frames (T, H, W, 3) uint8 and the animal's boxes (T, 4) (NaN rows, or None
# when the video has none) -> one number, NaN when it does not apply to this video.
QualityMetric = Callable[[np.ndarray, "np.ndarray | None"], float]


class EvaluationError(ValueError):
    """Nothing to evaluate in what was given; the message names the fix."""


@dataclass
class EvalSample:
    """One sample under evaluation."""

    prompt_id: str
    seed: int | None
    type: str
    status: Status
    dsr: float
    boxes_animal: np.ndarray | None = None
    frames: Callable[[], np.ndarray] | None = None  # loads the video for the quality metrics


def store_samples(store: Store, split: str | None = None,
                  frames_for: Callable[[int, int], Callable[[], np.ndarray]] | None = None) -> list[EvalSample]:
    """The samples of ``store`` (of ``split`` if given), in prompt then sample order."""
    dsr, status, seeds = store.read_dsr(), store.read_status(), store.read_seeds()
    prompts = [p for p, row in enumerate(store.prompts) if split is None or row["split"] == split]
    if not prompts:
        splits = sorted({row["split"] for row in store.prompts})
        raise EvaluationError(f"store {store.path} has no prompts of split {split!r}; its splits: {splits} "
                              "(--split)")
    boxes_a, _ = store.read_boxes(prompts)
    out = []
    for k, p in enumerate(prompts):
        row = store.prompts[p]
        for s in range(store.samples_per_prompt):
            out.append(EvalSample(
                prompt_id=row["prompt_id"], seed=int(seeds[p, s]) if seeds[p, s] >= 0 else None,
                type=row["type"], status=Status(int(status[p, s])), dsr=float(dsr[p, s]),
                boxes_animal=boxes_a[k, s], frames=frames_for(p, s) if frames_for else None,
            ))
    return out


def video_dir_samples(video_dir: str | os.PathLike, prompts: Sequence[Mapping[str, str]],
                      results_dir: str | os.PathLike, num_frames: int | None = None) -> tuple[list[EvalSample], dict]:
    """The samples of a video folder, with the results of their videos (if scored): every prompt row
    owes as many samples as the prompt with the most videos has.

    Correctness@tau divides by all samples (SPEC section 3), so a sample without its video counts as
    an unscored one. Also returns notes for the report: the missing videos, files with
    no prompt row, second files for one (prompt, seed), and videos changed since they were scored.
    """
    results = load_video_results(results_dir)
    found: dict[tuple[str, int], EvalSample] = {}
    unmatched, duplicates, stale = [], [], []
    for item in list_videos(video_dir, prompts):
        if item.prompt is None:
            unmatched.append(item.path.name)
            continue
        key = (item.prompt["prompt_id"], item.seed)
        if key in found:  # e.g. both p.mp4 and p_0.mp4: one sample, scored once
            duplicates.append(item.path.name)
            continue
        rec = results.get(item.key)
        if rec is not None and not result_is_current(rec, item.path):
            stale.append(item.path.name)  # the video was replaced after scoring: its score is not its own
            rec = None
        found[key] = EvalSample(
            prompt_id=item.prompt["prompt_id"], seed=item.seed, type=item.prompt["type"],
            status=Status(rec["status"]) if rec else Status.UNSCORED,
            dsr=float("nan") if rec is None or rec["dsr"] is None else float(rec["dsr"]),
            boxes_animal=record_boxes(rec, "boxes_animal") if rec else None,
            frames=(lambda path=item.path: read_video(path, num_frames)),
        )
    # Every prompt owes as many samples as the fullest one has. Test sets share their seeds (0..K-1),
    # so a missing one can be named; otherwise (per-prompt seeds) the gap is counted, seed unknown.
    by_prompt: dict[str, list[int]] = {}
    for pid, seed in found:
        by_prompt.setdefault(pid, []).append(seed)
    per_prompt = max((len(v) for v in by_prompt.values()), default=0)
    union = sorted({seed for _, seed in found})
    shared = len(union) == per_prompt
    samples, missing = [], []
    for row in prompts:
        pid = row["prompt_id"]
        have = sorted(by_prompt.get(pid, []))
        samples.extend(found[(pid, seed)] for seed in have)
        gaps = [seed for seed in union if seed not in have] if shared else [None] * (per_prompt - len(have))
        for seed in gaps:
            missing.append(video_name(pid, seed) if seed is not None else f"{pid}_?.mp4")
            samples.append(EvalSample(prompt_id=pid, seed=seed, type=row["type"], status=Status.UNSCORED,
                                      dsr=float("nan")))
    for what, names in (("videos are missing (they count as unscored samples)", missing),
                        ("files repeat a (prompt, seed) that another file has (ignored)", duplicates),
                        ("videos changed after they were scored; they count as unscored until scored again", stale)):
        if names:
            log.warning("%d %s: %s", len(names), what, ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""))
    notes = {
        "missing_videos": missing,
        "duplicate_videos": duplicates,
        "videos_changed_since_scored": stale,
        "videos_without_prompt_row": unmatched,
        "prompts_without_videos": [r["prompt_id"] for r in prompts if r["prompt_id"] not in by_prompt],
    }
    return samples, notes


def quality_report(samples: Sequence[EvalSample], metrics: Mapping[str, QualityMetric],
                   progress: bool = True) -> dict[str, Any]:
    """Mean of each quality metric over the samples it applies to (finite values)."""
    values: dict[str, list[float]] = {name: [] for name in metrics}
    errors = 0
    usable = [s for s in samples if s.frames is not None and not s.status.is_failure]
    for sample in tqdm(usable, desc="quality", unit="video", disable=not progress, dynamic_ncols=True):
        name_of = video_name(sample.prompt_id, sample.seed or 0)
        try:
            frames = sample.frames()
        except Exception as e:
            log.error("%s: cannot load frames for the quality metrics: %s", name_of, e)
            errors += 1
            continue
        for name, metric in metrics.items():
            try:
                v = float(metric(frames, sample.boxes_animal))
            except Exception as e:
                log.error("%s: quality metric %s failed: %s", name_of, name, e)
                errors += 1
                continue
            if math.isfinite(v):
                values[name].append(v)
    out: dict[str, Any] = {}
    for name, vs in values.items():
        out[name] = {"mean": float(np.mean(vs)) if vs else float("nan"), "num_samples": len(vs)}
    out["errors"] = errors
    return out


def _quality_lines(quality: Mapping[str, Any]) -> str:
    """The quality metrics under the curve's table: one line each, mean and how many videos it covers."""
    lines = [f"{name}: {v['mean']:.4f} over {v['num_samples']} videos" for name, v in quality.items()
             if isinstance(v, dict)]
    if quality.get("errors"):
        lines.append(f"quality metric errors: {quality['errors']} (see the log)")
    return "".join("\n" + line for line in lines)


def evaluate_samples(samples: Sequence[EvalSample], out_dir: str | os.PathLike, *, label: str,
                     source: Mapping[str, Any], quality: Mapping[str, QualityMetric] | None = None,
                     quality_note: str | None = None, notes: Mapping[str, Any] | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Build, write and return the report; prints the Correctness@tau table."""
    if not samples:
        raise EvaluationError("there are no samples to evaluate: no video named {prompt_id}_{seed}.mp4 matches a "
                              "row of the prompt table, or the store has no samples")
    if not quality and all(s.status == Status.UNSCORED for s in samples):
        raise EvaluationError(f"none of the {len(samples)} samples is scored yet: run `python -m scoring score` first "
                              "(or, for a video folder, pass --detector and --tracker to evaluate)")
    out_dir = Path(out_dir)
    # Only a valid sample's score counts: a crash between the scorer's two writes can leave a score
    # whose status still says unscored.
    dsr = np.array([s.dsr if s.status == Status.VALID else math.nan for s in samples], np.float64)
    status = np.array([int(s.status) for s in samples])
    types = [s.type for s in samples]
    curve = correctness_curve(dsr, CORRECTNESS_TAUS)
    report: dict[str, Any] = {"label": label, "source": dict(source),
                              "dsr": dsr_report(dsr, status, types, curve=curve)}
    unscored = report["dsr"]["num_unscored"]
    if unscored:
        log.warning("%d of %d samples are not scored yet; they count as incorrect in Correctness@tau",
                    unscored, len(samples))
    if quality:
        report["quality"] = quality_report(samples, quality, progress=progress)
    else:
        report["quality"] = {"skipped": quality_note or "no quality model folders given (--dinov2, --clip)"}
    if notes:
        report["notes"] = dict(notes)
    report["samples"] = [
        {"prompt_id": s.prompt_id, "seed": s.seed, "type": s.type, "status": s.status.name, "dsr": float(d)}
        for s, d in zip(samples, dsr)
    ]
    table = correctness_table({label: curve}) + _quality_lines(report["quality"])
    print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "correctness.txt", table + "\n")
    plot_correctness({label: curve}, out_dir / "correctness.png")
    write_json_atomic(out_dir / "report.json", report)
    return report
