"""One SpatialAlign training step in PyTorch: the parity reference for the JAX step.

diffusers' ``WanTransformer3DModel`` with a PEFT LoRA adapter on the SPEC section 5 targets, the
SPEC loss (stated again here in torch, independently of ``spatialalign_jax.train.losses``), reference
predictions from the same network with the adapter disabled, ``torch.optim.AdamW`` with a
linear-warm-up + cosine ``LambdaLR`` and gradient accumulation.

Everything random is an input: a batch holds the clean latents, the text embeddings, the noise and
the sigmas, so the JAX side can be fed identical values::

    batch = {
        "x0_w": (B, C, F, H, W), "x0_l": (B, C, F, H, W),   # winner / loser latents
        "text_emb": (B, L, D),                                # zero-padded umT5 rows, shared by the pair
        "eps_w": (B, C, F, H, W), "eps_l": (B, C, F, H, W),  # independent (or equal) noise
        "sigma": (B,) or scalar,                              # one sigma per pair (or per batch)
    }

The step runs in the model's dtype (use float32 for parity); the adapter weights are fp32 whatever the
base dtype, as PEFT keeps them. It modifies ``transformer`` in place
(adds the adapter named ``"default"``).
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

# SPEC section 5: both linears of the text-embedding MLP and cross-attention K, V of every block.
SPEC_LORA_TARGETS = (
    "condition_embedder.text_embedder.linear_1",
    "condition_embedder.text_embedder.linear_2",
    "blocks.*.attn2.to_k",
    "blocks.*.attn2.to_v",
)
LOSS_KINDS = ("dpo_zo", "dpo", "dpo_sft", "sft", "dpo_random_pairs")
BATCH_KEYS = ("x0_w", "x0_l", "text_emb", "eps_w", "eps_l", "sigma")
NUM_TRAIN_TIMESTEPS = 1000


def target_regex(patterns: Iterable[str]) -> str:
    """A regex for PEFT's ``target_modules`` that full-matches module paths; ``*`` is one path item."""
    alternatives = [re.escape(p).replace(r"\*", r"[^.]+") for p in patterns]
    return "(" + "|".join(alternatives) + ")"


