"""The loop's report: reference against fine-tuned on the held-out prompts, as the paper's Table 2
and Figure 7a compare them.

Writes into ``RUN/report/``:

- ``summary.json``: ``{"reference": {"correctness": {"0.0": ..., ..., "0.9": ...}, "valid_rate": ...},
  "finetuned": {...}}`` and nothing else (the interface scripts read);
- ``report.md``: the Correctness@tau table, Correctness@0.7 per DSR type, invalid videos by reason
  (ID consistency and CLIP-IQA come from ``python -m scoring evaluate``, which the report names);
- ``correctness.png``: both Correctness@tau curves; ``samples.png``: the same prompts and seeds,
  reference above fine-tuned, one column per frame step.

With ``loop.rounds`` > 1 the fine-tuned model of ``summary.json`` is the last round's; ``results.json``,
the tables and the curves hold every round ("round 1", "round 2", ...), and ``report.md`` adds
Correctness@0.7 per round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from scoring.dsr import CORRECTNESS_TAUS, correctness_curve  # numpy only: the loop layer reads the scorer's measures in-process
from scoring.metrics import correctness_by_type, plot_correctness, status_counts
from spatialalign_jax.common.atomic import atomic_path, write_text_atomic
from spatialalign_jax.common.dsr_types import DSR_TYPES
from spatialalign_jax.common.store import Store
from spatialalign_jax.common.store_layout import Status

HEADLINE = "0.7"


def models(paths) -> dict[str, tuple[Any, str]]:
    """{label: (the round's LoopPaths, store name)} of the models the report compares: the reference
    and the fine-tuned one, or the reference and every round up to ``paths.round``."""
    out = {"reference": (paths.at_round(1), "test_reference")}
    if paths.round == 1:
        out["finetuned"] = (paths, "test_finetuned")
    else:
        out.update({f"round {r}": (paths.at_round(r), "test_finetuned") for r in range(1, paths.round + 1)})
    return out


def store_results(store: Store) -> dict[str, Any]:
    """Correctness@tau (invalid and unscored samples count in the denominator, SPEC 3), the valid
    rate, Correctness@0.7 per type and the invalid samples per reason: the scorer's own measures
    (``scoring.dsr``, ``scoring.metrics``: numpy only) on one store."""
    dsr = store.read_dsr().astype(np.float64)
    status = store.read_status()
    types = np.array([row["type"] for row in store.prompts])[:, None].repeat(dsr.shape[1], 1)
    valid = (status == Status.VALID) & np.isfinite(dsr)
    return {
        "correctness": {f"{t:.1f}": v for t, v in correctness_curve(dsr).items()},
        "valid_rate": float(valid.mean()),
        "by_type": correctness_by_type(dsr, types.ravel()),
        "invalid": status_counts(status[~valid]),
        "num_samples": int(dsr.size),
    }


def _table(results: Mapping[str, Mapping[str, Any]]) -> str:
    names = list(results)
    lines = ["| tau | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t in CORRECTNESS_TAUS:
        key = f"{t:.1f}"
        lines.append(f"| {key} | " + " | ".join(f"{100 * results[n]['correctness'][key]:.1f}%" for n in names) + " |")
    return "\n".join(lines)


def _by_type(results: Mapping[str, Mapping[str, Any]]) -> str:
    names = list(results)
    lines = ["| type | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t in DSR_TYPES:
        if all(t in results[n]["by_type"] for n in names):
            lines.append(f"| {t} | " + " | ".join(f"{100 * results[n]['by_type'][t]:.1f}%" for n in names) + " |")
    return "\n".join(lines)


def _invalid(results: Mapping[str, Mapping[str, Any]]) -> str:
    lines = []
    for name, r in results.items():
        reasons = ", ".join(f"{k} {v}" for k, v in r["invalid"].items()) or "none"
        lines.append(f"- {name}: {sum(r['invalid'].values())} of {r['num_samples']} invalid ({reasons})")
    return "\n".join(lines)


QUALITY_NOTE = ("ID consistency and CLIP-IQA: not computed by the loop (the synthetic world has no models for "
                "them); for real videos run `python -m scoring evaluate --store RUN/data/test_reference --mp4-dir "
                "RUN/report/mp4/test_reference --dinov2 DINOV2 --clip CLIP --out ...`, and the same for test_finetuned.")


def save_strip(rows: list[np.ndarray], labels: list[str], path: Path, scale: int = 3) -> None:
    """Stacks (H, W*k, 3) uint8 rows into one PNG, each row with its label in the margin."""
    from PIL import Image, ImageDraw

    strip = np.concatenate(rows, axis=0)
    strip = np.kron(strip, np.ones((scale, scale, 1), np.uint8))
    margin = 150
    canvas = Image.new("RGB", (strip.shape[1] + margin, strip.shape[0]), (255, 255, 255))
    canvas.paste(Image.fromarray(strip), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    row_h = strip.shape[0] // len(rows)
    for i, label in enumerate(labels):
        draw.text((4, i * row_h + row_h // 2 - 10), label, fill=(0, 0, 0))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def sample_strip(compared: Mapping[str, tuple[Any, str]], frames_for, path: Path, num_prompts: int = 4,
                 frame_step: int = 4) -> None:
    """samples.png: for the first test prompts at their first seed, one row per compared model."""
    rows, labels = [], []
    first_paths, first_name = next(iter(compared.values()))
    ref = Store.open(first_paths.store(first_name))
    for p in range(min(num_prompts, ref.num_prompts)):
        row = ref.prompts[p]
        for label, (at, name) in compared.items():
            frames = frames_for(at, name, p, 0)
            if frames is None:
                return
            rows.append(np.concatenate(list(frames[::frame_step]), axis=1))
            labels.append(f"{row['type']} {row['animal']}/{row['object']}\n{label}")
    if rows:
        save_strip(rows, labels, path)


def _rounds(results: Mapping[str, Mapping[str, Any]]) -> str:
    lines = ["| model | Correctness@0.7 | valid rate |", "|---|---|---|"]
    lines += [f"| {name} | {100 * r['correctness'][HEADLINE]:.1f}% | {100 * r['valid_rate']:.1f}% |"
              for name, r in results.items()]
    return "\n".join(lines)


def write_report(rc, paths, frames_for=None) -> dict[str, dict[str, Any]]:
    compared = models(paths)
    results = {label: store_results(Store.open(at.store(name))) for label, (at, name) in compared.items()}
    last = list(results)[-1]
    summary = {name: {"correctness": results[key]["correctness"], "valid_rate": results[key]["valid_rate"]}
               for name, key in (("reference", "reference"), ("finetuned", last))}
    report = paths.report
    report.mkdir(parents=True, exist_ok=True)
    write_text_atomic(report / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(report / "results.json", json.dumps(results, indent=2) + "\n")
    plot_correctness({name: {float(t): v for t, v in r["correctness"].items()} for name, r in results.items()},
                     report / "correctness.png", title=f"{rc.run.name}: held-out prompts")
    if frames_for is not None:
        strip = {k: compared[k] for k in ("reference", last)}
        sample_strip(strip, frames_for, report / "samples.png")
    ref, ft = (summary[n]["correctness"][HEADLINE] for n in ("reference", "finetuned"))
    which = "fine-tuned" if paths.round == 1 else f"fine-tuned (round {paths.round})"
    md = [f"# {rc.run.name}: reference vs fine-tuned on the held-out prompts", "",
          f"Correctness@0.7: reference {100 * ref:.1f}%, {which} {100 * ft:.1f}% ({100 * (ft - ref):+.1f} points); "
          f"{results['reference']['num_samples']} samples each (prompts x seeds), invalid ones counted as failures.", ""]
    if paths.round > 1:
        md += ["## Rounds", "", "Round r samples its training prompts with round r-1's fine-tuned model and trains on "
               "them with that model as DPO's reference (`loop.rounds`).", "", _rounds(results), ""]
    md += ["## Correctness@tau", "", _table(results), "", "## Correctness@0.7 by DSR type", "", _by_type(results), "",
           "## Invalid videos", "", _invalid(results), "", "## Quality", "", QUALITY_NOTE, "",
           "![Correctness@tau](correctness.png)", ""]
    if (report / "samples.png").is_file():
        md += ["![reference vs fine-tuned, same prompts and seeds](samples.png)", ""]
    write_text_atomic(report / "report.md", "\n".join(md))
    return summary
