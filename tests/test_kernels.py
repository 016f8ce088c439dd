"""The hand-written differentiation rules, the blockwise attention's backward and the half-precision
dense product, each against JAX's own derivative of the plain computation.

Tolerances: fp32 1e-5 x max |reference|; bf16 2e-2 x max |reference| (operands are rounded to bf16,
products accumulate in fp32 on both sides). Products run at "highest" precision, so a GPU's TF32
does not enter the fp32 comparisons.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spatialalign_jax.model.attention import attend
from spatialalign_jax.model.layers import dense

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _close(a, b, tol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err = np.abs(a - b).max()
    assert err <= tol * np.abs(b).max(), f"max err {err:.3g} vs max |ref| {np.abs(b).max():.3g}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("block", [128, 2048])  # 3 query blocks of 101 rows (2 padded) / one block
@pytest.mark.parametrize("concurrent", [True, False])  # heads unrolled side by side / one at a time
def test_blockwise_attention_gradients_match_xla(dtype, block, concurrent, monkeypatch):
    from spatialalign_jax.model import attention

    monkeypatch.setattr(attention, "CONCURRENT_HEADS_MAX_SCORES", 1 << 20 if concurrent else 0)
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
    # forward and backward each map over the 2 x 3 heads, unrolled when side by side
    assert str(jax.make_jaxpr(loss("blockwise"))(q, k, v)).count("unroll=6") == (2 if concurrent else 0)
    _close(val, ref_val, TOL[dtype])
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        _close(g, r, TOL[dtype])


def test_dense_value_and_gradients():
    """bf16 operands, fp32 accumulation: the value equals the fp32 product of the same bf16 numbers; the
    gradients, whose cotangent goes back in bf16, stay within bf16 rounding of the fp32 ones."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 24), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (24, 12), jnp.float32).astype(jnp.bfloat16)
    cotangent = jax.random.normal(jax.random.key(2), (2, 5, 12), jnp.float32)
    plain = lambda x, w: x.astype(jnp.float32) @ w.astype(jnp.float32)  # noqa: E731
    out = dense(x, w)
    # on CPU the product comes back in fp32 (elsewhere in the input dtype)
    assert out.dtype == (jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    _close(out, plain(x, w), 1e-5 if out.dtype == jnp.float32 else TOL[jnp.bfloat16])
    f = lambda fn: jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w).astype(jnp.float32) * cotangent), (0, 1)))  # noqa: E731
    for g, r, primal in zip(f(dense)(x, w), f(plain)(x, w), (x, w)):
        assert g.dtype == primal.dtype
        _close(g, r, TOL[jnp.bfloat16])


def test_training_gradients_through_blockwise_attention_and_bf16(tmp_path):
    """The LoRA gradients of a DPO micro-batch with 600 tokens (the blockwise path) equal the XLA-attention
    ones in fp32 (1e-4 x max), and bf16 compute stays within 5% x max of fp32."""
    from diffusers import WanTransformer3DModel as TorchWan
    from flax import nnx

    from spatialalign_jax import load_transformer
    from spatialalign_jax.model.config import LoraConfig
    from spatialalign_jax.model.lora import BASE, LORA
    from spatialalign_jax.train.step import StepConfig, make_grad_fn

    import torch
    torch.manual_seed(0)
    TorchWan(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=16,
             freq_dim=16, ffn_dim=48, num_layers=2, rope_max_seq_len=32).save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    lat = lambda: rng.standard_normal((1, 1, 4, 5, 20, 24)).astype(np.float32)  # noqa: E731  600 tokens
    batch = dict(latents_w=lat(), latents_l=lat(), eps_w=lat(), eps_l=lat(),
                 text_emb=rng.standard_normal((1, 1, 5, 16)).astype(np.float32),
                 sigma=np.full((1, 1), 0.6, np.float32))

    def grads(attention, dtype):
        model = load_transformer(tmp_path, attention=attention, dtype=dtype, lora=LoraConfig(rank=4, alpha=8.0))
        lora = jax.tree.map(lambda v: v + 0.05, nnx.state(model, LORA))  # B != 0: every adapter has a gradient
        fn = jax.jit(make_grad_fn(nnx.split(model, BASE, LORA)[0], StepConfig()))
        return jax.tree.leaves(fn(lora, nnx.state(model, BASE), batch, jax.random.key(0))[0])

    ref = grads("xla", "float32")
    for got, tol in ((grads("blockwise", "float32"), 1e-4), (grads("blockwise", "bfloat16"), 5e-2)):
        for g, r in zip(got, ref):
            assert g.dtype == jnp.float32  # LoRA weights and their gradients stay fp32
            _close(g, r, tol)


def test_attention_kernel_remat_keeps_the_kernel_outputs(monkeypatch):
    """remat="attention_kernel" keeps the blockwise kernel's output and log-sum-exp: its gradients
    equal the un-rematerialised ones (1e-5 x max), and the kernel's forward is traced as often as
    without remat, where full remat traces it once more (the recompute it avoids)."""
    from flax import nnx

    from spatialalign_jax.model import attention
    from spatialalign_jax.model.config import LoraConfig, WanConfig
    from spatialalign_jax.model.lora import BASE, LORA
    from spatialalign_jax.model.transformer import WanTransformer3DModel

    monkeypatch.setattr(attention, "SHORT_KEYS", 16)  # 128 tokens take the blockwise path
    cfg = WanConfig.from_diffusers(dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 4, 2, 16, 16)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 8, 32)), jnp.float32)
    t = jnp.array([500.0, 200.0])

    def grad_and_jaxpr(remat):
        model = WanTransformer3DModel(cfg, lora=LoraConfig(), remat=remat, attention="blockwise", rngs=nnx.Rngs(0))
        graphdef, lora, base = nnx.split(model, LORA, BASE)
        lora = jax.tree.map(lambda v: v + 0.05, lora)
        grad = jax.grad(lambda lo: jnp.mean(nnx.merge(graphdef, lo, base)(x, t, ctx) ** 2))
        return jax.jit(grad)(lora), str(jax.make_jaxpr(grad)(lora))

    ref, plain = grad_and_jaxpr("none")
    kept, with_policy = grad_and_jaxpr("attention_kernel")
    _, full = grad_and_jaxpr("full")
    for g, r in zip(jax.tree.leaves(kept), jax.tree.leaves(ref)):
        _close(g, r, 1e-5)
    forwards = lambda jaxpr: jaxpr.count(f"name={attention.KERNEL_OUTPUTS}")  # noqa: E731
    assert forwards(with_policy) == forwards(plain) < forwards(full)
