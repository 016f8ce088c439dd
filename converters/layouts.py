"""Key layouts of Wan2.1 weights: the original Wan layout, diffusers' layout, and LoRA layouts.

Everything here works on plain `{name: numpy array}` dicts and names; reading files is `io.py`'s job.
The base-weight mapping follows diffusers' `scripts/convert_wan_to_diffusers.py` (and
`convert_wan_transformer_to_diffusers` in `diffusers/loaders/single_file_utils.py`), written as
whole-segment module renames so that it runs both ways.

One file (over 500 lines) on purpose: the LoRA layouts (second half) are the base-weight renames of the
first half applied to LoRA modules, through the same private tables (`_TOP_LEVEL`, `_IN_BLOCK`,
`_rename`, musubi's spelling of them); split, those tables would become a cross-module API.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from typing import Any, Iterable, Mapping

import numpy as np

log = logging.getLogger(__name__)

# Module renames original Wan -> diffusers outside the blocks. Parameters that are not `module.weight`
# (`head.modulation`) are listed as full parameter paths; `_rename` matches whole dotted segments.
_TOP_LEVEL = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
    # Image-to-video (I2V / FLF2V) modules: mapped so that such a checkpoint reaches the config check
    # and is refused there with a clear message instead of failing on key names.
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
}

# Renames inside `blocks.N.`. The original block applies norm1, norm3 (cross-attention, affine),
# norm2 (FFN, no parameters); diffusers numbers them in call order, so only norm3 -> norm2 has weights.
_IN_BLOCK = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2",
    "norm2": "norm3",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "modulation": "scale_shift_table",
}

_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")

# Prefixes that wrappers put in front of the model's own names (ComfyUI/original checkpoints, PEFT,
# diffusers pipelines). Longest first so that `model.diffusion_model.` wins over `model.`.
KNOWN_PREFIXES = (
    "base_model.model.",
    "model.diffusion_model.",
    "diffusion_model.",
    "transformer.",
    "pipe.dit.",
    "dit.",
    "model.",
)


def _invert(table: Mapping[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


_TOP_LEVEL_INV = _invert(_TOP_LEVEL)
_IN_BLOCK_INV = _invert(_IN_BLOCK)


def _rename(path: str, top: Mapping[str, str], in_block: Mapping[str, str]) -> str | None:
    """Renames the longest known module prefix of `path` (whole segments); None when nothing matches."""
    m = _BLOCK_RE.fullmatch(path)
    table, head, rest = (in_block, f"blocks.{m[1]}.", m[2]) if m else (top, "", path)
    for old in sorted(table, key=len, reverse=True):
        if rest == old or rest.startswith(old + "."):
            return head + table[old] + rest[len(old):]
    return None


def original_to_diffusers_name(name: str) -> str | None:
    """Maps an original-layout parameter or module path to diffusers naming (None if unknown)."""
    return _rename(name, _TOP_LEVEL, _IN_BLOCK)


def diffusers_to_original_name(name: str) -> str | None:
    """Maps a diffusers parameter or module path to the original Wan naming (None if unknown)."""
    return _rename(name, _TOP_LEVEL_INV, _IN_BLOCK_INV)


def common_prefix(keys: Iterable[str], prefixes: Iterable[str] = KNOWN_PREFIXES) -> str:
    """The known wrapper prefix that every key carries ('' when none does)."""
    keys = list(keys)
    for p in prefixes:
        if keys and all(k.startswith(p) for k in keys):
            return p
    return ""


def _remove_prefix(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Drops wrapper prefixes, repeatedly (`model.diffusion_model.` is itself two of them)."""
    out = dict(sd)
    while (p := common_prefix(out)):
        out = {k[len(p):]: v for k, v in out.items()}
    return out


def format_keys(keys: Iterable[str], n: int = 5) -> str:
    """The first `n` keys, quoted, for error messages ("'a', 'b' (and 3 more)")."""
    keys = sorted(keys)
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


