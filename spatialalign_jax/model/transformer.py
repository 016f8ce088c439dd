"""The Wan2.1 text-to-video diffusion transformer in Flax NNX.

The same network as diffusers' `WanTransformer3DModel` (`transformer_wan.py`), module for module and
name for name, with two changes of form: the blocks are stacked and run under `jax.lax.scan` (one
compiled block, rematerialised by a named policy), and a LoRA switch on the call turns the adapters
off, which makes the same weights the frozen reference model of DPO.
"""

from __future__ import annotations

import fnmatch
import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from .attention import apply_rope, attend, rope_tables, save_kernel_outputs
from .config import LoraConfig, WanConfig
from .layers import LayerNorm, Linear, RMSNorm, dense

FP32 = jnp.float32

# Activations a remat policy may keep (named with `checkpoint_name` in the block).
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attention": jax.checkpoint_policies.save_only_these_names("attn1_out", "attn2_out"),
    "block_io": jax.checkpoint_policies.save_only_these_names("attn1_out", "attn2_out", "ffn_hidden"),
    # The attention kernels' outputs and softmax statistics: no second attention forward.
    "attention_kernel": save_kernel_outputs,
}


def _lora_for(path: str, lora: LoraConfig | None) -> LoraConfig | None:
    """LoRA config for the linear at `path` (diffusers naming, `blocks.*` for every block) or None.

    A target matches like PEFT's `target_modules`: the whole path or a dotted suffix of it, and
    shell-style wildcards are allowed.
    """
    if lora is None:
        return None
    for pattern in lora.targets:
        if fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, "*." + pattern):
            return lora
    return None


class _Builder:
    """Carries what every layer needs to be built, so the modules below read like diffusers'."""

    def __init__(self, cfg: WanConfig, lora: LoraConfig | None, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg, self.lora, self.dtype, self.param_dtype, self.rngs = cfg, lora, dtype, param_dtype, rngs
        self.lora_paths: list[str] = []

    def linear(self, path: str, n_in: int, n_out: int, *, fp32: bool = False) -> Linear:
        lora = _lora_for(path, self.lora)
        if lora is not None:
            self.lora_paths.append(path)
        return Linear(n_in, n_out, rngs=self.rngs, lora=lora,
                      dtype=FP32 if fp32 else self.dtype, param_dtype=FP32 if fp32 else self.param_dtype)


class Attention(nnx.Module):
    def __init__(self, b: _Builder, path: str):
        cfg = b.cfg
        dim = cfg.inner_dim
        self.heads = cfg.num_attention_heads
        self.to_q = b.linear(f"{path}.to_q", dim, dim)
        self.to_k = b.linear(f"{path}.to_k", dim, dim)
        self.to_v = b.linear(f"{path}.to_v", dim, dim)
        self.to_out = nnx.List([b.linear(f"{path}.to_out.0", dim, dim), None])  # [linear, dropout]
        # diffusers builds and applies q/k RMSNorm across heads whatever `qk_norm` says; so do we.
        self.norm_q = RMSNorm(dim, eps=cfg.eps, param_dtype=b.param_dtype)
        self.norm_k = RMSNorm(dim, eps=cfg.eps, param_dtype=b.param_dtype)

    def __call__(self, x: jax.Array, context: jax.Array | None, rope: tuple[jax.Array, jax.Array] | None,
                 implementation: str, use_lora: bool) -> jax.Array:
        context = x if context is None else context
        q = self.to_q(x, use_lora)
        k = self.to_k(context, use_lora)
        v = self.to_v(context, use_lora)
        q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = (t.reshape(*t.shape[:-1], self.heads, -1) for t in (q, k, v))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attend(q, k, v, implementation)
        return self.to_out[0](out.reshape(*out.shape[:-2], -1), use_lora)


class FeedForward(nnx.Module):
    """diffusers' FeedForward with a tanh-approximate GELU: `net.0.proj`, dropout, `net.2`."""

    def __init__(self, b: _Builder, path: str):
        dim, ffn = b.cfg.inner_dim, b.cfg.ffn_dim
        self.net = nnx.List([_GELUProj(b, f"{path}.net.0.proj", dim, ffn), None,
                             b.linear(f"{path}.net.2", ffn, dim)])

    def __call__(self, x: jax.Array, use_lora: bool) -> jax.Array:
        h = checkpoint_name(self.net[0](x, use_lora), "ffn_hidden")
        return self.net[2](h, use_lora)


class _GELUProj(nnx.Module):
    def __init__(self, b: _Builder, path: str, n_in: int, n_out: int):
        self.proj = b.linear(path, n_in, n_out)

    def __call__(self, x: jax.Array, use_lora: bool) -> jax.Array:
        return jax.nn.gelu(self.proj(x, use_lora), approximate=True)


class WanTransformerBlock(nnx.Module):
    def __init__(self, b: _Builder):
        cfg, dim = b.cfg, b.cfg.inner_dim
        self.norm1 = LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.attn1 = Attention(b, "blocks.*.attn1")
        self.attn2 = Attention(b, "blocks.*.attn2")
        self.norm2 = LayerNorm(dim, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else None
        self.ffn = FeedForward(b, "blocks.*.ffn")
        self.norm3 = LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.scale_shift_table = nnx.Param(
            jax.random.normal(b.rngs.params(), (1, 6, dim), FP32) / math.sqrt(dim))

    def __call__(self, x: jax.Array, context: jax.Array, temb6: jax.Array, rope: tuple[jax.Array, jax.Array],
                 implementation: str, use_lora: bool) -> jax.Array:
        # Modulation and residual sums in fp32, the stream in the compute dtype, as diffusers does.
        shift, scale, gate, c_shift, c_scale, c_gate = jnp.split(
            self.scale_shift_table[...] + temb6.astype(FP32), 6, axis=1)
        dtype = x.dtype

        h = (self.norm1(x) * (1 + scale) + shift).astype(dtype)
        attn = checkpoint_name(self.attn1(h, None, rope, implementation, use_lora), "attn1_out")
        x = (x.astype(FP32) + attn * gate).astype(dtype)

        h = self.norm2(x).astype(dtype) if self.norm2 is not None else x
        attn = checkpoint_name(self.attn2(h, context, None, implementation, use_lora), "attn2_out")
        x = x + attn

        h = (self.norm3(x) * (1 + c_scale) + c_shift).astype(dtype)
        ff = self.ffn(h, use_lora)
        return (x.astype(FP32) + ff.astype(FP32) * c_gate).astype(dtype)


class _TimestepEmbedding(nnx.Module):
    def __init__(self, b: _Builder, path: str, n_in: int, dim: int):
        # diffusers keeps the time embedder in fp32 (`_keep_in_fp32_modules`).
        self.linear_1 = b.linear(f"{path}.linear_1", n_in, dim, fp32=True)
        self.linear_2 = b.linear(f"{path}.linear_2", dim, dim, fp32=True)

    def __call__(self, t: jax.Array, use_lora: bool) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(t, use_lora)), use_lora)


