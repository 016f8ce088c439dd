"""The noise schedule against diffusers' schedulers (the reference) and SPEC section 5's formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from spatialalign_jax.sample import schedule


def test_training_table_matches_spec_and_diffusers():
    table = schedule.sigmas()
    assert table.shape == (1000,) and table.dtype == np.float32
    # SPEC formula written out for a few indices with python floats.
    for k in (0, 1, 500, 999):
        s = 1.0 - k / 1000.0
        assert table[k] == pytest.approx(5.0 * s / (1.0 + 4.0 * s), abs=1e-7)
    ref = FlowMatchEulerDiscreteScheduler(shift=5.0)
    # diffusers computes in float32 torch, we in float64 then round: equal to 1 ulp.
    np.testing.assert_allclose(table, ref.sigmas.numpy(), rtol=0, atol=2e-7)
    np.testing.assert_allclose(schedule.timesteps_for(table), ref.timesteps.numpy(), rtol=0, atol=2e-4)


@pytest.mark.parametrize("steps,shift", [(50, 5.0), (50, 3.0), (7, 5.0), (1, 5.0)])
def test_euler_sampling_schedule_matches_diffusers(steps, shift):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(steps)
    sig, ts = schedule.euler_sampling_schedule(steps, shift)
    assert sig.shape == (steps + 1,) and ts.shape == (steps,)
    np.testing.assert_allclose(sig, ref.sigmas.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(ts, ref.timesteps.numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("steps,shift", [(50, 5.0), (50, 3.0), (7, 5.0)])
def test_unipc_sampling_schedule_matches_diffusers(steps, shift):
    ref = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    ref.set_timesteps(steps)
    sig, ts = schedule.unipc_sampling_schedule(steps, shift)
    np.testing.assert_allclose(sig, ref.sigmas.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())


def test_add_noise_and_target_numpy_jax_and_diffusers():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 2, 2, 4, 4)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    sigma = schedule.sigmas()[[0, 400, 999]]
    xt = schedule.add_noise(x0, eps, sigma)
    for b in range(3):  # per-sample sigma, written out
        np.testing.assert_allclose(xt[b], (1 - sigma[b]) * x0[b] + sigma[b] * eps[b], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(schedule.add_noise(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(sigma))),
                               xt, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(schedule.velocity_target(x0, eps), eps - x0)
    # diffusers' scale_noise maps a timestep to the same sigma and the same interpolation.
    ref = FlowMatchEulerDiscreteScheduler(shift=5.0)
    t = ref.timesteps[[0, 400, 999]]
    ref_xt = ref.scale_noise(torch.from_numpy(x0), t, torch.from_numpy(eps)).numpy()
    np.testing.assert_allclose(xt, ref_xt, rtol=1e-5, atol=1e-6)
    # a scalar sigma broadcasts over the whole batch
    np.testing.assert_allclose(schedule.add_noise(x0, eps, 0.25), 0.75 * x0 + 0.25 * eps, rtol=1e-6)
    with pytest.raises(ValueError, match="sigma must be"):
        schedule.add_noise(x0, eps, np.zeros((3, 1)))


def test_sample_sigma_shared_and_per_pair():
    table = schedule.sigmas()
    shared = np.asarray(schedule.sample_sigma(jax.random.key(0), 6))
    assert shared.shape == (6,) and np.all(shared == shared[0]) and shared[0] in table
    per_pair = np.asarray(schedule.sample_sigma(jax.random.key(1), 64, per_pair=True))
    assert len(np.unique(per_pair)) > 1 and np.isin(per_pair, table).all()
