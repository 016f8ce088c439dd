"""Configuration of the Flax Wan2.1 transformer and its LoRA.

Field names follow diffusers' `WanTransformer3DModel` config so a `config.json` maps over one to one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

# diffusers config keys that belong to image-to-video / Wan2.2 variants this model does not build.
_UNSUPPORTED_IF_SET = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
# Bookkeeping keys (diffusers writes several starting with "_") and options Wan2.1 T2V leaves at defaults.
_IGNORED_KEYS = ("window_size", "add_img_emb")


@dataclasses.dataclass(frozen=True)
class WanConfig:
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 12
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 8960
    num_layers: int = 30
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    rope_max_seq_len: int = 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries (t, h, w), got {self.patch_size}")
        if self.qk_norm not in (None, "rms_norm_across_heads"):
            raise ValueError(
                f"qk_norm={self.qk_norm!r} is not supported: this model implements "
                "'rms_norm_across_heads' (Wan2.1) or None"
            )
        if self.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim must be even for RoPE, got {self.attention_head_dim}")
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Head-dim split of the 3D RoPE into (frames, height, width), as Wan does."""
        h = w = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - h - w, h, w

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "WanConfig":
        """Builds from a diffusers `WanTransformer3DModel` config dict; refuses what it cannot represent."""
        for key in _UNSUPPORTED_IF_SET:
            if config.get(key) is not None:
                raise ValueError(
                    f"config sets {key}={config[key]!r}: that is an image-to-video / Wan2.2 variant, which "
                    "this text-to-video model cannot represent (expected it to be null or absent)"
                )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config
                         if k not in fields and not k.startswith("_") and k not in _IGNORED_KEYS + _UNSUPPORTED_IF_SET)
        if unknown:
            raise ValueError(f"config has keys this model does not know: {unknown}; expected keys from {sorted(fields)}")
        kwargs = {k: v for k, v in config.items() if k in fields}
        if "qk_norm" in kwargs and kwargs["qk_norm"] is True:  # older configs stored a bool
            kwargs["qk_norm"] = "rms_norm_across_heads"
        return cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        d.update({"_class_name": "WanTransformer3DModel", "image_dim": None, "added_kv_proj_dim": None,
                  "pos_embed_seq_len": None})
        return d


# Module paths (diffusers naming; `*` stands for every block) that get LoRA by default: SPEC section 5.
DEFAULT_LORA_TARGETS = (
    "condition_embedder.text_embedder.linear_1",
    "condition_embedder.text_embedder.linear_2",
    "blocks.*.attn2.to_k",
    "blocks.*.attn2.to_v",
)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank
