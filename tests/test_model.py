"""The Flax Wan transformer against diffusers' `WanTransformer3DModel` on the same weights and inputs.

Tolerance (fp32): max |jax - torch| <= 1e-4 * max |torch|, for the whole model and each submodule.
Models are tiny random diffusers models saved with `save_pretrained` and loaded through
`spatialalign_jax.load_transformer`, the path users take.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel as TorchWan
from flax import nnx

from spatialalign_jax.model import attention as A
from spatialalign_jax import load_transformer
from spatialalign_jax.model.attention import apply_rope, attend, rope_tables
from spatialalign_jax.model.config import LoraConfig, WanConfig
from spatialalign_jax.model.lora import BASE, LORA, flat_params, merge_lora, set_params
from spatialalign_jax.model.sharding import make_mesh
from spatialalign_jax.model.transformer import WanTransformer3DModel

RTOL = 1e-4

CONFIGS = {
    # odd frame count, non-square latents, in != out channels
    "odd_nonsquare": dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=6,
                          text_dim=16, freq_dim=32, ffn_dim=40, num_layers=2, rope_max_seq_len=64),
    # temporal patch 2, no cross-attention norm, no q/k norm, odd freq dim
    "patch2_nonorm": dict(patch_size=(2, 2, 2), num_attention_heads=3, attention_head_dim=16, in_channels=5,
                          out_channels=5, text_dim=24, freq_dim=33, ffn_dim=64, num_layers=3,
                          cross_attn_norm=False, qk_norm=None, eps=1e-5, rope_max_seq_len=32),
    # Wan's real head-dim split (128 -> 44, 42, 42), one block
    "head128": dict(num_attention_heads=1, attention_head_dim=128, in_channels=16, out_channels=16,
                    text_dim=32, freq_dim=256, ffn_dim=96, num_layers=1),
}
SHAPES = {"odd_nonsquare": (2, 4, 5, 6, 10), "patch2_nonorm": (2, 5, 4, 4, 6), "head128": (2, 16, 3, 4, 2)}


def _close(jax_out, torch_out, rtol=RTOL):
    ref = np.asarray(torch_out, np.float64)
    err = np.abs(np.asarray(jax_out, np.float64) - ref).max()
    assert err <= rtol * np.abs(ref).max(), f"max err {err:.3g} vs max |ref| {np.abs(ref).max():.3g}"


def _torch_model(name: str) -> TorchWan:
    torch.manual_seed(sum(map(ord, name)))
    model = TorchWan(**CONFIGS[name]).eval()
    with torch.no_grad():  # non-trivial norm weights, so a mis-mapped scale would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    torch_model = _torch_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    torch_model.save_pretrained(folder)
    return request.param, torch_model, load_transformer(folder, attention="xla"), folder


def _inputs(name, seed=0, text_len=7):
    rng = np.random.default_rng(seed)
    shape = SHAPES[name]
    x = rng.standard_normal(shape).astype(np.float32)
    t = np.array([3.0, 937.5], np.float32)[: shape[0]]
    ctx = rng.standard_normal((shape[0], text_len, CONFIGS[name]["text_dim"])).astype(np.float32)
    return x, t, ctx


def test_forward_matches_diffusers(pair):
    name, torch_model, model, _ = pair
    for seed, t in ((0, [3.0, 937.5]), (1, [500.0, 0.0])):
        x, _, ctx = _inputs(name, seed)
        t = np.asarray(t, np.float32)
        with torch.no_grad():
            ref = torch_model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
        out = model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
        assert out.shape == ref.shape
        _close(out, ref)


def test_blockwise_attention_matches_xla(pair, monkeypatch):
    name, _, model, _ = pair
    x, t, ctx = _inputs(name)
    ref = model(x, t, ctx)
    # 301 keys: long enough for the blockwise path; 3 query blocks of 101 rows, 2 of them padding
    q = jax.random.normal(jax.random.key(0), (2, 301, 3, 16))
    k, v = jax.random.normal(jax.random.key(1), (2, 2, 301, 3, 16))
    for block in (128, 1024):
        _close(jax.jit(lambda q, k, v: attend(q, k, v, "blockwise", block_size=block))(q, k, v),
               attend(q, k, v, "xla"))
    # the configs' few tokens would fall back to XLA's attention: take the blockwise path for every length
    monkeypatch.setattr(A, "SHORT_KEYS", 0)
    model.attention = "blockwise"
    try:
        _close(model(x, t, ctx), ref)
    finally:
        model.attention = "xla"


def _block(model: WanTransformer3DModel, i: int):
    graphdef, state = nnx.split(model.blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def test_submodules_match_diffusers(pair):
    name, tm, model, _ = pair
    cfg = model.config
    x, t, ctx = _inputs(name)
    tx, tt, tctx = map(torch.from_numpy, (x, t, ctx))
    with torch.no_grad():
        # condition embedder
        temb, tproj, tctx_emb, _ = tm.condition_embedder(tt, tctx, None)
        jtemb, jproj, jctx = model.condition_embedder(jnp.asarray(t), jnp.asarray(ctx), True)
        for a, b in ((jtemb, temb), (jproj, tproj), (jctx, tctx_emb)):
            _close(a, b.numpy())
        # patch embedding
        tpatch = tm.patch_embedding(tx).flatten(2).transpose(1, 2)
        _close(model.patch_embedding(jnp.asarray(x)), tpatch.numpy())
        # rotary tables and their application
        cos_t, sin_t = tm.rope(tx)
        pt, ph, pw = cfg.patch_size
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        cos, sin = rope_tables(cfg.rope_dims, grid, cfg.rope_max_seq_len)
        _close(cos, cos_t[0, :, 0, 0::2].float().numpy())
        _close(sin, sin_t[0, :, 0, 1::2].float().numpy())
        # one whole block, and its attention layers and feed-forward
        hidden = tpatch
        temb6 = tproj.unflatten(1, (6, -1))
        for i, tblock in enumerate(tm.blocks):
            block = _block(model, i)
            ref = tblock(hidden, tctx_emb, temb6, (cos_t, sin_t))
            out = block(jnp.asarray(hidden.numpy()), jnp.asarray(tctx_emb.numpy()), jnp.asarray(temb6.numpy()),
                        (cos, sin), "xla", True)
            _close(out, ref.numpy())
            h = hidden.numpy()
            _close(block.attn1(jnp.asarray(h), None, (cos, sin), "xla", True),
                   tblock.attn1(hidden, None, None, (cos_t, sin_t)).numpy())
            _close(block.attn2(jnp.asarray(h), jnp.asarray(tctx_emb.numpy()), None, "xla", True),
                   tblock.attn2(hidden, tctx_emb, None, None).numpy())
            _close(block.ffn(jnp.asarray(h), True), tblock.ffn(hidden).numpy())
            hidden = ref
    q = jax.random.normal(jax.random.key(0), (1, cos.shape[0], 2, cfg.attention_head_dim))
    assert apply_rope(q, cos, sin).shape == q.shape


def test_remat_policies_and_unrolling_give_same_output_and_grad(pair):
    name, _, model, folder = pair
    if name != "odd_nonsquare":
        pytest.skip("the policies do not depend on the config; one config keeps the suite fast")
    x, t, ctx = _inputs(name)

    def loss(m):
        return jnp.mean(m(x, t, ctx) ** 2)

    ref_loss, ref_grad = nnx.value_and_grad(loss)(model)
    for policy, unroll in (("full", 1), ("dots", 1), ("attention", 1), ("attention_kernel", 1), ("none", True)):
        m = load_transformer(folder, attention="xla", remat=policy, scan_unroll=unroll)
        val, grad = nnx.jit(nnx.value_and_grad(loss))(m)
        np.testing.assert_allclose(val, ref_loss, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max() + 1e-30))


def test_bf16_within_tolerance_of_fp32(pair):
    """bf16 weights and activations (fp32 kept where diffusers keeps it) stay within 5% of max |fp32|."""
    name, _, model, folder = pair
    x, t, ctx = _inputs(name)
    ref = np.asarray(model(x, t, ctx))
    m16 = load_transformer(folder, dtype="bfloat16", attention="xla")
    params = flat_params(m16)
    assert params["blocks.attn1.to_q.kernel"].dtype == jnp.bfloat16
    assert params["condition_embedder.time_embedder.linear_1.kernel"].dtype == jnp.float32
    assert params["blocks.scale_shift_table"].dtype == jnp.float32
    out = m16(x, t, ctx)
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float32) - ref).max()
    assert err <= 5e-2 * np.abs(ref).max(), err


def test_sharded_load_matches_unsharded(pair):
    name, _, model, folder = pair
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    x, t, ctx = _inputs(name)
    mesh = make_mesh("data=2,fsdp=4")
    sharded = load_transformer(folder, attention="xla", mesh=mesh)
    kernel = flat_params(sharded)["blocks.ffn.net.0.proj.kernel"]
    assert "fsdp" in str(kernel.sharding.spec)
    assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape != kernel.shape
    out = nnx.jit(lambda m, x, t, c: m(x, t, c))(sharded, x, t, ctx)
    np.testing.assert_allclose(np.asarray(out), np.asarray(model(x, t, ctx)), rtol=1e-5, atol=1e-5)


def test_lora_switch_and_trainable_state(pair):
    name, _, model, folder = pair
    x, t, ctx = _inputs(name)
    lora = LoraConfig(rank=4, alpha=8.0)
    m = load_transformer(folder, attention="xla", lora=lora)
    lora_names = sorted(flat_params(m, LORA))
    n = model.config.num_layers
    assert lora_names == sorted(
        [f"condition_embedder.text_embedder.linear_{i}.lora_{ab}" for i in (1, 2) for ab in "AB"]
        + [f"blocks.attn2.to_{kv}.lora_{ab}" for kv in "kv" for ab in "AB"])
    assert flat_params(m, LORA)["blocks.attn2.to_k.lora_A"].shape[0] == n
    assert not set(lora_names) & set(flat_params(m, BASE))
    base_out = np.asarray(model(x, t, ctx))
    # B starts at zero: LoRA on == LoRA off == the base model. Bit for bit on the CPU; to rounding on a
    # GPU, where the two programs may fuse the base product differently (3.6e-7 apart on an H200).
    on, off = np.asarray(m(x, t, ctx)), np.asarray(m(x, t, ctx, use_lora=False))
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(on, off)
    else:
        _close(on, off, 1e-6)
    _close(m(x, t, ctx), base_out, 1e-6)
    # PEFT init: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B = 0
    a = np.asarray(flat_params(m, LORA)["condition_embedder.text_embedder.linear_1.lora_A"])
    bound = 1 / np.sqrt(model.config.text_dim)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.5 * bound
    # a non-zero B changes LoRA-on but not LoRA-off outputs
    state = nnx.state(m, LORA)
    nnx.update(m, jax.tree.map(lambda v: v + 0.1, state))
    assert np.abs(np.asarray(m(x, t, ctx)) - base_out).max() > 1e-4
    _close(m(x, t, ctx, use_lora=False), base_out, 1e-6)


def test_merged_lora_computes_what_the_lora_does(pair):
    """merge_lora (the loop's rounds start from it) folds every adapter into its kernel, blocks stacked."""
    name, _, model, folder = pair
    x, t, ctx = _inputs(name)
    lora = LoraConfig(rank=4, alpha=8.0)
    m = load_transformer(folder, attention="xla", lora=lora)
    rng = np.random.default_rng(1)
    nnx.update(m, jax.tree.map(lambda v: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32),
                               nnx.state(m, LORA)))
    base = {k: np.asarray(v) for k, v in flat_params(m, BASE).items()}
    merged = merge_lora(base, {k: np.asarray(v) for k, v in flat_params(m, LORA).items()}, lora.scale)
    changed = sorted(k for k in merged if not np.array_equal(merged[k], base[k]))
    assert changed == sorted(k.replace(".lora_A", ".kernel") for k in flat_params(m, LORA) if k.endswith(".lora_A"))
    plain = load_transformer(folder, attention="xla", lora=None)
    set_params(plain, {k: jnp.asarray(v) for k, v in merged.items()})
    with_lora = np.asarray(m(x, t, ctx))
    assert np.abs(with_lora - np.asarray(m(x, t, ctx, use_lora=False))).max() > 1e-3  # the LoRA matters
    _close(plain(x, t, ctx), with_lora, 1e-5)
    with pytest.raises(ValueError, match="pairs"):
        merge_lora(base, {"blocks.attn2.to_k.lora_A": np.zeros((1, 2, 3))}, 1.0)


