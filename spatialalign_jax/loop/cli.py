"""``spatialalign`` (and ``python run_train.py``): the SpatialAlign loop, or training alone.

    python run_train.py                                   # the synthetic-world loop (configs/world.yaml)
    spatialalign run --config configs/world.yaml [--from STAGE] [--until STAGE] [--set key=value ...]
    spatialalign run --rounds 3                           # three on-policy rounds (loop.rounds)
    spatialalign status --config CONFIG                   # which stages are done, with their times
    python run_train.py --config configs/wan2.1_t2v_1.3b.yaml --mesh data=1,fsdp=4 [--set key=value ...]

A config with ``loop.enabled: true`` runs the whole loop as resumable stages in ``run.dir``
(``spatialalign_jax.loop.cycle``): a rerun continues where the last one stopped. Without it, the
config trains a LoRA on an existing store (``data.store``); a run folder that already holds
checkpoints is resumed from its latest one. On a cluster, start one process per host. Under SLURM,
Open MPI or on a TPU pod JAX finds its peers itself; elsewhere set JAX_COORDINATOR_ADDRESS (host:port
of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID in each process's environment.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

COMMANDS = ("run", "status")


def _launched_multi_host() -> bool:
    env = os.environ
    return ("JAX_COORDINATOR_ADDRESS" in env or int(env.get("SLURM_NTASKS", 1)) > 1
            or int(env.get("OMPI_COMM_WORLD_SIZE", 1)) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def _init_distributed(parser: argparse.ArgumentParser) -> None:
    import jax

    env = os.environ  # JAX reads the coordinator's address itself, but not the process count and index
    explicit = {}
    for arg, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if var in env:
            if not env[var].isdigit():
                parser.error(f"{var}={env[var]!r} must be a whole number")
            explicit[arg] = int(env[var])
    jax.distributed.initialize(**explicit)


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config YAML (default: configs/world.yaml, the synthetic-world loop)")
    parser.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=4 (product = number of devices)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=10 (repeatable)")
    parser.add_argument("--from", dest="start", metavar="STAGE", help="loop: rerun from this stage on")
    parser.add_argument("--until", metavar="STAGE", help="loop: stop after this stage")
    parser.add_argument("--status", action="store_true", help="loop: print which stages are done and exit")
    parser.add_argument("--rounds", type=int, metavar="K",
                        help="loop: K on-policy rounds, each sampling with the last one's fine-tuned model "
                             "(loop.rounds; a finished run continues with the rounds it lacks)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to the run dir)")
    return parser


def main(argv: list[str] | None = None, prog: str = "spatialalign") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if prog == "spatialalign":  # the console script takes a command first: run (default) or status
        command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
        if command == "status":
            argv.append("--status")
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("absl", "jax._src.xla_bridge"):  # Orbax narrates every save at INFO
        logging.getLogger(chatty).setLevel(logging.WARNING)

    from spatialalign_jax.train.run_config import DEFAULT_CONFIG_PATH, RunConfigError, load_run_config

    if args.rounds is not None:
        args.overrides.append(f"loop.rounds={args.rounds}")
    if args.no_progress:
        args.overrides.append("loop.progress=false")
    try:
        rc = load_run_config(args.config or DEFAULT_CONFIG_PATH, args.overrides, mesh=args.mesh)
    except (RunConfigError, FileNotFoundError) as e:
        parser.error(str(e))
    loop_flags = [f for f, v in (("--from", args.start), ("--until", args.until), ("--status", args.status),
                                 ("--rounds", args.rounds)) if v]
    if loop_flags and not rc.loop.enabled:
        parser.error(f"{loop_flags[0]} is for the loop's stages; this config trains only (set loop.enabled: true "
                     "to run the whole loop)")
    if _launched_multi_host():
        _init_distributed(parser)
    if rc.loop.enabled:
        return _run_loop(rc, args)
    return _train(rc, args)


def _run_loop(rc, args: argparse.Namespace) -> int:
    # The scoring subprocesses share the GPUs with this process: JAX must not reserve most of their memory
    # up front, as it does by default (read when the backend starts, so before any array exists).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from spatialalign_jax.loop.cycle import build_runner
    from spatialalign_jax.loop.stages import StageError
    from spatialalign_jax.train.trainer import NonFiniteLoss, RunDirBusy

    runner = build_runner(rc)
    if args.status:
        print(f"{rc.run.dir}:\n{runner.status()}")
        return 0
    try:
        runner.run(start=args.start, until=args.until)
    except (StageError, NonFiniteLoss, RunDirBusy, FloatingPointError, FileNotFoundError, ValueError) as e:
        print(f"{rc.run.name}: error: {e}", file=sys.stderr)
        print(f"stages ({rc.run.dir}):\n{runner.status()}", file=sys.stderr)
        return 1
    summary = runner.run_dir / "report" / "summary.json"
    if summary.is_file() and (args.until is None or args.until == runner.stages[-1].name):
        print((runner.run_dir / "report" / "report.md").read_text())
        print(f"summary.json ({summary}):\n{summary.read_text()}")
    print(f"stages ({rc.run.dir}):\n{runner.status()}")
    return 0


def _train(rc, args: argparse.Namespace) -> int:
    from spatialalign_jax.train.trainer import NonFiniteLoss, RunDirBusy, train

    try:
        summary = train(rc, progress=not args.no_progress)
    except (NonFiniteLoss, RunDirBusy, FloatingPointError, FileNotFoundError, ValueError) as e:
        print(f"run_train: error: {e}", file=sys.stderr)
        return 1
    if "loss" not in summary:  # no step ran: the run had already reached train.steps
        print(f"nothing to do: {rc.run.dir} is already at step {summary['step']} (train.steps={rc.train.steps}); "
              "raise train.steps to train on")
        return 0
    print(f"finished at step {summary['step']}: " + ", ".join(
        f"{k}={summary[k]:.4g}" for k in ("loss", "margin", "reward_accuracy", "lr") if k in summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
