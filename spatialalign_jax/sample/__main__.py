"""``python -m spatialalign_jax.sample``: see ``spatialalign_jax.sample.cli``."""

import sys

from spatialalign_jax.sample.cli import main

if __name__ == "__main__":
    sys.exit(main())
