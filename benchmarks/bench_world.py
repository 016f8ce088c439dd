"""The synthetic-world result: `python run_train.py`'s cycle over several seeds, and the ablations.

    python -m benchmarks.bench_world [--seeds 0,1,2] [--ablations] [--rounds K] [--out benchmarks/results/world.json]

For each seed, runs the default cycle (configs/world.yaml) in runs/bench_world/seed{s} with
``loop.seed=s`` (the training prompts' scenes and verbs, the training samples' seeds) and
``train.seed=s`` (pair draws, noise, timesteps); prints Correctness@0.7 of the reference and the
fine-tuned model on the held-out prompts, the gain's mean and spread, the valid rates and the wall time
of every stage. ``--ablations`` then trains the variants of the paper's Table 3 on seed 0's samples
(``loop.reuse``: the same training store and reference test samples) and prints the same table.
``--rounds K`` continues the first seed's cycle to K on-policy rounds (``loop.rounds``) and prints
Correctness@0.7 and the valid rate per round. Results (and the per-stage times) are written to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# name -> config overrides, against the method (DPO + zeroth-order regulariser, tau 0.7)
ABLATIONS = {
    "DPO + ZO (the method)": [],
    "DPO, no regulariser": ["loss.kind=dpo"],
    "DPO + SFT": ["loss.kind=dpo_sft"],
    "SFT, top-2": ["loss.kind=sft"],
    "DPO, random pairs": ["loss.kind=dpo_random_pairs"],
    "tau_train 0.6": ["data.tau=0.6"],
    "tau_train 0.8": ["data.tau=0.8"],
}


def run_cycle(run_dir: Path, overrides: list[str]) -> dict:
    sets = [a for kv in overrides + [f"run.dir={run_dir}"] for a in ("--set", kv)]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "run_train.py", "--no-progress", *sets], cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"cycle in {run_dir} failed (exit {result.returncode}); rerun to resume it")
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    results = json.loads((run_dir / "report" / "results.json").read_text())
    stages = json.loads((run_dir / "stages.json").read_text())["done"]
    return {"summary": summary, "stage_seconds": {k: v["seconds"] for k, v in stages.items()},
            "wall_seconds": round(time.perf_counter() - start, 1),
            "per_model": {k: {"correctness@0.7": v["correctness"]["0.7"], "valid_rate": v["valid_rate"]}
                          for k, v in results.items()}}


def _c7(summary: dict, model: str) -> float:
    return summary[model]["correctness"]["0.7"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ablations", action="store_true")
    p.add_argument("--rounds", type=int, default=1, help="continue the first seed's cycle to this many rounds")
    p.add_argument("--root", type=Path, default=REPO / "runs" / "bench_world")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "world.json")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = json.loads(args.out.read_text()) if args.out.is_file() else {}

    cycles = {}
    for s in seeds:
        cycles[s] = run_cycle(args.root / f"seed{s}", [f"loop.seed={s}", f"train.seed={s}"])
    if cycles:
        gains = [_c7(c["summary"], "finetuned") - _c7(c["summary"], "reference") for c in cycles.values()]
        print("\nseed  reference C@0.7  fine-tuned C@0.7  gain    valid (ref / ft)  wall")
        for s, c in cycles.items():
            sm = c["summary"]
            print(f"{s:<5} {_c7(sm, 'reference'):>15.3f} {_c7(sm, 'finetuned'):>17.3f} "
                  f"{_c7(sm, 'finetuned') - _c7(sm, 'reference'):+7.3f}   "
                  f"{sm['reference']['valid_rate']:.3f} / {sm['finetuned']['valid_rate']:.3f}   {c['wall_seconds']:.0f} s")
        spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
        print(f"gain: mean {statistics.mean(gains):+.3f}, std {spread:.3f}, min {min(gains):+.3f} over {len(gains)} seeds")
        stages = list(next(iter(cycles.values()))["stage_seconds"])
        print("stage seconds (mean over seeds): " + ", ".join(
            f"{k} {statistics.mean(c['stage_seconds'][k] for c in cycles.values()):.0f}" for k in stages))
        out.setdefault("cycles", {}).update({str(s): c for s, c in cycles.items()})  # other seeds' records stay
        everyone = {int(s): c for s, c in out["cycles"].items()}
        gains = [_c7(c["summary"], "finetuned") - _c7(c["summary"], "reference") for c in everyone.values()]
        out["gain"] = {"mean": statistics.mean(gains), "std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
                       "min": min(gains), "seeds": sorted(everyone)}

    if args.rounds > 1:
        s = seeds[0]
        c = run_cycle(args.root / f"seed{s}", [f"loop.seed={s}", f"train.seed={s}", f"loop.rounds={args.rounds}"])
        print(f"\nseed {s}      C@0.7   valid rate")
        for name, m in c["per_model"].items():
            print(f"{name:<12} {m['correctness@0.7']:.3f}   {m['valid_rate']:.3f}")
        out["rounds"] = {str(s): {"per_model": c["per_model"], "stage_seconds": c["stage_seconds"]}}

    if args.ablations:
        base = args.root / f"seed{seeds[0]}"
        rows = {}
        for name, overrides in ABLATIONS.items():
            run_dir = base if not overrides else args.root / ("ablation_" + "_".join(o.replace("=", "-") for o in overrides))
            extra = [] if not overrides else [f"loop.seed={seeds[0]}", f"train.seed={seeds[0]}", f"loop.reuse={base}"]
            rows[name] = run_cycle(run_dir, overrides + extra)["summary"]
        print("\nablation                 C@0.7   valid rate")
        ref = next(iter(rows.values()))["reference"]
        print(f"{'reference (no training)':<24} {ref['correctness']['0.7']:.3f}   {ref['valid_rate']:.3f}")
        for name, sm in rows.items():
            print(f"{name:<24} {_c7(sm, 'finetuned'):.3f}   {sm['finetuned']['valid_rate']:.3f}")
        out["ablations"] = {"reference": ref, **{k: v["finetuned"] for k, v in rows.items()}}

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
