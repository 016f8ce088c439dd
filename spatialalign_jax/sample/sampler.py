"""Text-to-video sampling with the Flax Wan transformer: flow-matching Euler or UniPC, with CFG.

What diffusers' ``WanPipeline`` does between "text embeddings in" and "latents out"
(``output_type="latent"``), as one jitted loop over a batch of seeds:

- Initial noise: ``jax.random.normal(jax.random.key(seed), (C, F, H, W), float32)`` per sample.
  diffusers draws its noise with a torch generator, which no JAX program can reproduce, so the
  noise is defined here, from the seed alone: a sample does not depend on the batch it was drawn
  in, nor on the mesh (JAX's threefry is partitionable), and can be re-drawn from its stored seed.
- Text: embeddings as the DiT sees them, ``(batch, L, text_dim)``, the prompt's rows then zeros
  (L = 512 for Wan, SPEC section 6; ``pad_text`` pads). The same for the negative prompt.
- Classifier-free guidance: ``v = v_uncond + g * (v_cond - v_uncond)`` (g = 5.0), the conditional
  and unconditional halves run as one batch of 2B. As in diffusers, guidance <= 1 skips the
  unconditional pass. The combination and the solver run in float32 whatever the model's compute
  dtype (diffusers combines in the transformer's dtype: the same in float32, a rounding apart in
  bfloat16).
- Solvers, on the timesteps of ``spatialalign_jax.sample.schedule``:

  - ``euler``: ``FlowMatchEulerDiscreteScheduler(shift=shift)``: ``x += (sigma_next - sigma) v``.
  - ``unipc`` (default): ``UniPCMultistepScheduler(prediction_type="flow_prediction",
    use_flow_sigmas=True, flow_shift=shift)`` with its defaults (solver_order 2, bh2, predict_x0,
    lower_order_final), the scheduler Wan's diffusers checkpoints ship. Its updates are linear in
    the sample and the last model outputs with coefficients that depend on the sigmas only: they
    are computed on the host in float64 (``sampling_plan``) and the loop applies them.

The latents come out normalised, as the pipeline's sampler holds them (and as the store keeps
them); the scorer's VAE decoder undoes the normalisation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from spatialalign_jax.common.store import VAE_SCALE_SPATIAL, VAE_SCALE_TEMPORAL
from spatialalign_jax.model.sharding import batch_sharding, replicated
from spatialalign_jax.model.transformer import WanTransformer3DModel

from . import schedule

SOLVERS = ("unipc", "euler")
# Where a seed's initial noise comes from: JAX's generator, or torch's as WanPipeline draws it.
NOISE_SOURCES = ("jax", "torch")
DEFAULT_SOLVER = "unipc"
DEFAULT_STEPS = 50  # SPEC section 6
DEFAULT_GUIDANCE = 5.0
# Seeds are kept below 2**31 so they mean the same thing as int32, uint32, int64 or a torch seed.
MAX_SEED = 2**31 - 1


def latent_shape_for(num_frames: int = 81, height: int = 480, width: int = 832,
                     channels: int = 16) -> tuple[int, int, int, int]:
    """(C, F, H, W) of the latents of a ``num_frames x height x width`` video: 81x480x832 -> (16, 21, 60, 104)."""
    if (num_frames - 1) % VAE_SCALE_TEMPORAL or height % VAE_SCALE_SPATIAL or width % VAE_SCALE_SPATIAL:
        raise ValueError(f"video {num_frames}x{height}x{width}: frames must be {VAE_SCALE_TEMPORAL}k+1 and "
                         f"height, width multiples of {VAE_SCALE_SPATIAL}")
    return channels, (num_frames - 1) // VAE_SCALE_TEMPORAL + 1, height // VAE_SCALE_SPATIAL, width // VAE_SCALE_SPATIAL


# -- the plan: timesteps and per-step solver coefficients (host side) --------------------------------------


@dataclass(frozen=True)
class SamplingPlan:
    """Everything the loop needs about the steps: model timesteps, sigmas and solver coefficients."""

    solver: str
    timesteps: np.ndarray  # (N,) float32: what the transformer is conditioned on at step i
    sigmas: np.ndarray  # (N+1,) float32: step i moves from sigmas[i] to sigmas[i+1] (= 0 at the end)
    coeffs: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N,) float32

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def sampling_plan(num_steps: int = DEFAULT_STEPS, shift: float = schedule.SHIFT,
                  solver: str = DEFAULT_SOLVER) -> SamplingPlan:
    """The steps of ``solver`` (``"unipc"`` or ``"euler"``) as diffusers' scheduler takes them."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if solver == "euler":
        sigmas, timesteps = schedule.euler_sampling_schedule(num_steps, shift)
        # float32 difference, as diffusers' `sigma_next - sigma`
        coeffs = {"dt": (sigmas[1:] - sigmas[:-1]).astype(np.float32)}
    else:
        sigmas, timesteps = schedule.unipc_sampling_schedule(num_steps, shift)
        coeffs = _unipc_coefficients(sigmas)
    return SamplingPlan(solver, np.asarray(timesteps, np.float32), np.asarray(sigmas, np.float32), coeffs)


