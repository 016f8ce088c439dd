"""The DSR-Dataset generator: train and test prompt tables for dynamic spatial relations (SPEC section 2).

A seeded draw over animals x their motion verbs x objects x scenes x the six DSR types, read from an
editable vocabulary (``configs/dsr_vocabulary.yaml``), balanced over the types and disjoint between
train and test; a published test CSV can stand in for the drawn test set, and a "from ... to ..."
rephrasing gives the generalisation variant. Modules: `vocabulary` (the file and its checks),
`generate` (the draw), `cli` (``python -m spatialalign_jax.dataset``).

Standard library, numpy and yaml over `spatialalign_jax.common` only (tests/layering.py checks it), so
the loop, the scorer's side and a laptop without JAX can all run it.
"""

from .generate import COLUMNS, DatasetError, from_to_prompt, generate, rephrase_from_to, type_counts
from .vocabulary import DEFAULT_VOCABULARY, Vocabulary, VocabularyError, load_vocabulary, parse_vocabulary

__all__ = ["COLUMNS", "DEFAULT_VOCABULARY", "DatasetError", "Vocabulary", "VocabularyError", "from_to_prompt",
           "generate", "load_vocabulary", "parse_vocabulary", "rephrase_from_to", "type_counts"]
