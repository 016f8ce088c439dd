"""The jitted JAX training step against the PyTorch reference step, and sharded against one device.

Tolerances (fp32): loss rtol 1e-4; LoRA gradients and LoRA weights after 3 AdamW steps within
1e-4 x the largest magnitude of the torch tensor (absolute), elementwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel as TorchWan
from flax import nnx

from reference_torch.dpo_step import TorchDpoStep
from spatialalign_jax import load_transformer
from spatialalign_jax.model.config import LoraConfig, WanConfig
from spatialalign_jax.model.lora import BASE, LORA, set_params
from spatialalign_jax.model.params import lora_flax_from_peft, lora_peft_from_flax
from spatialalign_jax.model.sharding import make_mesh, microbatch_sharding
from spatialalign_jax.train.step import StepConfig, init_train_state, make_grad_fn, make_optimizer, make_train_step

TINY = dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
            freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
RANK, ALPHA = 4, 8.0
ACCUM, MICRO = 2, 2
LAT = (4, 3, 4, 6)  # odd frames, non-square


def _batches(n_steps, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_steps):
        lat = lambda: rng.standard_normal((ACCUM, MICRO, *LAT)).astype(np.float32)  # noqa: E731
        out.append(dict(latents_w=lat(), latents_l=lat(), eps_w=lat(), eps_l=lat(),
                        text_emb=rng.standard_normal((ACCUM, MICRO, 5, 16)).astype(np.float32),
                        sigma=rng.uniform(0.05, 0.95, (ACCUM, MICRO)).astype(np.float32)))
    return out


def _torch_micro(batch):
    rename = {"latents_w": "x0_w", "latents_l": "x0_l"}
    return [{rename.get(k, k): torch.from_numpy(v[i]) for k, v in batch.items()} for i in range(ACCUM)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    tm = TorchWan(**TINY)
    folder = tmp_path_factory.mktemp("wan")
    tm.save_pretrained(folder)
    kw = dict(lr=1e-3, weight_decay=0.01, warmup_steps=1, total_steps=10)
    ref = TorchDpoStep(tm, lora_rank=RANK, lora_alpha=ALPHA, grad_accum=ACCUM, **kw)
    g = torch.Generator().manual_seed(3)  # B != 0 so every LoRA weight has a gradient
    ref.load_lora_state_dict({k: 0.2 * torch.randn(v.shape, generator=g) for k, v in ref.lora_state_dict().items()})
    lora_cfg = LoraConfig(rank=RANK, alpha=ALPHA)
    model = load_transformer(folder, attention="xla", lora=lora_cfg)
    cfg = WanConfig.from_diffusers(TINY)
    lora0 = lora_flax_from_peft(cfg, lora_cfg, {k: v.numpy() for k, v in ref.lora_state_dict().items()})
    set_params(model, {k: jnp.asarray(v) for k, v in lora0.items()}, strict=False)
    step_cfg = StepConfig(**kw)
    return ref, model, cfg, lora_cfg, step_cfg, folder, lora0


def _close(a, b, rel=1e-4):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=0, atol=rel * max(np.abs(b).max(), 1e-12))


def test_step_matches_pytorch_reference(setup):
    ref, model, cfg, lora_cfg, step_cfg, _, _ = setup
    batches = _batches(3)
    base = nnx.state(model, BASE)
    grads, _ = jax.jit(make_grad_fn(nnx.split(model, BASE, LORA)[0], step_cfg))(
        nnx.state(model, LORA), base, batches[0], jax.random.key(0))
    optimizer = make_optimizer(step_cfg)
    state = init_train_state(model, optimizer)
    step = make_train_step(model, step_cfg, optimizer)
    for i, batch in enumerate(batches):
        torch_out = ref.step(_torch_micro(batch))
        state, metrics = step(state, base, batch, jax.random.key(i))
        np.testing.assert_allclose(float(metrics["loss"]), torch_out["loss"], rtol=1e-4)
        np.testing.assert_allclose(float(metrics["lr"]), torch_out["lr"], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(float(metrics["margin"]), torch_out["margin"], rtol=1e-3, atol=1e-6)
        if i == 0:
            flat_grads = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(grads)}
            torch_grads = ref.lora_grads()
            for name, g in lora_peft_from_flax(cfg, lora_cfg, flat_grads).items():
                assert np.abs(torch_grads[name].numpy()).max() > 0, name
                _close(g, torch_grads[name].numpy())
    lora_after = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(state["lora"])}
    torch_after = ref.lora_state_dict()
    for name, w in lora_peft_from_flax(cfg, lora_cfg, lora_after).items():
        _close(w, torch_after[name].numpy())
    assert int(state["step"]) == 3


def test_sharded_step_matches_single_device(setup):
    _, _, _, lora_cfg, step_cfg, folder, lora0 = setup
    batches = [{k: v for k, v in b.items() if k in ("latents_w", "latents_l", "text_emb")}
               for b in _batches(5, seed=1)]
    # 8 pairs per micro-batch, so each of the 8 devices holds one
    batches = [{k: np.concatenate([v] * 4, axis=1) for k, v in b.items()} for b in batches]

    def run(mesh):
        model = load_transformer(folder, attention="xla", lora=lora_cfg, mesh=mesh)
        set_params(model, {k: jnp.asarray(v) for k, v in lora0.items()}, strict=False)
        optimizer = make_optimizer(step_cfg)
        state = init_train_state(model, optimizer, mesh)
        step = make_train_step(model, step_cfg, optimizer, mesh)
        base = nnx.state(model, BASE)
        losses = []
        for i, b in enumerate(batches):
            if mesh is not None:
                b = {k: jax.device_put(v, microbatch_sharding(mesh, v.ndim)) for k, v in b.items()}
            state, metrics = step(state, base, b, jax.random.fold_in(jax.random.key(7), i))
            losses.append(float(metrics["loss"]))
        return np.array(losses), state

    single, s1 = run(None)
    sharded, s8 = run(make_mesh("data=2,fsdp=4"))
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s8["lora"]), jax.tree.leaves(s1["lora"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert len(set(np.round(single, 6))) > 1  # the losses move


def test_partial_noise_is_an_error(setup):
    _, model, _, _, step_cfg, _, _ = setup
    batch = {k: v for k, v in _batches(1)[0].items() if k != "sigma"}
    grad_fn = make_grad_fn(nnx.split(model, BASE, LORA)[0], step_cfg)
    with pytest.raises(ValueError, match="bring all of"):
        grad_fn(nnx.state(model, LORA), nnx.state(model, BASE), batch, jax.random.key(0))


def test_one_timestep_for_the_whole_accumulated_batch():
    """SPEC 5: a step draws one timestep index for its whole batch, every micro-batch of the gradient
    accumulation included; `per_pair_timestep` draws one per pair."""
    from spatialalign_jax.sample import schedule
    from spatialalign_jax.train.step import StepConfig, draw_sigmas

    table = schedule.sigmas()
    shared = np.asarray(draw_sigmas(jax.random.key(3), 12, 4, StepConfig()))
    assert shared.shape == (12, 4) and len(np.unique(shared)) == 1 and np.isin(shared, table).all()
    per_pair = np.asarray(draw_sigmas(jax.random.key(3), 12, 4, StepConfig(per_pair_timestep=True)))
    assert per_pair.shape == (12, 4) and len(np.unique(per_pair)) > 1 and np.isin(per_pair, table).all()


def test_sharding_rules(caplog):
    """The one rule table: LoRA, biases and norm scales whole; weights split over fsdp along their
    largest axis the fsdp size divides, never the scanned layer axis; a large weight that no axis
    allows stays whole, with a warning."""
    import logging

    from jax.sharding import PartitionSpec as P

    from spatialalign_jax.model.sharding import make_mesh, param_shardings

    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: tests/conftest.py gives the CPU 8, a one-GPU backend has 1")
    mesh = make_mesh("data=1,fsdp=8")
    shapes = {"blocks.attn2.to_k.lora_A": (4, 64, 16), "blocks.norm2.scale": (4, 64), "proj_out.bias": (64,),
              "blocks.ffn.net.0.proj.kernel": (8, 64, 256), "patch_embedding.kernel": (1, 2, 2, 16, 1536),
              "blocks.attn1.to_q.kernel": (4, 1500, 500)}
    with caplog.at_level(logging.WARNING):
        specs = {k: v.spec for k, v in param_shardings(shapes, mesh).items()}
    assert specs == {"blocks.attn2.to_k.lora_A": P(), "blocks.norm2.scale": P(), "proj_out.bias": P(),
                     "blocks.ffn.net.0.proj.kernel": P(None, None, "fsdp"),
                     "patch_embedding.kernel": P(None, None, None, None, "fsdp"),
                     "blocks.attn1.to_q.kernel": P()}
    assert "blocks.attn1.to_q.kernel" in caplog.text and "fsdp=8" in caplog.text
