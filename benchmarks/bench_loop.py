"""Wall time of every stage of the real-model loop on tiny random models.

    python -m benchmarks.bench_loop [--root runs/bench_loop] [--scorers 2] [--out benchmarks/results/loop_tiny.json]

Runs ``python run_train.py --config configs/wan2.1_t2v_1.3b.yaml --set loop.enabled=true`` with every
path pointed at tiny random models saved by the test builders (tests/tiny_loop.py: a diffusers Wan
transformer, AutoencoderKLWan, umT5, Grounding DINO, SAM 2 video; 4 training prompts x 3 samples, 2
test prompts x 2 seeds, 2 sampling steps, latents 4 x 6 x 8 x 8 decoded to 21 frames of 64 x 64).
Random detectors label no video valid, so the first command stops at ``train``; labels standing in
for a reward model are then written into the training store and the command is rerun, as
tests/test_loop_models.py does. Prints each stage's seconds from ``RUN/stages.json`` and writes them,
with both commands' wall times and the machine, to ``--out``.

What the numbers show at this size is the loop's fixed cost: process start-up, model loading and
compilation (each scoring subprocess imports torch and loads its models), not the models' work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the tiny model builders live with the tests

import tiny_loop  # noqa: E402

from spatialalign_jax.common.atomic import write_text_atomic  # noqa: E402


def _timed(sets: list[str]) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    result = tiny_loop.run(sets, timeout=3600)
    return result.returncode, round(time.perf_counter() - t0, 1), result.stdout + result.stderr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=REPO / "runs" / "bench_loop",
                   help="models, prompts and the run folder go here (emptied first)")
    p.add_argument("--scorers", type=int, default=2, help="loop.scorers")
    p.add_argument("--train-steps", type=int, default=6)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "loop_tiny.json")
    args = p.parse_args(argv)

    if args.root.exists():
        shutil.rmtree(args.root)
    t0 = time.perf_counter()
    models = tiny_loop.build_models(args.root / "models")
    train_csv, test_csv = tiny_loop.write_prompts(args.root / "prompts")
    build_seconds = round(time.perf_counter() - t0, 1)
    run = args.root / "run"
    sets = tiny_loop.overrides(run, models, train_csv, test_csv, scorers=args.scorers, train_steps=args.train_steps)

    code, first_wall, out = _timed(sets)
    if code != 1 or "no prompt has a usable pair" not in out:  # random detectors: no pair to train on
        print(out[-5000:])
        raise SystemExit(f"the first command should stop at train with no usable pair (exit {code})")
    tiny_loop.write_stand_in_labels(run / "data" / "train")
    code, second_wall, out = _timed(sets)
    if code != 0:
        print(out[-5000:])
        raise SystemExit(f"the rerun failed (exit {code})")

    done = json.loads((run / "stages.json").read_text())["done"]
    stages = {name: record["seconds"] for name, record in done.items()}
    width = max(map(len, stages))
    print(f"\nstage{' ' * (width - 5)}  seconds")
    for name, seconds in stages.items():
        print(f"{name:<{width}}  {seconds:7.1f}")
    print(f"{'total':<{width}}  {sum(stages.values()):7.1f}  (commands: {first_wall:.0f} s to the no-pair stop, "
          f"{second_wall:.0f} s from train to the report; models built in {build_seconds:.0f} s)")

    import jax
    import torch

    result = {
        "device": f"CPU ({os.cpu_count()} cores, {platform.machine()})",
        "what": "configs/wan2.1_t2v_1.3b.yaml's loop on tiny random models (tests/tiny_loop.py); stage seconds "
                "from RUN/stages.json; stages up to score are from the first command, the rest from the rerun "
                "after stand-in labels",
        "settings": {"train_prompts": 4, "test_prompts": 2, "samples_per_prompt": 3, "test_seeds": [0, 1],
                     "latent_shape": list(tiny_loop.LATENT_SHAPE), "sample_steps": 2, "train_steps": args.train_steps,
                     "scorers": args.scorers, "omp_num_threads": 1},
        "stage_seconds": stages,
        "total_stage_seconds": round(sum(stages.values()), 1),
        "command_wall_seconds": {"to_no_pair_stop": first_wall, "train_to_report": second_wall},
        "model_build_seconds": build_seconds,
        "load_average_1min_at_end": os.getloadavg()[0],
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
