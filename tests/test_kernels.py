"""The hand-written differentiation rules: the blockwise attention's backward and the half-precision
dense product, each against JAX's own derivative of the plain computation; and the shared-prefix
policy/reference forward against two separate forwards.

Tolerances: fp32 1e-5 x max |reference|; bf16 2e-2 x max |reference| (operands are rounded to bf16,
products accumulate in fp32 on both sides).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spatialalign_jax.attention import attend
from spatialalign_jax.config import LoraConfig, WanConfig
from spatialalign_jax.layers import dense
from spatialalign_jax.lora import LORA
from spatialalign_jax.model import WanTransformer3DModel

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _close(a, b, tol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err = np.abs(a - b).max()
    assert err <= tol * np.abs(b).max(), f"max err {err:.3g} vs max |ref| {np.abs(b).max():.3g}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("block", [128, 2048])  # 3 query blocks of 101 rows (2 padded) / one block
def test_blockwise_attention_gradients_match_xla(dtype, block):
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (2, 301, 3, 16), jnp.float32).astype(dtype) for kk in keys[:3])
    cotangent = jax.random.normal(keys[3], (2, 301, 3, 16), jnp.float32)

    def loss(impl):
        def f(q, k, v):
            out = attend(q, k, v, impl, block_size=block) if impl == "blockwise" else attend(
                q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), "xla")
            return jnp.sum(out.astype(jnp.float32) * cotangent)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    val, grads = loss("blockwise")(q, k, v)
    ref_val, ref_grads = loss("xla")(q, k, v)
    _close(val, ref_val, TOL[dtype])
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        _close(g, r, TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_value_and_gradients(dtype):
    x = jax.random.normal(jax.random.key(0), (2, 5, 24), jnp.float32).astype(dtype)
    w = jax.random.normal(jax.random.key(1), (24, 12), jnp.float32).astype(dtype)
    cotangent = jax.random.normal(jax.random.key(2), (2, 5, 12), jnp.float32)
    out = dense(x, w)
    # half precision on CPU comes back in fp32 (accumulated in fp32), fp32 stays fp32
    assert out.dtype == jnp.float32
    f = lambda fn: jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w).astype(jnp.float32) * cotangent), (0, 1)))
    grads = f(dense)(x, w)
    ref_grads = f(lambda x, w: x.astype(jnp.float32) @ w.astype(jnp.float32))(x, w)
    _close(out, x.astype(jnp.float32) @ w.astype(jnp.float32), TOL[dtype])
    for g, r, primal in zip(grads, ref_grads, (x, w)):
        assert g.dtype == primal.dtype
        _close(g, r, TOL[dtype])


CFG = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=12,
           freq_dim=16, ffn_dim=24, num_layers=3, rope_max_seq_len=32)


@pytest.mark.parametrize("targets,remat", [
    (None, "none"),                                   # the SPEC targets: first self-attention shared
    (None, "full"),
    (("blocks.*.attn1.to_q", "blocks.*.attn2.to_k"), "none"),  # an adapter in self-attention: no sharing
])
def test_policy_and_reference_equal_two_forwards(targets, remat):
    lora = LoraConfig(rank=2, alpha=4.0) if targets is None else LoraConfig(rank=2, alpha=4.0, targets=targets)
    model = WanTransformer3DModel(WanConfig.from_diffusers(CFG), lora=lora, attention="blockwise", remat=remat,
                                  rngs=nnx.Rngs(0))
    assert model.lora_in_self_attention == (targets is not None)
    nnx.update(model, jax.tree.map(lambda v: v + 0.05, nnx.state(model, LORA)))  # adapters that act
    x = jax.random.normal(jax.random.key(0), (2, 4, 3, 4, 6))
    t = jnp.array([10.0, 900.0])
    ctx = jax.random.normal(jax.random.key(1), (2, 5, 12))
    policy, reference = model.policy_and_reference(x, t, ctx)
    np.testing.assert_allclose(policy, model(x, t, ctx, use_lora=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reference, model(x, t, ctx, use_lora=False), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(policy) - np.asarray(reference)).max() > 1e-4

    def loss(m, joint):
        p, r = m.policy_and_reference(x, t, ctx) if joint else (m(x, t, ctx), m(x, t, ctx, use_lora=False))
        return jnp.mean((p - jax.lax.stop_gradient(r)) ** 2 + p ** 2)

    diff = nnx.DiffState(0, LORA)
    g_joint = nnx.grad(lambda m: loss(m, True), argnums=diff)(model)
    g_two = nnx.grad(lambda m: loss(m, False), argnums=diff)(model)
    for a, b in zip(jax.tree.leaves(g_joint), jax.tree.leaves(g_two)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
