"""The training objectives of SpatialAlign (SPEC section 5): Diffusion-DPO for flow matching with the
zeroth-order regulariser, and the ablations.

With per-sample errors ``e(x) = mean over all latent elements of (v_model(x_t) - v)^2``::

    m      = beta * ((e_ref_w - e_w) - (e_ref_l - e_l)),  clipped to [-clip, clip]
    L_dpo  = -mean_batch log sigmoid(m)
    L_zo   = 0.5 * (mean (v_w - v_ref_w)^2 + mean (v_l - v_ref_l)^2)

Kinds (``LOSS_KINDS``):

- ``dpo_zo`` (default, the paper's method): ``L_dpo + lam * L_zo``.
- ``dpo``: ``L_dpo`` alone (lambda = 0, whatever ``lam`` says).
- ``dpo_sft``: ``L_dpo + lam_sft * mean_batch e_w`` (the SFT-regularised variant).
- ``sft``: ``mean_batch e_w``, the plain flow-matching loss. Only ``pred_w`` and ``target_w`` are
  used (the others may be None): the data side feeds one of each prompt's top-2 samples as the
  "winner" (``PAIRING["sft"] == "top2"``).
- ``dpo_random_pairs``: the same loss as ``dpo_zo``; the kind differs only in how the data side
  pairs samples (``PAIRING["dpo_random_pairs"] == "random"``: any two valid samples of a prompt,
  the higher DSR wins, no threshold).

All loss math runs in float32 whatever the prediction dtype. Reference predictions are wrapped in
``stop_gradient``: the reference is the frozen base model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = Any

LOSS_KINDS = ("dpo_zo", "dpo", "dpo_sft", "sft", "dpo_random_pairs")

# How the data side (spatialalign_jax.train.pairs.PairSampler) builds a batch for each loss kind.
PAIRING = {
    "dpo_zo": "threshold",
    "dpo": "threshold",
    "dpo_sft": "threshold",
    "sft": "top2",
    "dpo_random_pairs": "random",
}


def check_kind(kind: str) -> str:
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; choose one of {', '.join(LOSS_KINDS)}")
    return kind


def pairing_for(kind: str) -> str:
    """The data-side pairing rule a loss kind trains on: "threshold", "random" or "top2"."""
    return PAIRING[check_kind(kind)]


def per_sample_mse(a: Array, b: Array) -> Array:
    """Mean of ``(a - b)^2`` over all elements but the batch axis, in float32: shape (batch,)."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    d = a.astype(jnp.float32) - b.astype(jnp.float32)
    return jnp.mean(jnp.square(d).reshape(d.shape[0], -1), axis=1)


def flow_matching_loss(pred: Array, target: Array) -> Array:
    """The plain flow-matching loss: batch mean of the per-sample MSE to the velocity target."""
    return jnp.mean(per_sample_mse(pred, target))


def preference_loss(
    pred_w: Array,
    pred_l: Array | None,
    ref_w: Array | None,
    ref_l: Array | None,
    target_w: Array,
    target_l: Array | None,
    *,
    kind: str = "dpo_zo",
    beta: float = 1.0,
    lam: float = 0.5,
    clip: float | None = 5.0,
    lam_sft: float = 0.5,
) -> tuple[Array, dict[str, Array]]:
    """The SpatialAlign loss of ``kind`` on a batch of (winner, loser) predictions.

    Arrays are (batch, ...): ``pred_*`` the LoRA model's velocity, ``ref_*`` the frozen reference's,
    ``target_*`` the flow-matching target ``eps - x0``. ``clip=None`` disables the margin clip.
    Returns ``(loss, metrics)``; metrics are float32 scalars: ``loss`` and the unweighted terms
    (``loss_dpo``, ``loss_zo``, ``loss_sft``, batch means ``e_w``, ``e_l``, ``e_ref_w``,
    ``e_ref_l``), ``margin`` (mean clipped m), ``margin_unclipped``, ``clip_fraction`` and
    ``reward_accuracy`` (fraction of pairs with m > 0), as apply to the kind.
    """
    check_kind(kind)
    e_w = per_sample_mse(pred_w, target_w)
    if kind == "sft":
        loss = jnp.mean(e_w)
        return loss, {"loss": loss, "loss_sft": loss, "e_w": loss}

    missing = [n for n, a in (("pred_l", pred_l), ("ref_w", ref_w), ("ref_l", ref_l), ("target_l", target_l))
               if a is None]
    if missing:
        raise ValueError(f"loss kind {kind!r} needs {', '.join(missing)} (only 'sft' uses winners alone)")
    ref_w = jax.lax.stop_gradient(ref_w)
    ref_l = jax.lax.stop_gradient(ref_l)
    e_l = per_sample_mse(pred_l, target_l)
    e_ref_w = per_sample_mse(ref_w, target_w)
    e_ref_l = per_sample_mse(ref_l, target_l)

    m_raw = beta * ((e_ref_w - e_w) - (e_ref_l - e_l))
    m = m_raw if clip is None else jnp.clip(m_raw, -clip, clip)
    loss_dpo = -jnp.mean(jax.nn.log_sigmoid(m))
    # The zeroth-order term: keep the LoRA model's velocity close to the reference on both samples.
    loss_zo = 0.5 * (jnp.mean(per_sample_mse(pred_w, ref_w)) + jnp.mean(per_sample_mse(pred_l, ref_l)))
    loss_sft = jnp.mean(e_w)

    if kind in ("dpo_zo", "dpo_random_pairs"):
        loss = loss_dpo + lam * loss_zo
    elif kind == "dpo":
        loss = loss_dpo
    else:  # dpo_sft
        loss = loss_dpo + lam_sft * loss_sft

    metrics = {
        "loss": loss,
        "loss_dpo": loss_dpo,
        "loss_zo": loss_zo,
        "e_w": loss_sft,
        "e_l": jnp.mean(e_l),
        "e_ref_w": jnp.mean(e_ref_w),
        "e_ref_l": jnp.mean(e_ref_l),
        "margin": jnp.mean(m),
        "margin_unclipped": jnp.mean(m_raw),
        "clip_fraction": jnp.mean((m != m_raw).astype(jnp.float32)),
        "reward_accuracy": jnp.mean((m_raw > 0).astype(jnp.float32)),
    }
    if kind == "dpo_sft":
        metrics["loss_sft"] = loss_sft
    return loss, metrics
