"""The JAX model: the Wan2.1 transformer in Flax NNX, its config, attention, LoRA, parameter naming,
sharding rules and the converted-checkpoint format (Orbax).

Imports ``spatialalign_jax.common`` only of the project: no sampling, training or converters (which
sit above it; tests/layering.py checks it).
"""