def lr_lambda(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warm-up from 0 over ``warmup_steps``, then cosine to 0 at ``total_steps``.

    As ``diffusers.optimization.get_cosine_schedule_with_warmup`` (and optax's
    ``warmup_cosine_decay_schedule(0, lr, warmup, total)``): step 0 has multiplier 0.
    """
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).square().flatten(1).mean(dim=1)


def preference_loss(
    pred_w: torch.Tensor,
    pred_l: torch.Tensor | None,
    ref_w: torch.Tensor | None,
    ref_l: torch.Tensor | None,
    target_w: torch.Tensor,
    target_l: torch.Tensor | None,
    *,
    kind: str = "dpo_zo",
    beta: float = 1.0,
    lam: float = 0.5,
    clip: float | None = 5.0,
    lam_sft: float = 0.5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SPEC section 5's loss in float32 torch (see ``spatialalign_jax.train.losses`` for the kinds)."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; choose one of {', '.join(LOSS_KINDS)}")
    e_w = _per_sample_mse(pred_w, target_w)
    if kind == "sft":
        loss = e_w.mean()
        return loss, {"loss": loss.item(), "loss_sft": loss.item(), "e_w": loss.item()}
    ref_w, ref_l = ref_w.detach(), ref_l.detach()
    e_l = _per_sample_mse(pred_l, target_l)
    e_ref_w = _per_sample_mse(ref_w, target_w)
    e_ref_l = _per_sample_mse(ref_l, target_l)
    m_raw = beta * ((e_ref_w - e_w) - (e_ref_l - e_l))
    m = m_raw if clip is None else m_raw.clamp(-clip, clip)
    loss_dpo = -F.logsigmoid(m).mean()
    loss_zo = 0.5 * (_per_sample_mse(pred_w, ref_w).mean() + _per_sample_mse(pred_l, ref_l).mean())
    loss_sft = e_w.mean()
    if kind in ("dpo_zo", "dpo_random_pairs"):
        loss = loss_dpo + lam * loss_zo
    elif kind == "dpo":
        loss = loss_dpo
    else:
        loss = loss_dpo + lam_sft * loss_sft
    metrics = {
        "loss": loss.item(), "loss_dpo": loss_dpo.item(), "loss_zo": loss_zo.item(), "e_w": loss_sft.item(),
        "e_l": e_l.mean().item(), "e_ref_w": e_ref_w.mean().item(), "e_ref_l": e_ref_l.mean().item(),
        "margin": m.mean().item(), "margin_unclipped": m_raw.mean().item(),
        "clip_fraction": (m != m_raw).float().mean().item(), "reward_accuracy": (m_raw > 0).float().mean().item(),
    }
    if kind == "dpo_sft":
        metrics["loss_sft"] = loss_sft.item()
    return loss, metrics


class TorchDpoStep:
    """A LoRA DPO trainer for one diffusers ``WanTransformer3DModel``: ``.step(batch)`` per update."""

    adapter_name = "default"

    def __init__(
        self,
        transformer: torch.nn.Module,
        *,
        lora_rank: int = 16,
        lora_alpha: float = 16.0,
        targets: Sequence[str] = SPEC_LORA_TARGETS,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_steps: int = 300,
        total_steps: int = 3000,
        grad_accum: int = 1,
        kind: str = "dpo_zo",
        beta: float = 1.0,
        lam: float = 0.5,
        clip: float | None = 5.0,
        lam_sft: float = 0.5,
    ) -> None:
        from peft import LoraConfig

        if kind not in LOSS_KINDS:
            raise ValueError(f"unknown loss kind {kind!r}; choose one of {', '.join(LOSS_KINDS)}")
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        self.transformer = transformer
        self.grad_accum = grad_accum
        self.loss_kwargs = dict(kind=kind, beta=beta, lam=lam, clip=clip, lam_sft=lam_sft)

        regex = target_regex(targets)
        unmatched = [t for t in targets
                     if not any(re.fullmatch(target_regex([t]), n) for n, _ in transformer.named_modules())]
        if unmatched:
            raise ValueError(f"LoRA targets {unmatched} matched no module of the transformer "
                             "(patterns use diffusers module paths, '*' for one path item)")
        transformer.requires_grad_(False)
        transformer.add_adapter(
            LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=regex, init_lora_weights=True),
            adapter_name=self.adapter_name,
        )
        self._lora_params = {self._peft_name(n): p for n, p in transformer.named_parameters() if "lora_" in n}
        for p in self._lora_params.values():
            # Adapter weights in fp32 under a half-precision base (diffusers' training scripts do the
            # same with `cast_training_params(..., torch.float32)`); `add_adapter` leaves the base dtype.
            p.data = p.data.float()
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(list(self._lora_params.values()), lr=lr, betas=betas, eps=eps,
                                           weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, warmup_steps, total_steps))
        self.step_count = 0
        self._grads: dict[str, torch.Tensor] = {}

    # ---- naming ---------------------------------------------------------------------------------
    def _peft_name(self, name: str) -> str:
        return name.replace(f".{self.adapter_name}.", ".")

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA weights in diffusers/PEFT naming (``blocks.0.attn2.to_k.lora_A.weight``), detached copies."""
        return {n: p.detach().clone() for n, p in self._lora_params.items()}

    def lora_grads(self) -> dict[str, torch.Tensor]:
        """Accumulated gradients of the last ``step`` (before its update), in the same naming."""
        return {n: g.clone() for n, g in self._grads.items()}

    def load_lora_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Sets every LoRA weight; keys and shapes must match ``lora_state_dict()`` exactly."""
        missing = sorted(set(self._lora_params) - set(sd))
        unexpected = sorted(set(sd) - set(self._lora_params))
        if missing or unexpected:
            raise ValueError(f"LoRA state dict mismatch: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for n, p in self._lora_params.items():
                v = torch.as_tensor(sd[n])
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"LoRA weight {n}: shape {tuple(v.shape)}, expected {tuple(p.shape)}")
                p.copy_(v.to(p.dtype))

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen base weights in plain diffusers naming (``blocks.0.attn2.to_k.weight``)."""
        return {n.replace(".base_layer.", "."): p.detach().clone()
                for n, p in self.transformer.state_dict().items() if "lora_" not in n}

    # ---- model ------------------------------------------------------------------------------------
    def predict(self, x_t: torch.Tensor, sigma: torch.Tensor, text_emb: torch.Tensor, *,
                adapter: bool = True) -> torch.Tensor:
        """The velocity at ``x_t``; timestep ``1000 * sigma``; ``adapter=False`` is the reference model."""
        timestep = (torch.as_tensor(sigma, dtype=torch.float32) * NUM_TRAIN_TIMESTEPS).expand(x_t.shape[0])
        x_t = x_t.to(self.transformer.dtype)
        text_emb = text_emb.to(self.transformer.dtype)
        if adapter:
            return self.transformer(x_t, timestep, text_emb, return_dict=False)[0]
        self.transformer.disable_adapters()
        try:
            return self.transformer(x_t, timestep, text_emb, return_dict=False)[0]
        finally:
            self.transformer.enable_adapters()

    def loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one micro-batch, with the graph for the LoRA gradients."""
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(f"batch lacks {missing}; a batch needs {list(BATCH_KEYS)}")
        # numpy arrays are welcome: the JAX side feeds the same host values
        x0_w, x0_l, eps_w, eps_l, text_emb = (torch.as_tensor(batch[k]).float()
                                              for k in ("x0_w", "x0_l", "eps_w", "eps_l", "text_emb"))
        b = x0_w.shape[0]
        sigma = torch.as_tensor(batch["sigma"], dtype=torch.float32).expand(b)
        s = sigma.view(-1, *([1] * (x0_w.ndim - 1)))
        x_t = torch.cat([(1 - s) * x0_w + s * eps_w, (1 - s) * x0_l + s * eps_l])
        target_w, target_l = eps_w - x0_w, eps_l - x0_l
        sigma2 = torch.cat([sigma, sigma])
        text2 = torch.cat([text_emb, text_emb])
        # Winner and loser in one forward pass, the reference (adapter off) without a graph.
        pred_w, pred_l = self.predict(x_t, sigma2, text2).float().split(b)
        if self.loss_kwargs["kind"] == "sft":
            return preference_loss(pred_w, None, None, None, target_w, None, **self.loss_kwargs)
        with torch.no_grad():
            ref_w, ref_l = self.predict(x_t, sigma2, text2, adapter=False).float().split(b)
        return preference_loss(pred_w, pred_l, ref_w, ref_l, target_w, target_l, **self.loss_kwargs)

    def _micro_batches(self, batch: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        if not isinstance(batch, Mapping):
            return list(batch)
        b = batch["x0_w"].shape[0]
        if b % self.grad_accum:
            raise ValueError(f"batch of {b} pairs does not split into grad_accum={self.grad_accum} equal parts")
        n = b // self.grad_accum

        def part(v: Any, i: int) -> Any:
            v = torch.as_tensor(v)
            return v if v.ndim == 0 else v[i * n:(i + 1) * n]

        return [{k: part(v, i) for k, v in batch.items()} for i in range(self.grad_accum)]

    def step(self, batch: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """One optimiser update over ``grad_accum`` micro-batches (a dict is split into equal parts).

        Returns the loss and metrics averaged over the micro-batches, the learning rate this update
        used and the step index.
        """
        micro = self._micro_batches(batch)
        self.transformer.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for mb in micro:
            loss, metrics = self.loss(mb)
            (loss / len(micro)).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v / len(micro)
        self._grads = {n: (p.grad.detach() if p.grad is not None else torch.zeros_like(p))
                       for n, p in self._lora_params.items()}
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        out = {**sums, "lr": lr, "step": self.step_count}
        self.step_count += 1
        return out
