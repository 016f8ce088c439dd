"""``python -m spatialalign_jax.dataset``: see ``spatialalign_jax.dataset.cli``."""

import sys

from spatialalign_jax.dataset.cli import main

if __name__ == "__main__":
    sys.exit(main())
