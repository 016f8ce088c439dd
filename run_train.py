#!/usr/bin/env python
"""The SpatialAlign loop, or LoRA training alone (``spatialalign_jax.loop.cli``; ``spatialalign`` is the
same command once the package is installed).

    python run_train.py                                   # the synthetic-world loop (configs/world.yaml)
    python run_train.py --config configs/tiny.yaml        # the smoke run: training alone on a random store
    python run_train.py --config configs/wan2.1_t2v_1.3b.yaml --mesh data=1,fsdp=4 [--set key=value ...]
    python run_train.py --status | --from STAGE | --until STAGE
"""

import sys

from spatialalign_jax.loop.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="run_train.py"))
