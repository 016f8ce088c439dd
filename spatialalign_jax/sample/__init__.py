"""Sampling: the flow-matching schedule, the CFG sampler (Euler, UniPC) and the CLI that samples into a
store (``python -m spatialalign_jax.sample``, code in ``cli.py``).

Imports ``common``, ``model`` and ``converters``; the trainer reaches ``schedule`` from above.
"""
