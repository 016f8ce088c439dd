"""Full-parameter flow-matching pretraining of the Wan transformer (how a base model is made).

SpatialAlign fine-tunes a pretrained text-to-video model; the synthetic world needs one of its own,
and this is its training: every parameter, the plain flow-matching loss of SPEC section 5
(``mean (v_model(x_t) - (eps - x0))^2``, sigma from the schedule's table at a uniform index, one
per sample), AdamW with warm-up and cosine decay. Batches come from any iterator of
``(latents (B, C, F, H, W), text (B, L, D))``, or of ``(latents, text, noise)`` where the data source
couples each video with its noise (e.g. an optimal-transport coupling: ``noise`` must still be
standard normal on its own); otherwise the noise is drawn independently here.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from spatialalign_jax.model.transformer import WanTransformer3DModel
from spatialalign_jax.sample import schedule


def make_optimizer(model: WanTransformer3DModel, *, lr: float, steps: int, warmup: int,
                   weight_decay: float = 0.01) -> nnx.Optimizer:
    lr_fn = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=lr * 0.01)
    return nnx.Optimizer(model, optax.adamw(lr_fn, weight_decay=weight_decay), wrt=nnx.Param)


def make_step(shift: float) -> Callable:
    """The jitted step ``(model, optimizer, x0, text, key, eps=None) -> loss``; updates both in place.
    ``eps``: the noise coupled with ``x0``; None draws it from ``key``."""
    table = jnp.asarray(schedule.sigmas(shift))

    @nnx.jit
    def step(model: WanTransformer3DModel, optimizer: nnx.Optimizer, x0: jax.Array, text: jax.Array,
             key: jax.Array, eps: jax.Array | None = None) -> jax.Array:
        k_sigma, k_eps = jax.random.split(key)
        sigma = table[jax.random.randint(k_sigma, (x0.shape[0],), 0, len(table))]
        if eps is None:
            eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        x_t = schedule.add_noise(x0, eps, sigma)
        target = schedule.velocity_target(x0, eps)

        def loss_fn(m: WanTransformer3DModel) -> jax.Array:
            v = m(x_t, schedule.timesteps_for(sigma), text, use_lora=False)
            return jnp.mean((v.astype(jnp.float32) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    return step


def pretrain(model: WanTransformer3DModel, batches: Iterator[tuple[np.ndarray, ...]], *, steps: int,
             lr: float = 1e-3, warmup: int = 200, shift: float = schedule.SHIFT, seed: int = 0,
             log_every: int = 50, log: Callable[[str], None] = print,
             on_log: Callable[[int], None] | None = None) -> list[float]:
    """Trains ``model`` in place for ``steps`` steps; returns the loss of every step. ``on_log(step)``
    runs after each log line (e.g. to save the model so far)."""
    optimizer = make_optimizer(model, lr=lr, steps=steps, warmup=min(warmup, steps // 4))
    step = make_step(shift)
    key = jax.random.key(seed)
    losses: list[float] = []
    start = time.perf_counter()
    for i in range(steps):
        x0, text, *eps = next(batches)
        key, sub = jax.random.split(key)
        eps = jnp.asarray(eps[0]) if eps else None
        losses.append(float(step(model, optimizer, jnp.asarray(x0), jnp.asarray(text), sub, eps)))
        if (i + 1) % log_every == 0 or i + 1 == steps:
            log(f"pretrain step {i + 1}/{steps}: loss {np.mean(losses[-log_every:]):.4f} "
                f"({time.perf_counter() - start:.0f} s)")
            if on_log is not None:
                on_log(i + 1)
    return losses
