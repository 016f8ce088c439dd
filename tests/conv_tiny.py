"""Tiny random Wan2.1 models and LoRAs for the converter tests, built with diffusers and PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TINY_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=6,
    text_dim=16,
    freq_dim=32,
    ffn_dim=40,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)

# The original Wan config.json of TINY_CONFIG.
TINY_ORIGINAL_CONFIG = dict(
    _class_name="WanModel", model_type="t2v", patch_size=[1, 2, 2], text_len=512, in_dim=4, dim=24,
    ffn_dim=40, freq_dim=32, text_dim=16, out_dim=6, num_heads=2, num_layers=2, window_size=[-1, -1],
    qk_norm=True, cross_attn_norm=True, eps=1e-6,
)

LORA_TARGETS = [
    "condition_embedder.text_embedder.linear_1",
    "condition_embedder.text_embedder.linear_2",
    "blocks.0.attn2.to_k", "blocks.1.attn2.to_k",
    "blocks.0.attn2.to_v", "blocks.1.attn2.to_v",
]


def tiny_transformer(seed: int = 0, **overrides):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**{**TINY_CONFIG, **overrides}).eval()
    # Fresh norms are ones/zeros: randomise every parameter so a swapped name cannot go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


def add_random_lora(model, *, rank: int = 4, alpha: float = 8.0, targets=LORA_TARGETS, seed: int = 1):
    """Adds a PEFT LoRA with non-zero B (so it changes the output) and returns its LoraConfig."""
    from peft import LoraConfig

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    model.add_adapter(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return cfg


def peft_lora_state_dict(model) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def save_diffusers_lora(model, lora_cfg, folder: Path) -> Path:
    """Saves the model's LoRA as diffusers' training scripts do; returns the file."""
    from diffusers import WanPipeline

    WanPipeline.save_lora_weights(folder, transformer_lora_layers=peft_lora_state_dict(model),
                                  transformer_lora_adapter_metadata=lora_cfg.to_dict())
    return Path(folder) / "pytorch_lora_weights.safetensors"


def inputs(batch: int = 2, frames: int = 3, height: int = 4, width: int = 6, tokens: int = 5, seed: int = 0):
    """(latents, timesteps, text) for TINY_CONFIG, numpy float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, TINY_CONFIG["in_channels"], frames, height, width)).astype(np.float32)
    t = np.array([999.0, 311.5][:batch], np.float32)
    ctx = rng.standard_normal((batch, tokens, TINY_CONFIG["text_dim"])).astype(np.float32)
    return x, t, ctx


def torch_forward(model, x, t, ctx) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), return_dict=False)[0].numpy()


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2))


def assert_same_arrays(got, want) -> None:
    """Same names, and bit-equal values once both sides are float32."""
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:10]
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k], np.float32), np.asarray(want[k], np.float32), err_msg=k)


def original_lora_names(sd, factors=("lora_A", "lora_B"), adapter=""):
    """A diffusers-named LoRA state dict renamed to original-Wan module names (DiffSynth/Kohya layouts)."""
    from converters import layouts

    out = {}
    for k, v in sd.items():
        module, factor = k.rsplit(".lora_", 1)
        factor = factors[0] if factor.startswith("A") else factors[1]
        out[f"{layouts.diffusers_to_original_name(module)}.{factor}{adapter}.weight"] = v
    return out