def _unipc_coefficients(sigmas32: np.ndarray) -> dict[str, np.ndarray]:
    """Per-step coefficients of diffusers' UniPC-bh2 (order 2, predict_x0, flow sigmas).

    With flow sigmas alpha = 1 - sigma and lambda = log(alpha / sigma). At step i the model's
    x0-prediction is ``m_i = x_i - sigma_i v_i``. The corrector (i > 0, of the previous predictor's
    order) turns x_i into::

        x_i' = c_ratio x_{i-1}' - c_m0 m_{i-1} - c_scale (c_d1 (m_{i-2} - m_{i-1}) + c_rho (m_i - m_{i-1}))

    and the predictor gives::

        x_{i+1} = p_ratio x_i' - p_m0 m_i - p_scale p_d1 (m_{i-1} - m_i)

    Orders as diffusers' warm-up and ``lower_order_final``: 1 at the first and the last step, else 2.
    """
    s = sigmas32.astype(np.float64)  # the float32 sigmas diffusers holds, then exact arithmetic
    n = len(s) - 1
    alpha = 1.0 - s
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(s)  # +inf at the terminal sigma 0
    order = [1 if i == 0 else min(2, n - i) for i in range(n)]
    names = ("c_ratio", "c_m0", "c_scale", "c_d1", "c_rho", "p_ratio", "p_m0", "p_scale", "p_d1")
    out = {k: np.zeros(n, np.float64) for k in names}

    for i in range(n):
        if i > 0:
            h = lam[i] - lam[i - 1]
            hh = -h
            h_phi_1 = np.expm1(hh)
            b_h = h_phi_1  # bh2
            out["c_ratio"][i] = s[i] / s[i - 1]
            out["c_m0"][i] = alpha[i] * h_phi_1
            out["c_scale"][i] = alpha[i] * b_h
            if order[i - 1] == 1:
                out["c_rho"][i] = 0.5
            else:
                rk = (lam[i - 2] - lam[i - 1]) / h
                h_phi_k = h_phi_1 / hh - 1
                b1 = h_phi_k / b_h
                h_phi_k = h_phi_k / hh - 0.5
                b2 = h_phi_k * 2 / b_h
                rho = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array([b1, b2]))
                out["c_d1"][i], out["c_rho"][i] = rho[0] / rk, rho[1]
        with np.errstate(invalid="ignore"):
            h = lam[i + 1] - lam[i]  # inf into the terminal sigma 0: then exp(-h) - 1 = -1
        h_phi_1 = np.expm1(-h)
        out["p_ratio"][i] = s[i + 1] / s[i]
        out["p_m0"][i] = alpha[i + 1] * h_phi_1
        out["p_scale"][i] = alpha[i + 1] * h_phi_1
        if order[i] == 2:
            rk = (lam[i - 1] - lam[i]) / h
            out["p_d1"][i] = 0.5 / rk
    coeffs = {k: v.astype(np.float32) for k, v in out.items()}
    coeffs["sigma"] = sigmas32[:-1].astype(np.float32)
    return coeffs


# -- inputs ---------------------------------------------------------------------------------------------------


def pad_text(rows: np.ndarray, max_len: int) -> np.ndarray:
    """A prompt's (n, D) embedding rows zero-padded to (max_len, D), as the DiT sees them."""
    rows = np.asarray(rows, np.float32)
    if rows.ndim != 2 or not 1 <= rows.shape[0] <= max_len:
        raise ValueError(f"text embedding must be (n, D) with 1 <= n <= {max_len}, got {rows.shape}")
    out = np.zeros((max_len, rows.shape[1]), np.float32)
    out[: rows.shape[0]] = rows
    return out


def check_seeds(seeds: Sequence[int] | np.ndarray) -> np.ndarray:
    """The seeds as an int32 vector; refuses anything but integers in [0, MAX_SEED]."""
    seeds = np.asarray(seeds)
    if seeds.ndim != 1 or not len(seeds) or not np.issubdtype(seeds.dtype, np.integer):
        raise ValueError(f"seeds must be a non-empty 1-d sequence of integers, got {seeds!r}")
    if seeds.min() < 0 or seeds.max() > MAX_SEED:
        raise ValueError(f"seeds must lie in [0, {MAX_SEED}], got {seeds.min()}..{seeds.max()}")
    return seeds.astype(np.int32)


