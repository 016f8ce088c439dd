"""Training: the losses, the jitted sharded step, the winner/loser pair sampler, the loop, the run's
config, checkpoints and metrics (``python run_train.py``).

Imports ``common``, ``model``, ``converters`` and ``sample``.
"""
