"""preference_loss / flow_matching_loss against values computed by hand (SPEC section 5)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spatialalign_jax.train import losses

# Two pairs, two latent elements each. The per-sample errors below were worked out on paper:
TARGET_W = [[1.0, 0.0], [0.0, 2.0]]
PRED_W = [[1.5, 0.0], [0.0, 1.0]]  # e_w     = [(0.25 + 0) / 2, (0 + 1) / 2]  = [0.125, 0.5]
REF_W = [[2.0, 0.0], [0.0, 2.0]]  # e_ref_w = [(1 + 0) / 2, 0]              = [0.5, 0.0]
TARGET_L = [[0.0, 1.0], [1.0, 1.0]]
PRED_L = [[0.0, 3.0], [1.0, 1.0]]  # e_l     = [(0 + 4) / 2, 0]              = [2.0, 0.0]
REF_L = [[0.0, 1.0], [1.0, 3.0]]  # e_ref_l = [0, (0 + 4) / 2]              = [0.0, 2.0]
# m = (e_ref_w - e_w) - (e_ref_l - e_l) = [(0.5 - 0.125) - (0 - 2), (0 - 0.5) - (2 - 0)] = [2.375, -2.5]
M = [2.375, -2.5]
# |v_w - v_ref_w|^2 per sample: [0.25 / 2, 1 / 2] -> mean 0.3125; |v_l - v_ref_l|^2: [4 / 2, 4 / 2] -> mean 2
L_ZO = 0.5 * (0.3125 + 2.0)
E_W_MEAN = (0.125 + 0.5) / 2


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def l_dpo(ms):
    return -sum(log_sigmoid(m) for m in ms) / len(ms)


def arrays(dtype=jnp.float32):
    return [jnp.asarray(a, dtype) for a in (PRED_W, PRED_L, REF_W, REF_L, TARGET_W, TARGET_L)]


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("dpo_zo", l_dpo(M) + 0.5 * L_ZO),
        ("dpo_random_pairs", l_dpo(M) + 0.5 * L_ZO),
        ("dpo", l_dpo(M)),
        ("dpo_sft", l_dpo(M) + 0.5 * E_W_MEAN),
    ],
)
def test_preference_kinds_hand_computed(kind, expected):
    loss, metrics = losses.preference_loss(*arrays(), kind=kind)
    assert loss.dtype == jnp.float32
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["loss_dpo"]) == pytest.approx(l_dpo(M), rel=1e-6)
    assert float(metrics["loss_zo"]) == pytest.approx(L_ZO, rel=1e-6)
    assert float(metrics["e_w"]) == pytest.approx(E_W_MEAN, rel=1e-6)
    assert float(metrics["e_l"]) == pytest.approx(1.0, rel=1e-6)
    assert float(metrics["e_ref_w"]) == pytest.approx(0.25, rel=1e-6)
    assert float(metrics["e_ref_l"]) == pytest.approx(1.0, rel=1e-6)
    assert float(metrics["margin"]) == pytest.approx((2.375 - 2.5) / 2, rel=1e-6)
    assert float(metrics["margin_unclipped"]) == pytest.approx((2.375 - 2.5) / 2, rel=1e-6)
    assert float(metrics["reward_accuracy"]) == 0.5
    assert float(metrics["clip_fraction"]) == 0.0
    assert ("loss_sft" in metrics) == (kind == "dpo_sft")


def test_weights_beta_lam_lam_sft():
    loss, _ = losses.preference_loss(*arrays(), beta=0.5, lam=2.0)
    assert float(loss) == pytest.approx(l_dpo([0.5 * m for m in M]) + 2.0 * L_ZO, rel=1e-6)
    loss, _ = losses.preference_loss(*arrays(), kind="dpo_sft", lam_sft=3.0)
    assert float(loss) == pytest.approx(l_dpo(M) + 3.0 * E_W_MEAN, rel=1e-6)
    # "dpo" is lambda = 0 whatever lam says
    loss, _ = losses.preference_loss(*arrays(), kind="dpo", lam=7.0)
    assert float(loss) == pytest.approx(l_dpo(M), rel=1e-6)


def test_sft_uses_winner_only():
    loss, metrics = losses.preference_loss(jnp.asarray(PRED_W), None, None, None, jnp.asarray(TARGET_W), None,
                                           kind="sft")
    assert float(loss) == pytest.approx(E_W_MEAN, rel=1e-6)
    assert set(metrics) == {"loss", "loss_sft", "e_w"}
    assert float(losses.flow_matching_loss(jnp.asarray(PRED_W), jnp.asarray(TARGET_W))) == pytest.approx(E_W_MEAN)
    np.testing.assert_allclose(losses.per_sample_mse(jnp.asarray(PRED_W), jnp.asarray(TARGET_W)), [0.125, 0.5])


def test_clipping():
    # beta = 4: m = [9.5, -10] -> clipped to [5, -5]
    loss, metrics = losses.preference_loss(*arrays(), kind="dpo", beta=4.0)
    assert float(loss) == pytest.approx(l_dpo([5.0, -5.0]), rel=1e-6)
    assert float(metrics["margin"]) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics["margin_unclipped"]) == pytest.approx((9.5 - 10.0) / 2, rel=1e-6)
    assert float(metrics["clip_fraction"]) == 1.0
    # a clipped pair contributes no gradient through the DPO term
    grad = jax.grad(lambda p: losses.preference_loss(p, *arrays()[1:], kind="dpo", beta=4.0)[0])(arrays()[0])
    np.testing.assert_array_equal(np.asarray(grad), 0.0)
    # clip=None: no clipping; a custom clip value
    loss, _ = losses.preference_loss(*arrays(), kind="dpo", beta=4.0, clip=None)
    assert float(loss) == pytest.approx(l_dpo([9.5, -10.0]), rel=1e-6)
    loss, _ = losses.preference_loss(*arrays(), kind="dpo", beta=4.0, clip=9.75)
    assert float(loss) == pytest.approx(l_dpo([9.5, -9.75]), rel=1e-6)


def test_gradients_hand_computed():
    pred_w, pred_l, ref_w, ref_l, target_w, target_l = arrays()

    def loss_fn(pw, pl, rw, rl):
        return losses.preference_loss(pw, pl, rw, rl, target_w, target_l, kind="dpo_zo")[0]

    g_pw, g_pl, g_rw, g_rl = jax.grad(loss_fn, argnums=(0, 1, 2, 3))(pred_w, pred_l, ref_w, ref_l)
    # the reference is frozen
    np.testing.assert_array_equal(np.asarray(g_rw), 0.0)
    np.testing.assert_array_equal(np.asarray(g_rl), 0.0)
    # dL/dpred_w[b] = (1/B) sigmoid(-m_b) * beta * 2 (pred_w - target_w)[b] / N
    #               + lam * 0.5 * (1/B) * 2 (pred_w - ref_w)[b] / N, with B = N = 2
    # dL/dpred_l[b] = -(1/B) sigmoid(-m_b) * beta * 2 (pred_l - target_l)[b] / N + the same zo form
    sig = [1.0 / (1.0 + math.exp(m)) for m in M]
    for b in range(2):
        for i in range(2):
            gw = sig[b] * (PRED_W[b][i] - TARGET_W[b][i]) / 2 + 0.25 * (PRED_W[b][i] - REF_W[b][i]) / 2
            gl = -sig[b] * (PRED_L[b][i] - TARGET_L[b][i]) / 2 + 0.25 * (PRED_L[b][i] - REF_L[b][i]) / 2
            assert float(g_pw[b, i]) == pytest.approx(gw, rel=1e-5, abs=1e-7)
            assert float(g_pl[b, i]) == pytest.approx(gl, rel=1e-5, abs=1e-7)


def test_at_lora_init_pred_equals_ref():
    """LoRA B = 0 at init: pred == ref, so m = 0, L_dpo = log 2, L_zo = 0, but the DPO gradient lives."""
    _, _, ref_w, ref_l, target_w, target_l = arrays()
    loss, metrics = losses.preference_loss(ref_w, ref_l, ref_w, ref_l, target_w, target_l)
    assert float(loss) == pytest.approx(math.log(2.0), rel=1e-6)
    assert float(metrics["loss_zo"]) == 0.0 and float(metrics["reward_accuracy"]) == 0.0
    g = jax.grad(lambda p: losses.preference_loss(p, ref_l, ref_w, ref_l, target_w, target_l)[0])(ref_w)
    assert float(jnp.abs(g).sum()) > 0


def test_bf16_inputs_computed_in_fp32_and_jit_5d():
    rng = np.random.default_rng(0)
    shape = (3, 4, 2, 3, 5)  # (batch, C, F, H, W)
    a = [rng.standard_normal(shape).astype(np.float32) for _ in range(6)]
    ref_loss, ref_metrics = losses.preference_loss(*map(jnp.asarray, a))
    # numpy restatement of the formula on 5-D arrays
    e = [np.mean((a[i] - a[4 + i % 2]) ** 2, axis=(1, 2, 3, 4)) for i in range(4)]
    m = np.clip((e[2] - e[0]) - (e[3] - e[1]), -5, 5)
    zo = 0.5 * (np.mean((a[0] - a[2]) ** 2) + np.mean((a[1] - a[3]) ** 2))
    expected = -np.mean(-np.log1p(np.exp(-m.astype(np.float64)))) + 0.5 * zo
    assert float(ref_loss) == pytest.approx(expected, rel=1e-5)

    jitted = jax.jit(functools.partial(losses.preference_loss, kind="dpo_zo"))
    loss_bf16, metrics = jitted(*(jnp.asarray(x, jnp.bfloat16) for x in a))
    assert loss_bf16.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in metrics.values())
    # bf16 inputs, fp32 math: equal to the fp32 loss of the same bf16-rounded numbers (bf16 arithmetic would
    # be off by about 2e-3)
    rounded = losses.preference_loss(*(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32) for x in a), kind="dpo_zo")[0]
    assert float(loss_bf16) == pytest.approx(float(rounded), rel=1e-6)


def test_bad_kind_and_missing_inputs():
    with pytest.raises(ValueError, match="unknown loss kind 'ipo'.*dpo_zo, dpo, dpo_sft, sft, dpo_random_pairs"):
        losses.preference_loss(*arrays(), kind="ipo")
    with pytest.raises(ValueError, match="needs ref_w, ref_l"):
        losses.preference_loss(jnp.asarray(PRED_W), jnp.asarray(PRED_L), None, None, jnp.asarray(TARGET_W),
                               jnp.asarray(TARGET_L))
    with pytest.raises(ValueError, match="shape mismatch"):
        losses.flow_matching_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    assert [losses.pairing_for(k) for k in losses.LOSS_KINDS] == ["threshold", "threshold", "threshold", "top2",
                                                                  "random"]
