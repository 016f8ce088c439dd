"""DSR prompt tables in the published CSV formats (SPEC section 2).

The reader lives in the bottom layer, `spatialalign_jax.common.prompt_table`, so that the dataset
generator reads published CSVs with the same rules; this module keeps the scorer's import path.
"""

from spatialalign_jax.common.prompt_table import PromptTableError, load_prompt_csv

__all__ = ["PromptTableError", "load_prompt_csv"]
