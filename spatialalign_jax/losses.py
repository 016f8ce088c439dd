"""Public contract: SPEC names ``spatialalign_jax.losses.preference_loss``; this re-exports ``spatialalign_jax.train.losses``."""

from spatialalign_jax.train.losses import (LOSS_KINDS, PAIRING, check_kind, flow_matching_loss,  # noqa: F401
                                           pairing_for, per_sample_mse, preference_loss)
