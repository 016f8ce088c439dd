#!/usr/bin/env python
"""Train a Wan2.1 LoRA with SpatialAlign's DPO + zeroth-order objective.

    python run_train.py                                   # the embedded smoke run (configs/tiny.yaml)
    python run_train.py --config configs/wan2.1_t2v_1.3b.yaml --mesh data=1,fsdp=4 [--set key=value ...]

A run folder that already holds checkpoints is resumed from its latest one. On a cluster, start one
process per host. Under SLURM, Open MPI or on a TPU pod JAX finds its peers itself; elsewhere set
JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID in each
process's environment.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _launched_multi_host() -> bool:
    env = os.environ
    return ("JAX_COORDINATOR_ADDRESS" in env or int(env.get("SLURM_NTASKS", 1)) > 1
            or int(env.get("OMPI_COMM_WORLD_SIZE", 1)) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config YAML (default: configs/tiny.yaml, the smoke run)")
    parser.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=4 (product = number of devices)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=10 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to the run dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("absl", "jax._src.xla_bridge"):  # Orbax narrates every save at INFO
        logging.getLogger(chatty).setLevel(logging.WARNING)

    from spatialalign_jax.train.run_config import DEFAULT_CONFIG_PATH, RunConfigError, load_run_config

    try:
        rc = load_run_config(args.config or DEFAULT_CONFIG_PATH, args.overrides, mesh=args.mesh)
    except (RunConfigError, FileNotFoundError) as e:
        parser.error(str(e))
    if _launched_multi_host():
        import jax

        env = os.environ  # JAX reads the coordinator's address itself, but not the process count and index
        explicit = {}
        for arg, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
            if var in env:
                if not env[var].isdigit():
                    parser.error(f"{var}={env[var]!r} must be a whole number")
                explicit[arg] = int(env[var])
        jax.distributed.initialize(**explicit)

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
