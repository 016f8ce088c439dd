"""Weight converters between diffusers / original Wan checkpoints and the Flax model (SPEC section 7)."""