def test_gradients_only_for_lora(pair):
    _, _, _, folder = pair
    name = pair[0]
    x, t, ctx = _inputs(name)
    m = load_transformer(folder, attention="xla", lora=LoraConfig(rank=2, alpha=2.0))
    diff = nnx.DiffState(0, LORA)
    grads = nnx.grad(lambda m: jnp.mean(m(x, t, ctx) ** 2), argnums=diff)(m)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(grads)}
    assert names and all(n.endswith((".lora_A", ".lora_B")) for n in names)


def test_bad_configs_and_targets(tmp_path):
    with pytest.raises(ValueError, match="image_dim"):
        WanConfig.from_diffusers({**CONFIGS["odd_nonsquare"], "image_dim": 1280})
    with pytest.raises(ValueError, match="qk_norm"):
        WanConfig(qk_norm="rms_norm")
    with pytest.raises(ValueError, match="does not know.*foo"):
        WanConfig.from_diffusers({**CONFIGS["odd_nonsquare"], "foo": 1})
    cfg = WanConfig.from_diffusers(CONFIGS["odd_nonsquare"])
    with pytest.raises(ValueError, match="matches no linear"):
        WanTransformer3DModel(cfg, lora=LoraConfig(targets=("attn3.to_k",)))
    with pytest.raises(ValueError, match="blocks.\\*"):
        WanTransformer3DModel(cfg, lora=LoraConfig(targets=("blocks.0.attn2.to_k",)))
    with pytest.raises(ValueError, match="remat"):
        WanTransformer3DModel(cfg, remat="sometimes")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_transformer(tmp_path / "nowhere")
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text(json.dumps({**CONFIGS["odd_nonsquare"], "rope_max_seq_len": 2}))
    torch.manual_seed(0)
    TorchWan(**{**CONFIGS["odd_nonsquare"], "rope_max_seq_len": 2}).save_pretrained(big)
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        load_transformer(big)(*_inputs("odd_nonsquare"))
    x, t, ctx = _inputs("odd_nonsquare")
    with pytest.raises(ValueError, match="per-token timesteps"):
        WanTransformer3DModel(WanConfig.from_diffusers(CONFIGS["odd_nonsquare"]))(x, jnp.zeros((x.shape[0], 7)), ctx)