class _TextProjection(nnx.Module):
    """PixArt-alpha text projection: linear, tanh-GELU, linear."""

    def __init__(self, b: _Builder, path: str, n_in: int, dim: int):
        self.linear_1 = b.linear(f"{path}.linear_1", n_in, dim)
        self.linear_2 = b.linear(f"{path}.linear_2", dim, dim)

    def __call__(self, x: jax.Array, use_lora: bool) -> jax.Array:
        return self.linear_2(jax.nn.gelu(self.linear_1(x, use_lora), approximate=True), use_lora)


def timestep_sinusoids(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """diffusers' `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`: [cos, sin]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=FP32) / half)
    args = t.astype(FP32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class ConditionEmbedder(nnx.Module):
    def __init__(self, b: _Builder):
        cfg, dim = b.cfg, b.cfg.inner_dim
        self.freq_dim = cfg.freq_dim
        self.time_embedder = _TimestepEmbedding(b, "condition_embedder.time_embedder", cfg.freq_dim, dim)
        self.time_proj = b.linear("condition_embedder.time_proj", dim, 6 * dim)
        self.text_embedder = _TextProjection(b, "condition_embedder.text_embedder", cfg.text_dim, dim)

    def __call__(self, timestep: jax.Array, context: jax.Array, use_lora: bool):
        temb = self.time_embedder(timestep_sinusoids(timestep, self.freq_dim), use_lora).astype(context.dtype)
        timestep_proj = self.time_proj(jax.nn.silu(temb), use_lora)
        return temb, timestep_proj, self.text_embedder(context, use_lora)


class WanTransformer3DModel(nnx.Module):
    """Flax twin of diffusers' `WanTransformer3DModel` (text-to-video).

    `model(hidden_states, timestep, encoder_hidden_states)` takes latents (batch, channels, frames,
    height, width), timesteps (batch,) or a scalar, and text embeddings (batch, tokens, text_dim), and
    returns the predicted flow in the latents' layout. `use_lora=False` runs the frozen base model.
    """

    def __init__(self, cfg: WanConfig, *, lora: LoraConfig | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, attention: str = "auto", remat: str = "none",
                 scan_unroll: int | bool = 1, rngs: nnx.Rngs | None = None):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat policy {remat!r} unknown; choose one of {sorted(REMAT_POLICIES)}")
        if lora is not None:
            for t in lora.targets:
                if re.search(r"(^|\.)blocks\.\d+(\.|$)", t):
                    raise ValueError(f"LoRA target {t!r} names one block; blocks share one scanned layout, "
                                     "so targets apply to every block: write 'blocks.*.<module>'")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        b = _Builder(cfg, lora, jnp.dtype(dtype), jnp.dtype(param_dtype), rngs)
        self.config, self.lora_config = cfg, lora
        self.dtype, self.attention, self.remat = jnp.dtype(dtype), attention, remat
        # Blocks per scan iteration: 1 compiles one block (fast compiles at 30 layers); unrolling
        # (True = all) lets XLA skip the stacked residual buffers, which pays in small CPU training steps.
        self.scan_unroll = scan_unroll
        dim = cfg.inner_dim
        pt, ph, pw = cfg.patch_size

        # Conv3d with stride == kernel is a linear map of each flattened patch.
        self.patch_embedding = _PatchEmbedding(b, (pt, ph, pw), cfg.in_channels, dim)
        self.condition_embedder = ConditionEmbedder(b)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> WanTransformerBlock:
            b.rngs = rngs
            return WanTransformerBlock(b)

        self.blocks = make_blocks(rngs)
        b.rngs = rngs
        self.norm_out = LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.proj_out = b.linear("proj_out", dim, cfg.out_channels * pt * ph * pw)
        self.scale_shift_table = nnx.Param(jax.random.normal(rngs.params(), (1, 2, dim), FP32) / math.sqrt(dim))

        if lora is not None:
            for t in lora.targets:
                if not any(_lora_for(p, LoraConfig(lora.rank, lora.alpha, (t,))) for p in set(b.lora_paths)):
                    raise ValueError(f"LoRA target {t!r} matches no linear layer of the model "
                                     "(paths use diffusers names, e.g. 'blocks.*.attn2.to_k')")
        self.lora_paths = tuple(sorted(set(b.lora_paths)))

    def __call__(self, hidden_states: jax.Array, timestep: jax.Array, encoder_hidden_states: jax.Array,
                 *, use_lora: bool = True) -> jax.Array:
        cfg = self.config
        if hidden_states.ndim != 5:
            raise ValueError(f"hidden_states must be (batch, channels, frames, height, width), got {hidden_states.shape}")
        batch = hidden_states.shape[0]
        pt, ph, pw = cfg.patch_size
        grid = (hidden_states.shape[2] // pt, hidden_states.shape[3] // ph, hidden_states.shape[4] // pw)
        rope = rope_tables(cfg.rope_dims, grid, cfg.rope_max_seq_len)

        timestep = jnp.asarray(timestep)
        if timestep.ndim > 1 or (timestep.ndim == 1 and timestep.shape[0] not in (1, batch)):
            raise ValueError(f"timestep must be a scalar or (batch,) = ({batch},), got shape {timestep.shape}; "
                             "per-token timesteps (Wan2.2 TI2V) are not supported")
        timestep = jnp.broadcast_to(timestep, (batch,))
        context = encoder_hidden_states.astype(self.dtype)
        x = self.patch_embedding(hidden_states.astype(self.dtype))
        temb, timestep_proj, context = self.condition_embedder(timestep, context, use_lora)
        temb6 = timestep_proj.reshape(batch, 6, -1)

        x = self._run_blocks(x, context, temb6, rope, use_lora)

        shift, scale = jnp.split(self.scale_shift_table[...] + temb[:, None].astype(FP32), 2, axis=1)
        x = (self.norm_out(x) * (1 + scale) + shift).astype(self.dtype)
        x = self.proj_out(x, use_lora)
        return _unpatchify(x, grid, cfg.patch_size)

    def _run_blocks(self, x, context, temb6, rope, use_lora: bool) -> jax.Array:
        graphdef, state = nnx.split(self.blocks)
        implementation = self.attention

        def body(x, block_state):
            block = nnx.merge(graphdef, block_state)
            return block(x, context, temb6, rope, implementation, use_lora), None

        policy = REMAT_POLICIES[self.remat]
        if self.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        x, _ = jax.lax.scan(body, x, state, unroll=self.scan_unroll)
        return x


class _PatchEmbedding(nnx.Module):
    """diffusers' `patch_embedding` Conv3d (kernel == stride == patch) as a matmul over patches."""

    def __init__(self, b: _Builder, patch: tuple[int, int, int], in_channels: int, dim: int):
        fan_in = in_channels * math.prod(patch)
        bound = 1.0 / math.sqrt(fan_in)
        self.patch = patch
        self.dtype = b.dtype
        self.kernel = nnx.Param(jax.random.uniform(b.rngs.params(), (*patch, in_channels, dim), FP32,
                                                   -bound, bound).astype(b.param_dtype))
        self.bias = nnx.Param(jax.random.uniform(b.rngs.params(), (dim,), FP32, -bound, bound).astype(b.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        bsz, c, f, h, w = x.shape
        pt, ph, pw = self.patch
        nf, nh, nw = f // pt, h // ph, w // pw
        x = x[:, :, : nf * pt, : nh * ph, : nw * pw]  # Conv3d drops a remainder that does not fill a patch
        x = x.reshape(bsz, c, nf, pt, nh, ph, nw, pw).transpose(0, 2, 4, 6, 3, 5, 7, 1)
        x = x.reshape(bsz, nf * nh * nw, pt * ph * pw * c)
        kernel = self.kernel[...].reshape(-1, self.kernel.shape[-1]).astype(self.dtype)
        y = dense(x, kernel)
        return (y + self.bias[...].astype(y.dtype)).astype(self.dtype)


def _unpatchify(x: jax.Array, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> jax.Array:
    bsz = x.shape[0]
    (nf, nh, nw), (pt, ph, pw) = grid, patch
    x = x.reshape(bsz, nf, nh, nw, pt, ph, pw, -1).transpose(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(bsz, x.shape[1], nf * pt, nh * ph, nw * pw)