# ----------------------------------------------------------------------------------------------------
# Base weights


def is_original_layout(keys: Iterable[str]) -> bool:
    """True when the state dict uses the original Wan names (e.g. `head.modulation`, `blocks.0.self_attn.q`)."""
    stripped = list(_remove_prefix(dict.fromkeys(keys)))
    return any(k.startswith(("head.", "text_embedding.", "time_embedding.")) or ".self_attn." in k
               for k in stripped)


def original_to_diffusers(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Renames an original-layout Wan state dict (any wrapper prefix) to diffusers' names.

    Tensors are passed through untouched (the two layouts store the same shapes). Keys outside the
    mapping raise a ValueError that names them.
    """
    sd = _remove_prefix(sd)
    out, unknown = {}, []
    for key, value in sd.items():
        new = original_to_diffusers_name(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(
            f"unexpected keys in original-layout Wan checkpoint: {format_keys(unknown)}; expected names "
            "like 'blocks.0.self_attn.q.weight', 'head.head.weight' (see diffusers' scripts/convert_wan_to_diffusers.py)"
        )
    return out


def diffusers_to_original(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Renames a diffusers `WanTransformer3DModel` state dict to the original Wan names."""
    out, unknown = {}, []
    for key, value in sd.items():
        new = diffusers_to_original_name(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(f"unexpected keys in diffusers Wan state dict: {format_keys(unknown)}")
    return out


def original_config_to_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """Maps an original Wan `config.json` (dim, num_heads, in_dim, ...) to diffusers' config names.

    Models other than text-to-video (model_type i2v, flf2v, vace, ...) are refused.
    """
    required = ("dim", "num_heads", "ffn_dim", "num_layers")
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"original Wan config lacks {missing}; expected at least {list(required)}")
    dim, heads = int(config["dim"]), int(config["num_heads"])
    if dim % heads:
        raise ValueError(f"original Wan config: dim={dim} is not divisible by num_heads={heads}")
    model_type = config.get("model_type", "t2v")
    if model_type != "t2v":
        raise ValueError(
            f"original Wan config has model_type={model_type!r}: only text-to-video ('t2v') models can be "
            "represented (image-to-video, first-last-frame and VACE models have conditioning layers this model "
            "lacks; TI2V's per-token timesteps are not implemented)"
        )
    out: dict[str, Any] = {
        "patch_size": list(config.get("patch_size", (1, 2, 2))),
        "num_attention_heads": heads,
        "attention_head_dim": dim // heads,
        "in_channels": int(config.get("in_dim", 16)),
        "out_channels": int(config.get("out_dim", 16)),
        "text_dim": int(config.get("text_dim", 4096)),
        "freq_dim": int(config.get("freq_dim", 256)),
        "ffn_dim": int(config["ffn_dim"]),
        "num_layers": int(config["num_layers"]),
        "cross_attn_norm": bool(config.get("cross_attn_norm", True)),
        "qk_norm": "rms_norm_across_heads" if config.get("qk_norm", True) else None,
        "eps": float(config.get("eps", 1e-6)),
    }
    return out


# Wan checkpoints published so far all use 128-dim heads; the state dict cannot tell the head count.
_DEFAULT_HEAD_DIM = 128


def infer_diffusers_config(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Infers a diffusers config from a diffusers-named state dict's tensor shapes.

    The head count is not visible in any shape: it is taken as dim / 128, which holds for every
    released Wan2.1 model; pass a config file when that is not the case.
    """
    def shape(name: str) -> tuple[int, ...]:
        if name not in sd:
            raise ValueError(f"cannot infer the model config: checkpoint has no {name!r}; pass a config.json")
        return tuple(sd[name].shape)

    dim, in_ch, pt, ph, pw = shape("patch_embedding.weight")
    if dim % _DEFAULT_HEAD_DIM:
        raise ValueError(
            f"cannot infer the head count of a model with dim={dim} (not a multiple of {_DEFAULT_HEAD_DIM}); "
            "pass a config.json with num_attention_heads"
        )
    blocks = {int(m[1]) for k in sd if (m := _BLOCK_RE.fullmatch(k))}
    out_features = shape("proj_out.weight")[0]
    config = {
        "patch_size": [pt, ph, pw],
        "num_attention_heads": dim // _DEFAULT_HEAD_DIM,
        "attention_head_dim": _DEFAULT_HEAD_DIM,
        "in_channels": in_ch,
        "out_channels": out_features // (pt * ph * pw),
        "text_dim": shape("condition_embedder.text_embedder.linear_1.weight")[1],
        "freq_dim": shape("condition_embedder.time_embedder.linear_1.weight")[1],
        "ffn_dim": shape("blocks.0.ffn.net.0.proj.weight")[0],
        "num_layers": max(blocks) + 1 if blocks else 0,
        "cross_attn_norm": "blocks.0.norm2.weight" in sd,
        "qk_norm": "rms_norm_across_heads" if "blocks.0.attn1.norm_q.weight" in sd else None,
        "eps": 1e-6,
    }
    image_keys = [k for k in sd if k.startswith("condition_embedder.image_embedder.") or ".add_k_proj." in k]
    if image_keys:
        raise ValueError(
            f"checkpoint has image-conditioning weights ({format_keys(image_keys, 2)}): an image-to-video "
            "model, which this text-to-video model cannot represent"
        )
    return config


# ----------------------------------------------------------------------------------------------------
# LoRA

LAYOUT_DIFFUSERS = "diffusers/PEFT"
LAYOUT_ORIGINAL = "original/DiffSynth"
ACCEPTED_LORA_LAYOUTS = (
    "diffusers/PEFT: 'transformer.blocks.0.attn2.to_k.lora_A.weight' (with or without 'transformer.')",
    "original/DiffSynth: 'blocks.0.cross_attn.k.lora_A.default.weight' or 'blocks.0.cross_attn.k.lora_A.weight'",
    "original kohya-style: 'diffusion_model.blocks.0.cross_attn.k.lora_down.weight' / 'lora_up' / '.alpha'",
    "musubi-tuner: 'lora_unet_blocks_0_cross_attn_k.lora_down.weight' / 'lora_up' / '.alpha'",
)
# musubi-tuner (kohya) writes original module paths with '_' for '.' behind 'lora_unet_'.
MUSUBI_PREFIX = "lora_unet_"
_MUSUBI_TOP = {k.replace(".", "_"): k for k in _TOP_LEVEL}
_MUSUBI_IN_BLOCK = {k.replace(".", "_"): k for k in _IN_BLOCK}
_MUSUBI_BLOCK_RE = re.compile(r"blocks_(\d+)_(.+)")


def _musubi_to_original(key: str) -> str:
    """`lora_unet_blocks_0_self_attn_q.lora_down.weight` -> `blocks.0.self_attn.q.lora_down.weight`;
    a key of a module it does not know stays as it is (and is reported as unknown)."""
    module, dot, leaf = key.removeprefix(MUSUBI_PREFIX).partition(".")
    m = _MUSUBI_BLOCK_RE.fullmatch(module)
    if m and m[2] in _MUSUBI_IN_BLOCK:
        return f"blocks.{m[1]}.{_MUSUBI_IN_BLOCK[m[2]]}" + dot + leaf
    if module in _MUSUBI_TOP:
        return _MUSUBI_TOP[module] + dot + leaf
    return key

# A LoRA key is `<module>.<leaf>`; the leaf says which factor it is. PEFT's adapter name (usually
# `default`) may sit between the factor and `weight`.
_LORA_LEAF_RE = re.compile(
    r"(?P<module>.+)\.(?:(?P<factor>lora_A|lora_B|lora_down|lora_up)(?:\.[A-Za-z0-9_-]+)?\.weight|(?P<alpha>alpha))"
)
_FACTOR = {"lora_A": "A", "lora_down": "A", "lora_B": "B", "lora_up": "B"}


def _is_diffusers_module(path: str) -> bool:
    return diffusers_to_original_name(path) is not None


def _is_original_module(path: str) -> bool:
    return original_to_diffusers_name(path) is not None


@dataclasses.dataclass
class CanonicalLora:
    """A LoRA in diffusers/PEFT naming without prefix, with one rank and one alpha for all modules.

    `weights` maps `blocks.0.attn2.to_k.lora_A.weight` -> (r, in) and `...lora_B.weight` -> (out, r),
    float32. The forward contribution of each module is (alpha / rank) * B @ A @ x.
    """

    weights: dict[str, np.ndarray]
    rank: int
    alpha: float
    layout: str
    alpha_source: str

    @property
    def modules(self) -> list[str]:
        return sorted({k.rsplit(".lora_", 1)[0] for k in self.weights})

    @property
    def targets(self) -> tuple[str, ...]:
        """Module patterns with `*` for the block index, as `LoraConfig.targets` takes them."""
        return tuple(sorted({re.sub(r"^blocks\.\d+\.", "blocks.*.", m) for m in self.modules}))


def _alphas_from_metadata(metadata: Mapping[str, Any] | None) -> tuple[float | None, dict[str, float]]:
    """(global alpha, per-module-pattern alphas) from a diffusers/PEFT adapter config dict."""
    if not metadata:
        return None, {}
    # diffusers prefixes every entry with the component name (`transformer.lora_alpha`).
    md = {k.removeprefix("transformer."): v for k, v in metadata.items()}
    alpha = md.get("lora_alpha")
    return (float(alpha) if alpha is not None else None), {k: float(v) for k, v in (md.get("alpha_pattern") or {}).items()}


def _pattern_alpha(module: str, patterns: Mapping[str, float]) -> float | None:
    # PEFT matches alpha_pattern keys as a suffix of the module name (or as a regex).
    for pat, a in patterns.items():
        if module == pat or module.endswith("." + pat) or re.fullmatch(pat, module):
            return a
    return None


def normalize_lora(
    sd: Mapping[str, np.ndarray],
    *,
    metadata: Mapping[str, Any] | None = None,
    alpha: float | None = None,
    source: str = "LoRA file",
) -> CanonicalLora:
    """Brings a LoRA state dict in any accepted layout to `CanonicalLora`.

    Alpha, in order of precedence: the `alpha` argument (the CLI's --lora-alpha), per-module `.alpha`
    keys, the adapter metadata (`lora_alpha`, `alpha_pattern`), else alpha = rank (PEFT's convention
    for weights that carry no alpha), logged. An rsLoRA adapter (`use_rslora` in the metadata) becomes
    the plain LoRA of the same scale. Modules whose rank or alpha differ from the common one
    are brought to it exactly: A is zero-padded to the largest rank and the scale ratio folded into B.
    """
    sd = _remove_prefix(sd)
    if not sd:
        raise ValueError(f"{source} holds no tensors; expected LoRA factors in one of:\n  " + "\n  ".join(ACCEPTED_LORA_LAYOUTS))
    if all(k.startswith(MUSUBI_PREFIX) for k in sd):
        sd = {_musubi_to_original(k): v for k, v in sd.items()}
    # Full-weight diffs that are all zero change nothing (distillation LoRAs ship zeroed norm diffs), so
    # they are dropped; others are refused below. diffusers also drops norm diffs that are merely small
    # (< 1.6e-2), which changes the model a little: such a file loads there, not here.
    zero_diffs = {k for k, v in sd.items() if k.endswith((".diff", ".diff_b")) and not np.any(np.asarray(v))}
    if zero_diffs:
        log.info("%s: dropped %d all-zero weight diffs (%s)", source, len(zero_diffs), format_keys(sorted(zero_diffs), 2))
        sd = {k: v for k, v in sd.items() if k not in zero_diffs}
        if not sd:
            raise ValueError(f"{source} holds only all-zero weight diffs, no LoRA factors")
    unsupported = [k for k in sd if k.endswith((".lora_B.bias", ".diff_b", ".diff", ".dora_scale"))
                   or "lora_magnitude_vector" in k]
    if unsupported:
        raise ValueError(
            f"{source} holds LoRA parts this model does not implement (LoRA bias 'lora_B.bias'/'diff_b', full "
            f"weight diffs '.diff', DoRA): {format_keys(unsupported)}; only plain low-rank A/B factors load"
        )
    factors: dict[str, dict[str, np.ndarray]] = {}
    key_alphas: dict[str, float] = {}
    not_lora = []
    for key, value in sd.items():
        m = _LORA_LEAF_RE.fullmatch(key)
        if m is None:
            not_lora.append(key)
        elif m["alpha"]:
            key_alphas[m["module"]] = float(np.asarray(value, dtype=np.float64).reshape(-1)[0])
        else:
            factors.setdefault(m["module"], {})[_FACTOR[m["factor"]]] = value
    if not_lora or not factors:
        bad = not_lora or list(sd)
        raise ValueError(
            f"unknown LoRA layout in {source}: keys {format_keys(bad)} are not LoRA factors of a Wan "
            "module. Accepted layouts:\n  " + "\n  ".join(ACCEPTED_LORA_LAYOUTS)
        )

    modules = list(factors)
    if all(_is_diffusers_module(m) for m in modules):
        layout, to_diffusers = LAYOUT_DIFFUSERS, (lambda m: m)
    elif all(_is_original_module(m) for m in modules):
        layout, to_diffusers = LAYOUT_ORIGINAL, original_to_diffusers_name
    else:
        bad = {m for m in modules if not (_is_diffusers_module(m) or _is_original_module(m))}
        bad_keys = [k for k in sd if k.startswith(tuple(f"{m}." for m in bad))]
        raise ValueError(
            f"unknown LoRA layout in {source}: "
            + (f"keys {format_keys(bad_keys)} are not LoRA factors of Wan2.1 transformer modules" if bad
               else "it mixes diffusers and original module names")
            + ". Accepted layouts:\n  " + "\n  ".join(ACCEPTED_LORA_LAYOUTS)
        )

    incomplete = [m for m, f in factors.items() if set(f) != {"A", "B"}]
    if incomplete:
        raise ValueError(f"{source}: LoRA modules without both A (down) and B (up) factors: {format_keys(incomplete)}")
    orphan_alphas = [m for m in key_alphas if m not in factors]
    if orphan_alphas:
        raise ValueError(f"{source}: '.alpha' keys for modules without LoRA weights: {format_keys(orphan_alphas)}")

    ranks: dict[str, int] = {}
    for m, f in factors.items():
        a, b = f["A"], f["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{source}: LoRA factors of {m!r} have shapes A {tuple(a.shape)}, B {tuple(b.shape)}; "
                "expected A (rank, in) and B (out, rank)"
            )
        ranks[m] = a.shape[0]

    md_alpha, md_patterns = _alphas_from_metadata(metadata)
    per_module: dict[str, float] = {}
    if alpha is not None:
        alpha_source = "--lora-alpha"
        per_module = {m: float(alpha) for m in factors}
        if key_alphas or md_alpha is not None:
            log.warning("%s: --lora-alpha %s overrides the alpha stored in the file", source, alpha)
    elif key_alphas:
        alpha_source = "per-module .alpha keys"
        # A module without its own alpha runs at scale 1, as diffusers' converter treats it.
        missing = [m for m in factors if m not in key_alphas]
        if missing:
            log.info("%s: modules without '.alpha' keys use alpha = rank: %s", source, format_keys(missing))
        per_module = {m: key_alphas.get(m, float(ranks[m])) for m in factors}
    elif md_alpha is not None:
        alpha_source = "adapter metadata"
        for m in factors:
            pat = _pattern_alpha(to_diffusers(m), md_patterns)
            per_module[m] = pat if pat is not None else md_alpha
    else:
        alpha_source = "rank (no alpha in file)"
        per_module = {m: float(r) for m, r in ranks.items()}
        log.info("%s carries no alpha: using alpha = rank (scale 1), PEFT's convention; "
                 "pass --lora-alpha to override", source)

    if metadata and {k.removeprefix("transformer."): v for k, v in metadata.items()}.get("use_rslora"):
        # rsLoRA scales by alpha / sqrt(r): the same as plain LoRA with alpha * sqrt(r)
        per_module = {m: a * float(np.sqrt(ranks[m])) for m, a in per_module.items()}
        log.info("%s uses rsLoRA (scale alpha / sqrt(rank)): stored as plain LoRA with alpha * sqrt(rank)", source)
    rank = max(ranks.values())
    # The most common alpha among full-rank modules keeps most modules bit-identical.
    alpha_out = Counter(per_module[m] for m in factors if ranks[m] == rank).most_common(1)[0][0]
    scale = alpha_out / rank
    weights: dict[str, np.ndarray] = {}
    refolded = []
    for m, f in factors.items():
        a = np.asarray(f["A"], dtype=np.float32)
        b = np.asarray(f["B"], dtype=np.float32)
        r = ranks[m]
        module_scale = per_module[m] / r
        if r != rank:
            a = np.concatenate([a, np.zeros((rank - r, a.shape[1]), np.float32)], axis=0)
            b = np.concatenate([b, np.zeros((b.shape[0], rank - r), np.float32)], axis=1)
        if module_scale != scale:
            b = b * np.float32(module_scale / scale)
            refolded.append(m)
        name = to_diffusers(m)
        weights[f"{name}.lora_A.weight"] = a
        weights[f"{name}.lora_B.weight"] = b
    if refolded:
        log.info("%s: %d modules differ in rank or alpha from rank=%d alpha=%g; their scale was folded into B "
                 "(exact)", source, len(refolded), rank, alpha_out)
    return CanonicalLora(weights=weights, rank=rank, alpha=alpha_out, layout=layout, alpha_source=alpha_source)


def fill_missing_blocks(lora: CanonicalLora, num_layers: int, shapes: Mapping[str, tuple[int, int]]) -> CanonicalLora:
    """Adds zero factors for blocks a LoRA leaves out, so every block of a stacked target has one.

    `shapes` maps a target pattern (`blocks.*.attn2.to_k`) to the (in, out) features of its linear.
    Zero A and B contribute nothing, so the model is unchanged.
    """
    weights = dict(lora.weights)
    added = 0
    for target in lora.targets:
        if not target.startswith("blocks.*."):
            continue
        fan_in, fan_out = shapes[target]
        for i in range(num_layers):
            name = target.replace("*", str(i), 1)
            if f"{name}.lora_A.weight" not in weights:
                weights[f"{name}.lora_A.weight"] = np.zeros((lora.rank, fan_in), np.float32)
                weights[f"{name}.lora_B.weight"] = np.zeros((fan_out, lora.rank), np.float32)
                added += 1
    if added:
        log.info("LoRA covers only some blocks: added zero factors for %d block modules (no effect on outputs)", added)
    return dataclasses.replace(lora, weights=weights)


def lora_out_of_range(lora: CanonicalLora, num_layers: int) -> list[str]:
    """Modules of the LoRA whose block index the model does not have."""
    return [m for m in lora.modules if (b := _BLOCK_RE.fullmatch(m)) and int(b[1]) >= num_layers]