@functools.partial(jax.jit, static_argnames=("latent_shape", "sharding"))
def _noise(seeds: jax.Array, latent_shape: tuple[int, ...], sharding: NamedSharding | None) -> jax.Array:
    noise = jax.vmap(lambda s: jax.random.normal(jax.random.key(s), latent_shape, jnp.float32))(seeds)
    return noise if sharding is None else jax.lax.with_sharding_constraint(noise, sharding)


def _torch_noise(seeds: np.ndarray, latent_shape: tuple[int, ...]) -> np.ndarray:
    import torch

    # WanPipeline.prepare_latents with generator=torch.Generator().manual_seed(seed): randn_tensor of
    # (1, C, F, H, W) float32 drawn on the generator's device, the CPU.
    return np.concatenate([
        torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32).numpy()
        for s in seeds
    ])


def initial_noise(seeds: Sequence[int] | np.ndarray, latent_shape: Sequence[int], *,
                  mesh: Mesh | None = None, source: str = "jax") -> jax.Array:
    """(B, C, F, H, W) float32 noise, sample b a function of ``seeds[b]`` alone.

    ``source="jax"``: ``jax.random.normal(jax.random.key(seed), latent_shape)``, made on the devices.
    ``source="torch"``: the latents diffusers' ``WanPipeline`` starts from with
    ``generator=torch.Generator().manual_seed(seed)``, so a sample can be reproduced in PyTorch.
    """
    seeds = check_seeds(seeds)
    latent_shape = tuple(int(x) for x in latent_shape)
    if len(latent_shape) != 4:
        raise ValueError(f"latent_shape must be (C, F, H, W), got {latent_shape}")
    if source == "torch":
        return _put(_torch_noise(seeds, latent_shape), mesh)
    if source != "jax":
        raise ValueError(f"noise source {source!r} unknown; choose one of {NOISE_SOURCES}")
    sharding = None if mesh is None else batch_sharding(mesh, 5)
    return _noise(_put(seeds, mesh), latent_shape, sharding)


def _put(x: np.ndarray | jax.Array, mesh: Mesh | None, batched: bool = True) -> jax.Array:
    if mesh is None:
        return jnp.asarray(x)
    return jax.device_put(x, batch_sharding(mesh, np.ndim(x)) if batched else replicated(mesh))


# -- the loop ------------------------------------------------------------------------------------------------


def _check_inputs(model: WanTransformer3DModel, latents_shape: tuple[int, ...], text: Any, neg: Any,
                  guidance: float, mesh: Mesh | None) -> None:
    """The checks of `denoise` and `sample`, run once before any device work."""
    if guidance > 1.0 and neg is None:
        raise ValueError(f"guidance={guidance} needs the negative prompt's embedding (neg_emb), or guidance <= 1")
    neg = neg if guidance > 1.0 else None
    cfg = model.config
    b, c, f, h, w = latents_shape
    if c != cfg.in_channels or cfg.in_channels != cfg.out_channels:
        raise ValueError(f"latents have {c} channels; the model takes {cfg.in_channels} and predicts "
                         f"{cfg.out_channels} (sampling needs both equal to the latent channels)")
    pt, ph, pw = cfg.patch_size
    if f % pt or h % ph or w % pw:
        raise ValueError(f"latent (frames, height, width) = {(f, h, w)} must be multiples of the patch size {cfg.patch_size}")
    if np.ndim(text) != 3 or np.shape(text)[0] != b or np.shape(text)[2] != cfg.text_dim:
        raise ValueError(f"text_emb must be (batch={b}, tokens, {cfg.text_dim}), one row per seed or latent, "
                         f"got {np.shape(text)}")
    if neg is not None:
        want = (np.shape(text)[1], cfg.text_dim)
        if np.shape(neg) not in (want, (b, *want)):
            raise ValueError(f"neg_emb must be {want} or {(b, *want)} (padded like text_emb), got {np.shape(neg)}")
    if mesh is not None and b % mesh.size:
        raise ValueError(f"a batch of {b} cannot be split over the mesh's {mesh.size} devices "
                         f"({dict(mesh.shape)}); use a batch that is a multiple of {mesh.size}")


