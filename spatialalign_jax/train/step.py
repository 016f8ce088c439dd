"""One jit-compiled, sharded training step of LoRA DPO with the zeroth-order regulariser (SPEC 5).

The step takes the frozen base weights and the train state (LoRA weights, AdamW state, step) and:
draws noise and timesteps from the step's key (unless the batch brings them), runs winner and loser
together through the model twice, LoRA on (policy) and LoRA off (the frozen reference, no gradient),
computes the preference loss in fp32, accumulates LoRA gradients over micro-batches under a scan, and
applies AdamW with the warm-up + cosine schedule. Only LoRA parameters ever see a gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from spatialalign_jax.model.lora import BASE, LORA
from spatialalign_jax.model.sharding import replicated
from spatialalign_jax.sample import schedule

from .losses import check_kind, preference_loss

Batch = Mapping[str, jax.Array]
NOISE_KEYS = ("eps_w", "eps_l", "sigma")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    kind: str = "dpo_zo"
    beta: float = 1.0
    lam: float = 0.5
    clip: float | None = 5.0
    lam_sft: float = 0.5
    # SPEC: one timestep index shared by the step's whole batch (every micro-batch of the accumulation);
    # True: one per pair.
    per_pair_timestep: bool = False
    shared_noise: bool = False  # SPEC: winner and loser get independent noise
    shift: float = schedule.SHIFT
    lr: float = 1e-4
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 300
    total_steps: int = 3000
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        check_kind(self.kind)


def lr_schedule(cfg: StepConfig) -> optax.Schedule:
    """Linear warm-up from 0, then cosine to 0 at `total_steps` (torch's cosine-with-warmup)."""
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, cfg.total_steps, 0.0)


def make_optimizer(cfg: StepConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)


def draw_sigmas(key: jax.Array, accum: int, pairs: int, cfg: StepConfig) -> jax.Array:
    """The noise levels of one optimiser step, (accum, pairs): one timestep index for the step's whole
    batch, every micro-batch of the accumulation included (SPEC 5), or one per pair."""
    if cfg.per_pair_timestep:
        return schedule.sample_sigma(key, accum * pairs, per_pair=True, shift=cfg.shift).reshape(accum, pairs)
    return jnp.broadcast_to(schedule.sample_sigma(key, 1, shift=cfg.shift), (accum, pairs))


def draw_noise(key: jax.Array, latents_w: jax.Array, sigma: jax.Array, cfg: StepConfig) -> dict[str, jax.Array]:
    """Noise for one micro-batch of pairs at noise levels `sigma`: eps for winner and loser."""
    k_w, k_l = jax.random.split(key)
    eps_w = jax.random.normal(k_w, latents_w.shape, jnp.float32)
    eps_l = eps_w if cfg.shared_noise else jax.random.normal(k_l, latents_w.shape, jnp.float32)
    return {"eps_w": eps_w, "eps_l": eps_l, "sigma": sigma}


def pair_loss(model: nnx.Module, batch: Batch, noise: Batch, cfg: StepConfig) -> tuple[jax.Array, dict]:
    """The SPEC loss of one micro-batch of (winner, loser) pairs."""
    sigma = noise["sigma"].astype(jnp.float32)
    text = batch["text_emb"]
    if cfg.kind == "sft":  # plain flow matching on the winner slot, no reference
        x0 = batch["latents_w"].astype(jnp.float32)
        pred = model(schedule.add_noise(x0, noise["eps_w"], sigma), schedule.timesteps_for(sigma), text)
        return preference_loss(pred, None, None, None, schedule.velocity_target(x0, noise["eps_w"]), None,
                               kind="sft")
    x0 = jnp.concatenate([batch["latents_w"], batch["latents_l"]]).astype(jnp.float32)
    eps = jnp.concatenate([noise["eps_w"], noise["eps_l"]])
    sigma2 = jnp.concatenate([sigma, sigma])
    x_t = schedule.add_noise(x0, eps, sigma2)
    t = schedule.timesteps_for(sigma2)
    text2 = jnp.concatenate([text, text])
    pred = model(x_t, t, text2, use_lora=True)
    ref = jax.lax.stop_gradient(model(x_t, t, text2, use_lora=False))
    target = schedule.velocity_target(x0, eps)
    n = sigma.shape[0]
    return preference_loss(pred[:n], pred[n:], ref[:n], ref[n:], target[:n], target[n:], kind=cfg.kind,
                           beta=cfg.beta, lam=cfg.lam, clip=cfg.clip, lam_sft=cfg.lam_sft)


