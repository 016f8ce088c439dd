"""The PyTorch reference DPO step on a tiny random diffusers WanTransformer3DModel."""

import copy
import math

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

from reference_torch.dpo_step import SPEC_LORA_TARGETS, TorchDpoStep, lr_lambda, preference_loss

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)
RANK, ALPHA = 4, 8.0


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return WanTransformer3DModel(**TINY).eval()


def make_batch(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    lat = lambda: torch.randn(b, 4, 2, 4, 4, generator=g)  # noqa: E731
    return dict(x0_w=lat(), x0_l=lat(), eps_w=lat(), eps_l=lat(), text_emb=torch.randn(b, 8, 16, generator=g),
                sigma=torch.rand(b, generator=g))


def random_lora(step, seed=2):
    g = torch.Generator().manual_seed(seed)
    return {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in step.lora_state_dict().items()}


def test_only_lora_params_are_trained_with_peft_names():
    model = tiny_model()
    step = TorchDpoStep(model, lora_rank=RANK, lora_alpha=ALPHA, lr=1e-3, warmup_steps=0)
    expected = {f"{m}.lora_{ab}.weight"
                for m in ["condition_embedder.text_embedder.linear_1", "condition_embedder.text_embedder.linear_2"]
                + [f"blocks.{i}.attn2.to_{kv}" for i in range(2) for kv in "kv"] for ab in "AB"}
    assert set(step.lora_state_dict()) == expected
    assert step.lora_state_dict()["blocks.0.attn2.to_k.lora_A.weight"].shape == (RANK, 24)
    assert step.lora_state_dict()["blocks.0.attn2.to_k.lora_B.weight"].shape == (24, RANK)
    # PEFT init: B = 0, A nonzero
    assert all(float(v.abs().sum()) == 0 for k, v in step.lora_state_dict().items() if "lora_B" in k)
    assert all(float(v.abs().sum()) > 0 for k, v in step.lora_state_dict().items() if "lora_A" in k)
    base_before = {k: v.clone() for k, v in step.base_state_dict().items()}
    assert set(base_before) == set(tiny_model().state_dict())

    step.load_lora_state_dict(random_lora(step))
    step.step(make_batch())
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and float(p.grad.abs().sum()) > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    grads = step.lora_grads()
    assert set(grads) == expected and all(float(g.abs().sum()) > 0 for g in grads.values())
    for k, v in step.base_state_dict().items():
        torch.testing.assert_close(v, base_before[k], rtol=0, atol=0)


def test_reference_output_is_the_base_model():
    model = tiny_model()
    base = copy.deepcopy(model)
    step = TorchDpoStep(model, lora_rank=RANK, lora_alpha=ALPHA, lr=1e-2, warmup_steps=0)
    step.load_lora_state_dict(random_lora(step))
    batch = make_batch()
    for _ in range(2):
        step.step(batch)
    x_t, sigma, text = batch["x0_w"], batch["sigma"], batch["text_emb"]
    with torch.no_grad():
        expected = base(x_t, sigma * 1000, text, return_dict=False)[0]
        ref = step.predict(x_t, sigma, text, adapter=False)
        lora = step.predict(x_t, sigma, text)
    torch.testing.assert_close(ref, expected, rtol=0, atol=0)
    assert float((lora - expected).abs().max()) > 1e-3
    # disabling for the reference leaves the adapter trainable afterwards
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def merged_copy(base, lora, scale):
    """The base model with W + scale * B @ A folded into each target: LoRA without PEFT."""
    merged = copy.deepcopy(base)
    sd = merged.state_dict()
    for key in {k.rsplit(".lora_", 1)[0] for k in lora}:
        sd[f"{key}.weight"] += scale * lora[f"{key}.lora_B.weight"] @ lora[f"{key}.lora_A.weight"]
    merged.load_state_dict(sd)
    return merged


def test_step0_loss_equals_hand_computation():
    model = tiny_model()
    base = copy.deepcopy(model)
    step = TorchDpoStep(model, lora_rank=RANK, lora_alpha=ALPHA, lr=1e-3, warmup_steps=0, beta=3.0)
    lora = random_lora(step)
    step.load_lora_state_dict(lora)
    merged = merged_copy(base, lora, ALPHA / RANK)
    batch = make_batch()
    out = step.step(batch)

    # By hand, with numpy in float64 from the two networks' outputs (SPEC section 5).
    b = {k: v.numpy().astype(np.float64) for k, v in batch.items()}
    s = b["sigma"].reshape(-1, 1, 1, 1, 1)
    xt_w, xt_l = (1 - s) * b["x0_w"] + s * b["eps_w"], (1 - s) * b["x0_l"] + s * b["eps_l"]
    v_w, v_l = b["eps_w"] - b["x0_w"], b["eps_l"] - b["x0_l"]

    def run(net, x):
        with torch.no_grad():
            y = net(torch.from_numpy(x).float(), batch["sigma"] * 1000, batch["text_emb"], return_dict=False)[0]
        return y.numpy().astype(np.float64)

    pred_w, pred_l, ref_w, ref_l = run(merged, xt_w), run(merged, xt_l), run(base, xt_w), run(base, xt_l)
    e = lambda a, t: ((a - t) ** 2).reshape(2, -1).mean(1)  # noqa: E731
    m = np.clip(3.0 * ((e(ref_w, v_w) - e(pred_w, v_w)) - (e(ref_l, v_l) - e(pred_l, v_l))), -5, 5)
    l_dpo = float(np.mean([math.log1p(math.exp(-mi)) for mi in m]))
    l_zo = 0.5 * (np.mean((pred_w - ref_w) ** 2) + np.mean((pred_l - ref_l) ** 2))
    assert l_zo > 1e-4  # the LoRA is active, so the regulariser is not trivially zero
    assert out["loss"] == pytest.approx(l_dpo + 0.5 * l_zo, rel=1e-5)
    assert out["loss_dpo"] == pytest.approx(l_dpo, rel=1e-5)
    assert out["loss_zo"] == pytest.approx(l_zo, rel=1e-4)
    assert out["reward_accuracy"] == float(np.mean(m > 0))


def test_loss_decreases_on_a_fixed_batch():
    step = TorchDpoStep(tiny_model(), lora_rank=RANK, lora_alpha=ALPHA, lr=1e-2, warmup_steps=0, total_steps=100)
    batch = make_batch()
    losses = [step.step(batch)["loss"] for _ in range(6)]
    assert losses[0] == pytest.approx(math.log(2), rel=1e-6)  # B = 0: LoRA model == reference
    assert losses[-1] < losses[0] - 0.02
    assert all(b < a for a, b in zip(losses, losses[1:]))


def test_gradient_accumulation_matches_one_big_batch():
    batch = make_batch(b=4)
    grads, losses = [], []
    for accum in (1, 2):
        step = TorchDpoStep(tiny_model(), lora_rank=RANK, lora_alpha=ALPHA, grad_accum=accum, warmup_steps=0)
        step.load_lora_state_dict(random_lora(step))
        losses.append(step.step(batch)["loss"])
        grads.append(step.lora_grads())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # numpy inputs (what the JAX side holds) give the same step
    step = TorchDpoStep(tiny_model(), lora_rank=RANK, lora_alpha=ALPHA, grad_accum=2, warmup_steps=0)
    step.load_lora_state_dict(random_lora(step))
    assert step.step({k: v.numpy() for k, v in batch.items()})["loss"] == pytest.approx(losses[1], rel=1e-6)
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="does not split into grad_accum=3"):
        TorchDpoStep(tiny_model(), lora_rank=RANK, grad_accum=3).step(batch)


