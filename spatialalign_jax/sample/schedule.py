"""The flow-matching noise schedule of Wan2.1: the one place that defines sigma and the timestep.

Training (SPEC section 5)::

    s      = linspace(1, 0, 1001)[:-1]               # 1.000, 0.999, ..., 0.001
    sigma  = shift * s / (1 + (shift - 1) * s)       # shift 5
    t      = 1000 * sigma                            # what the transformer's time embedding sees
    x_t    = (1 - sigma) * x0 + sigma * eps
    v      = eps - x0                                # the velocity target

This equals diffusers' ``FlowMatchEulerDiscreteScheduler(shift=5).sigmas`` / ``.timesteps``.

Sampling: the sigma / timestep sequences of diffusers' two schedulers used with Wan, so the JAX
sampler walks exactly the points diffusers' ``WanPipeline`` does:

- ``euler_sampling_schedule``: ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(N)``.
  Note that diffusers applies the shift twice here (once to the training table whose end point
  becomes ``sigma_min``, once more in ``set_timesteps``); reproduced as is.
- ``unipc_sampling_schedule``: ``UniPCMultistepScheduler(prediction_type="flow_prediction",
  use_flow_sigmas=True, flow_shift=shift).set_timesteps(N)`` (the scheduler Wan's diffusers
  checkpoints ship), with its integer timesteps and its 1e-6 nudge of a first sigma of 1.

The array functions (``add_noise``, ``velocity_target``, ``timesteps_for``) are plain arithmetic
and work on numpy and jax arrays alike; the tables are numpy (host side).
"""

from __future__ import annotations

from typing import Any

import numpy as np

SHIFT = 5.0
NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(s: Any, shift: float = SHIFT) -> Any:
    """The resolution shift ``shift*s / (1 + (shift-1)*s)``, which spends more steps at high noise."""
    return shift * s / (1 + (shift - 1) * s)


def sigmas(shift: float = SHIFT, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """The training table: ``num_train_timesteps`` sigmas, index 0 the noisiest (sigma = 1), float32."""
    s = np.linspace(1.0, 0.0, num_train_timesteps + 1)[:-1]
    return shift_sigmas(s, shift).astype(np.float32)


def timesteps_for(sigma: Any, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Any:
    """The timestep the transformer is conditioned on for a given sigma (``1000 * sigma``)."""
    return sigma * num_train_timesteps


def _per_sample(sigma: Any, ndim: int) -> Any:
    """Reshapes a (B,) sigma to (B, 1, ..., 1) so it broadcasts over a (B, ...) latent; scalars pass."""
    if np.ndim(sigma) == 0:
        return sigma
    if np.ndim(sigma) != 1:
        raise ValueError(f"sigma must be a scalar or a (batch,) vector, got shape {np.shape(sigma)}")
    return sigma.reshape((-1,) + (1,) * (ndim - 1))


def add_noise(x0: Any, eps: Any, sigma: Any) -> Any:
    """``x_t = (1 - sigma) x0 + sigma eps``; sigma is a scalar or one value per sample (axis 0)."""
    sigma = _per_sample(sigma, x0.ndim)
    return (1 - sigma) * x0 + sigma * eps


def velocity_target(x0: Any, eps: Any) -> Any:
    """The flow-matching target ``v = eps - x0`` (what the transformer predicts)."""
    return eps - x0


def sample_sigma(key: Any, batch_size: int, *, per_pair: bool = False, shift: float = SHIFT,
                 num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Any:
    """Draws training sigmas (batch_size,) as jax arrays: index k uniform in 0..T-1 from the table.

    One k shared by the whole batch (SPEC default) or, with ``per_pair``, one per pair (winner and
    loser of a pair always share it).
    """
    import jax
    import jax.numpy as jnp

    table = jnp.asarray(sigmas(shift, num_train_timesteps))
    shape = (batch_size,) if per_pair else (1,)
    k = jax.random.randint(key, shape, 0, num_train_timesteps)
    return jnp.broadcast_to(table[k], (batch_size,))


def euler_sampling_schedule(num_inference_steps: int, shift: float = SHIFT,
                            num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[np.ndarray, np.ndarray]:
    """``(sigmas (N+1,), timesteps (N,))`` of diffusers' ``FlowMatchEulerDiscreteScheduler``.

    ``sigmas`` ends with the terminal 0; step i moves from ``sigmas[i]`` to ``sigmas[i+1]``.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    # diffusers builds the training table in float32 and reads its ends as sigma_max / sigma_min.
    train_t = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1]
    train_sigmas = shift_sigmas(train_t / num_train_timesteps, shift).astype(np.float32)
    sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])
    t = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_inference_steps)
    s = shift_sigmas(t / num_train_timesteps, shift).astype(np.float32)
    timesteps = s * np.float32(num_train_timesteps)
    return np.concatenate([s, np.zeros(1, np.float32)]), timesteps


def unipc_sampling_schedule(num_inference_steps: int, shift: float = SHIFT,
                            num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[np.ndarray, np.ndarray]:
    """``(sigmas (N+1,), timesteps (N,) int64)`` of diffusers' flow ``UniPCMultistepScheduler``.

    As diffusers does: sigmas ``linspace(1, 1/T, N+1)[:-1]`` shifted, the first nudged below 1 by
    1e-6 (UniPC takes ``log(1 - sigma)``), the terminal sigma 0, timesteps truncated to integers.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    s = np.linspace(1, 1 / num_train_timesteps, num_inference_steps + 1)[:-1]
    s = shift_sigmas(s, shift)
    if abs(s[0] - 1) < 1e-6:
        s[0] -= 1e-6
    timesteps = (s * num_train_timesteps).astype(np.int64)
    return np.concatenate([s, [0.0]]).astype(np.float32), timesteps