def make_grad_fn(graphdef: nnx.GraphDef, cfg: StepConfig) -> Callable:
    """`(lora, base, batch, key) -> (grads, metrics)`, averaged over the batch's leading micro-batch axis."""

    def micro(lora, base, mb, noise):
        return pair_loss(nnx.merge(graphdef, base, lora), mb, noise, cfg)

    value_and_grad = jax.value_and_grad(micro, has_aux=True)

    def grads_and_metrics(lora, base, batch: Batch, key: jax.Array):
        accum = batch["latents_w"].shape[0]
        data = {k: v for k, v in batch.items() if k not in NOISE_KEYS}
        given = {k: batch[k] for k in NOISE_KEYS if k in batch}
        if given and len(given) != len(NOISE_KEYS):
            raise ValueError(f"the batch brings noise {sorted(given)}; bring all of {NOISE_KEYS} or none "
                             "(then the step draws them from its key)")
        sigma_key, key = jax.random.split(key)
        sigmas = draw_sigmas(sigma_key, accum, batch["latents_w"].shape[1], cfg)
        keys = jax.random.split(key, accum)

        def body(grads, xs):
            mb, nz, k, sigma = xs
            noise = nz if nz else draw_noise(k, mb["latents_w"], sigma, cfg)
            (_, metrics), g = value_and_grad(lora, base, mb, noise)
            return jax.tree.map(jnp.add, grads, g), metrics

        grads, metrics = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, lora), (data, given, keys, sigmas))
        return jax.tree.map(lambda g: g / accum, grads), jax.tree.map(lambda m: m.mean(0), metrics)

    return grads_and_metrics


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation,
                     mesh: Mesh | None = None) -> dict[str, Any]:
    """LoRA weights, AdamW state and step; replicated over the mesh (the LoRA rule in `sharding`)."""
    lora = nnx.state(model, LORA)
    state = {"lora": lora, "opt_state": optimizer.init(lora), "step": jnp.zeros((), jnp.int32)}
    return state if mesh is None else jax.device_put(state, replicated(mesh))


def make_train_step(model: nnx.Module, cfg: StepConfig, optimizer: optax.GradientTransformation,
                    mesh: Mesh | None = None) -> Callable:
    """A jitted `(state, base, batch, key) -> (state, metrics)`; `state` is donated.

    `batch` arrays have a leading micro-batch axis (grad accumulation) then the pair axis, which arrives
    split over the mesh's data axes (`sharding.microbatch_sharding`); XLA carries that split through the
    model. `key` is the run's key: each step folds in its own step number, so a resumed run draws the
    same noise without the caller deriving a key per step.
    """
    graphdef, _, _ = nnx.split(model, BASE, LORA)
    grad_fn = make_grad_fn(graphdef, cfg)
    schedule_fn = lr_schedule(cfg)

    def step(state, base, batch, key):
        grads, metrics = grad_fn(state["lora"], base, batch, jax.random.fold_in(key, state["step"]))
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["lora"])
        lora = optax.apply_updates(state["lora"], updates)
        metrics = {**metrics, "lr": schedule_fn(state["step"]), "grad_norm": optax.tree.norm(grads)}
        return {"lora": lora, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=(0,))
    return jax.jit(step, donate_argnums=(0,), out_shardings=(replicated(mesh), replicated(mesh)))