def test_lr_schedule_and_adamw_settings():
    assert lr_lambda(0, 300, 3000) == 0.0
    assert lr_lambda(150, 300, 3000) == pytest.approx(0.5)
    assert lr_lambda(300, 300, 3000) == pytest.approx(1.0)
    assert lr_lambda(1650, 300, 3000) == pytest.approx(0.5)
    assert lr_lambda(2400, 300, 3000) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2100 / 2700)))
    assert lr_lambda(3000, 300, 3000) == pytest.approx(0.0, abs=1e-12)
    step = TorchDpoStep(tiny_model(), lora_rank=RANK, lr=1e-4, warmup_steps=3, total_steps=10)
    batch = make_batch()
    lrs = [step.step(batch)["lr"] for _ in range(4)]
    assert lrs == pytest.approx([0.0, 1e-4 / 3, 2e-4 / 3, 1e-4])
    group = step.optimizer.param_groups[0]
    assert (group["weight_decay"], group["betas"], group["eps"]) == (0.01, (0.9, 0.999), 1e-8)


def test_loss_function_hand_values_and_errors():
    # the same two-pair example as tests/test_losses.py: m = [2.375, -2.5], L_zo = 1.15625
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    args = [t([[1.5, 0.0], [0.0, 1.0]]), t([[0.0, 3.0], [1.0, 1.0]]), t([[2.0, 0.0], [0.0, 2.0]]),
            t([[0.0, 1.0], [1.0, 3.0]]), t([[1.0, 0.0], [0.0, 2.0]]), t([[0.0, 1.0], [1.0, 1.0]])]
    l_dpo = 0.5 * (math.log1p(math.exp(-2.375)) + math.log1p(math.exp(2.5)))
    loss, metrics = preference_loss(*args)
    assert float(loss) == pytest.approx(l_dpo + 0.5 * 1.15625, rel=1e-6)
    assert metrics["margin"] == pytest.approx(-0.0625) and metrics["reward_accuracy"] == 0.5
    loss, metrics = preference_loss(*args, kind="dpo", beta=4.0)
    assert float(loss) == pytest.approx(0.5 * (math.log1p(math.exp(-5)) + math.log1p(math.exp(5))), rel=1e-6)
    assert metrics["clip_fraction"] == 1.0
    loss, _ = preference_loss(*args, kind="dpo_sft")
    assert float(loss) == pytest.approx(l_dpo + 0.5 * 0.3125, rel=1e-6)
    loss, _ = preference_loss(args[0], None, None, None, args[4], None, kind="sft")
    assert float(loss) == pytest.approx(0.3125)
    with pytest.raises(ValueError, match="unknown loss kind 'ipo'"):
        preference_loss(*args, kind="ipo")
    step = TorchDpoStep(tiny_model(), lora_rank=RANK)
    with pytest.raises(ValueError, match=r"batch lacks \['sigma'\]"):
        step.step({k: v for k, v in make_batch().items() if k != "sigma"})
    with pytest.raises(ValueError, match="LoRA state dict mismatch"):
        step.load_lora_state_dict({})
    with pytest.raises(ValueError, match="matched no module"):
        TorchDpoStep(tiny_model(), targets=("blocks.*.attn9.to_q",))
    assert SPEC_LORA_TARGETS[2] == "blocks.*.attn2.to_k"