def test_auto_attention_picks_cudnn_for_half_precision_on_gpu_else_blockwise(monkeypatch):

    q = jnp.zeros((1, 300, 2, 64), jnp.float32)
    calls = []
    monkeypatch.setattr(A, "_blockwise_attention", lambda q, k, v, b: calls.append("blockwise") or q)
    monkeypatch.setattr(A.jax, "default_backend", lambda: "cpu")  # the suite also runs on GPU backends
    A.attend(q, q, q, "auto")
    assert calls == ["blockwise"]
    monkeypatch.setattr(A.jax, "default_backend", lambda: "gpu")
    assert A._cudnn_supports(q.astype(jnp.bfloat16))
    assert not A._cudnn_supports(q)  # fp32: cuDNN's fused attention refuses it
    assert not A._cudnn_supports(jnp.zeros((1, 8, 2, 12), jnp.bfloat16))  # head dim not a multiple of 8
    # ... and then XLA's attention while its whole score matrix is small, the blockwise kernel beyond.
    xla = []
    monkeypatch.setattr(A.jax.nn, "dot_product_attention", lambda q, k, v, implementation: xla.append(implementation) or q)
    A.attend(q, q, q, "auto")
    assert xla == ["xla"] and calls == ["blockwise"]
    monkeypatch.setattr(A, "XLA_SCORES_MAX_BYTES", 4 * 2 * 300 * 300 - 1)
    A.attend(q, q, q, "auto")
    assert xla == ["xla"] and calls == ["blockwise", "blockwise"]


def test_state_dict_shape_mismatch_in_one_block_names_that_key():
    from spatialalign_jax.model.params import diffusers_from_flax, flax_from_diffusers

    torch.manual_seed(0)
    sd = {k: v.numpy() for k, v in TorchWan(**CONFIGS["odd_nonsquare"]).state_dict().items()}
    cfg = WanConfig.from_diffusers(CONFIGS["odd_nonsquare"])
    back = diffusers_from_flax(cfg, flax_from_diffusers(cfg, sd))
    assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
    sd["blocks.1.attn2.to_k.weight"] = sd["blocks.1.attn2.to_k.weight"][:, :-1]
    with pytest.raises(ValueError, match=r"shape mismatch for 'blocks.1.attn2.to_k.weight': got \(24, 23\).*\(24, 24\)"):
        flax_from_diffusers(cfg, sd)