@functools.partial(jax.jit, static_argnames=("graphdef", "solver", "cfg", "use_lora", "sharding"))
def _denoise(graphdef, state, x, text, neg, timesteps, coeffs, guidance, *, solver: str, cfg: bool,
             use_lora: bool, sharding: NamedSharding | None):
    pin = (lambda a: a) if sharding is None else (lambda a: jax.lax.with_sharding_constraint(a, sharding))
    batch = x.shape[0]
    if cfg:
        neg = jnp.broadcast_to(neg, text.shape)
        context = jnp.concatenate([text, neg])

    def velocity(x, t):
        model = nnx.merge(graphdef, state)
        if not cfg:
            return model(x, t, text, use_lora=use_lora).astype(jnp.float32)
        out = model(jnp.concatenate([x, x]), t, context, use_lora=use_lora).astype(jnp.float32)
        cond, uncond = out[:batch], out[batch:]
        return uncond + guidance * (cond - uncond)

    if solver == "euler":
        def step(i, x):
            return pin(x + coeffs["dt"][i] * velocity(x, timesteps[i]))

        return jax.lax.fori_loop(0, timesteps.shape[0], step, pin(x))

    def unipc_step(i, carry):
        x, last, m1, m2 = carry  # sample, previous corrected sample, previous two x0-predictions
        k = {name: v[i] for name, v in coeffs.items()}
        m = x - k["sigma"] * velocity(x, timesteps[i])
        corrected = k["c_ratio"] * last - k["c_m0"] * m1 - k["c_scale"] * (k["c_d1"] * (m2 - m1) + k["c_rho"] * (m - m1))
        x = jnp.where(i > 0, corrected, x)
        x_next = k["p_ratio"] * x - k["p_m0"] * m - k["p_scale"] * (k["p_d1"] * (m1 - m))
        return pin(x_next), x, m, m1

    zeros = jnp.zeros_like(x)
    return jax.lax.fori_loop(0, timesteps.shape[0], unipc_step, (pin(x), zeros, zeros, zeros))[0]


def denoise(model: WanTransformer3DModel, latents: Any, text_emb: Any, neg_emb: Any | None, *,
            num_steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, shift: float = schedule.SHIFT,
            solver: str = DEFAULT_SOLVER, use_lora: bool = False, mesh: Mesh | None = None) -> jax.Array:
    """Runs the sampler from given initial latents (B, C, F, H, W); returns the final latents, float32.

    ``text_emb`` (B, L, D) and ``neg_emb`` (L, D) or (B, L, D) are padded as the DiT sees them
    (``pad_text``). ``neg_emb`` may be None only when ``guidance <= 1`` (no CFG). With a ``mesh``
    the batch is split over its batch axes (the model should come from
    ``load_transformer(path, mesh=mesh)``); the result stays on the devices.
    """
    _check_inputs(model, tuple(np.shape(latents)), text_emb, neg_emb, guidance, mesh)
    return _run(model, latents, text_emb, neg_emb, num_steps, guidance, shift, solver, use_lora, mesh)


def _run(model: WanTransformer3DModel, latents: Any, text_emb: Any, neg_emb: Any | None, num_steps: int,
         guidance: float, shift: float, solver: str, use_lora: bool, mesh: Mesh | None) -> jax.Array:
    cfg = guidance > 1.0
    plan = sampling_plan(num_steps, shift, solver)
    graphdef, state = nnx.split(model)
    x = _put(jnp.asarray(latents, jnp.float32), mesh)
    text = _put(jnp.asarray(text_emb, jnp.float32), mesh)
    neg = None
    if cfg:
        neg = jnp.asarray(neg_emb, jnp.float32)
        neg = _put(neg, mesh, batched=neg.ndim == 3)
    put = lambda a: _put(a, mesh, batched=False)  # noqa: E731
    return _denoise(graphdef, state, x, text, neg, put(plan.timesteps), {k: put(v) for k, v in plan.coeffs.items()},
                    put(np.float32(guidance)), solver=solver, cfg=cfg, use_lora=bool(use_lora),
                    sharding=None if mesh is None else batch_sharding(mesh, 5))


def sample(model: WanTransformer3DModel, text_emb: Any, neg_emb: Any | None, *, seeds: Sequence[int] | np.ndarray,
           latent_shape: Sequence[int], num_steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
           shift: float = schedule.SHIFT, solver: str = DEFAULT_SOLVER, use_lora: bool = False,
           mesh: Mesh | None = None, noise: str = "jax") -> jax.Array:
    """Text-to-video latents (B, C, F, H, W) float32 for a batch of seeds, one per row of ``text_emb``.

    The initial noise of row b is ``initial_noise([seeds[b]], latent_shape, source=noise)``; the rest
    is ``denoise``. ``latent_shape`` is (C, F, H, W), e.g. ``latent_shape_for(81, 480, 832)``.
    """
    seeds = check_seeds(seeds)
    if len(latent_shape) != 4:
        raise ValueError(f"latent_shape must be (C, F, H, W), got {tuple(latent_shape)}")
    _check_inputs(model, (len(seeds), *(int(x) for x in latent_shape)), text_emb, neg_emb, guidance, mesh)
    x = initial_noise(seeds, latent_shape, mesh=mesh, source=noise)
    return _run(model, x, text_emb, neg_emb, num_steps, guidance, shift, solver, use_lora, mesh)
