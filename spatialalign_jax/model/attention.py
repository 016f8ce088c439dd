"""Attention kernels and Wan's 3D rotary position embedding.

`attend` dispatches on the configured implementation:
- "xla" / "cudnn": `jax.nn.dot_product_attention` (cuDNN gives fused flash attention on GPUs);
- "blockwise": per head, queries in blocks, so each step's scores and softmax stay in
  cache, which is what a CPU needs (XLA's unfused attention writes the whole score matrix out);
- "auto": cuDNN on GPU for half-precision inputs; elsewhere off the CPU, XLA while its score matrix
  is small (`XLA_SCORES_MAX_BYTES`), blockwise beyond; blockwise on CPU.
"""

from __future__ import annotations

import math
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "blockwise")
SHORT_KEYS = 256
KERNEL_OUTPUTS = "attention_kernel"  # checkpoint name of the blockwise kernel's output and log-sum-exp
# A head whose (block x keys) scores are at most this many fit in one core's cache with room to spare:
# too little work to spread over the cores, so the kernel unrolls its loop over heads and XLA:CPU runs
# heads side by side (faster at 320 tokens on this project's CPU). Larger score blocks run one head at
# a time: side by side they evict each other (slower at 1280 tokens).
CONCURRENT_HEADS_MAX_SCORES = 1 << 17
# Off the CPU without cuDNN (float32, TPUs), XLA's attention holds all scores at once in float32 (and
# the probabilities beside them): fine for text keys (1.6 GB of scores at 480x832x81, batch 2), not
# for video self-attention (100 GB). The bound is on the global batch, so sharded runs err to blockwise.
XLA_SCORES_MAX_BYTES = 1 << 31


def _cudnn_attention_forward(prim, *_, **__) -> bool:
    return prim.name.startswith("dot_product_attention_fwd")  # jax.nn's cuDNN kernel (GPU)


# Remat policy: keep what the fused attention kernels hand their backward (the output and the softmax
# statistics, O(tokens) per head) and recompute the rest. The kernels are most of a long video's FLOPs;
# the q/k/v projections they take are cheap to recompute.
save_kernel_outputs = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.save_only_these_names(KERNEL_OUTPUTS), _cudnn_attention_forward)


def _map_heads(f, xs, concurrent: bool):
    """`lax.map` over heads; unrolled when `concurrent`, so that XLA may run the heads side by side."""
    return jax.lax.scan(lambda _, x: (None, f(x)), None, xs, unroll=concurrent)[1]


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _heads_attention(qh: jax.Array, kt: jax.Array, vh: jax.Array, concurrent: bool = False) -> jax.Array:
    """Softmax attention per head, queries in blocks: qh (heads, blocks, block, d), pre-scaled;
    kt (heads, d, keys); vh (heads, keys, d). Returns (heads, blocks, block, d)."""
    return _heads_forward(qh, kt, vh, concurrent)[0]


def _heads_forward(qh, kt, vh, concurrent):
    def head(args):
        qs, kt, vv = args

        def block(qb):
            scores = jnp.matmul(qb, kt, preferred_element_type=jnp.float32)
            m = scores.max(-1, keepdims=True)
            p = jnp.exp(scores - m)
            total = p.sum(-1, keepdims=True)
            out = jnp.matmul(p.astype(vv.dtype), vv, preferred_element_type=jnp.float32) / total
            return out.astype(vv.dtype), (m + jnp.log(total))[..., 0]

        return jax.lax.map(block, qs)

    return _map_heads(head, (qh, kt, vh), concurrent)  # out, log-sum-exp per query row


def _heads_fwd(qh, kt, vh, concurrent):
    # Named so that the "attention_kernel" remat policy can keep them: then the backward needs no
    # second forward of the kernel.
    out, lse = checkpoint_name(_heads_forward(qh, kt, vh, concurrent), KERNEL_OUTPUTS)
    return out, (qh, kt, vh, out, lse)


def _heads_bwd(concurrent, res, d_out):
    """FlashAttention's backward, one head and query block at a time: the probabilities are
    recomputed from the saved log-sum-exp instead of being stored for every head. As in
    FlashAttention-2, the products take their operands in the inputs' dtype (half precision runs at
    the half-precision rate) and accumulate in fp32.

    It works on the transposed probabilities, (keys, queries): then every product is a plain
    row-major `a @ b` (XLA:CPU contracts an operand's leading axis several times slower), at the
    cost of transposing the small (block, head_dim) tiles.
    """
    qh, kt, vh, out, lse = res
    dt = qh.dtype
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # (heads, blocks, block)
    d_out = d_out.astype(dt)
    transposed = lambda a: jnp.swapaxes(a, -1, -2)  # noqa: E731

    def head(args):
        qs, qs_t, k, kt, vv, dos, dos_t, lses, deltas = args

        def block(carry, xs):
            dk, dv = carry
            qb, qb_t, do, do_t, lse_b, delta_b = xs
            p_t = jnp.exp(jnp.matmul(k, qb_t, preferred_element_type=jnp.float32) - lse_b[None, :])
            dv = dv + jnp.matmul(p_t.astype(dt), do, preferred_element_type=jnp.float32)
            dp_t = jnp.matmul(vv, do_t, preferred_element_type=jnp.float32)
            ds_t = (p_t * (dp_t - delta_b[None, :])).astype(dt)
            dk = dk + jnp.matmul(ds_t, qb, preferred_element_type=jnp.float32)
            dq_t = jnp.matmul(kt, ds_t, preferred_element_type=jnp.float32)
            return (dk, dv), dq_t

        zeros = (jnp.zeros(vv.shape, jnp.float32), jnp.zeros(vv.shape, jnp.float32))
        (dk, dv), dq_t = jax.lax.scan(block, zeros, (qs, qs_t, dos, dos_t, lses, deltas))
        return dq_t, dk, dv

    dq_t, dk, dv = _map_heads(head, (qh, transposed(qh), transposed(kt), kt, vh, d_out, transposed(d_out), lse,
                                     delta), concurrent)
    return transposed(dq_t).astype(qh.dtype), transposed(dk).astype(kt.dtype), dv.astype(vh.dtype)


_heads_attention.defvjp(_heads_fwd, _heads_bwd)


def _blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, max_block: int) -> jax.Array:
    """Per (batch, head), its queries in blocks of at most `max_block` rows; heads one at a time, or
    side by side when their score blocks are small (`CONCURRENT_HEADS_MAX_SCORES`).

    Each step's score matrix (block x keys) stays in cache and its softmax is one fused pass; XLA's
    unfused attention on CPU instead streams the whole (batch, heads, queries, keys) tensor through
    memory several times, forward and backward.
    """
    b, s, h, d = q.shape
    num_blocks = -(-s // max_block)
    block = -(-s // num_blocks)
    pad = num_blocks * block - s
    qh = jnp.einsum("bshd->bhsd", q) * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b * h, num_blocks, block, d)
    kt = jnp.einsum("bshd->bhds", k).reshape(b * h, d, k.shape[1])
    vh = jnp.einsum("bshd->bhsd", v).reshape(b * h, v.shape[1], d)
    concurrent = block * k.shape[1] <= CONCURRENT_HEADS_MAX_SCORES
    out = _heads_attention(qh, kt, vh, concurrent).reshape(b, h, num_blocks * block, d)[:, :, :s]
    return jnp.einsum("bhsd->bshd", out)


def _cudnn_supports(q: jax.Array) -> bool:
    """cuDNN's fused attention takes half-precision inputs with a head dim that is a multiple of 8."""
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "auto",
           block_size: int = 2048) -> jax.Array:
    """Softmax attention over (batch, seq, heads, head_dim) arrays, no mask, scale 1/sqrt(head_dim).

    ``auto``: see the module docstring.
    """
    if implementation == "auto":
        score_bytes = 4 * q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1]
        if _cudnn_supports(q):
            implementation = "cudnn"
        elif jax.default_backend() != "cpu" and score_bytes <= XLA_SCORES_MAX_BYTES:
            implementation = "xla"
        else:
            implementation = "blockwise"
    if implementation == "blockwise" and k.shape[1] > SHORT_KEYS:
        return _blockwise_attention(q, k, v, block_size)
    if implementation == "blockwise":  # few keys (cross-attention to text): the scores are small anyway
        implementation = "xla"
    if implementation in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    raise ValueError(f"attention implementation {implementation!r} unknown; choose one of {IMPLEMENTATIONS}")


@lru_cache(maxsize=32)
def _rope_tables(dims: tuple[int, int, int], grid: tuple[int, int, int], max_seq_len: int,
                 theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin per token and rotary pair, (tokens, head_dim // 2), computed in float64 as Wan does."""
    for n, axis in zip(grid, "fhw"):
        if n > max_seq_len:
            raise ValueError(f"{n} latent patches along {axis} exceed rope_max_seq_len={max_seq_len}")
    per_axis = []
    for dim, n in zip(dims, grid):
        inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64)[: dim // 2] / dim)
        per_axis.append(np.outer(np.arange(n, dtype=np.float64), inv_freq))  # (n, dim // 2)
    f, h, w = grid
    angles = np.concatenate([
        np.broadcast_to(per_axis[0][:, None, None], (f, h, w, per_axis[0].shape[-1])),
        np.broadcast_to(per_axis[1][None, :, None], (f, h, w, per_axis[1].shape[-1])),
        np.broadcast_to(per_axis[2][None, None, :], (f, h, w, per_axis[2].shape[-1])),
    ], axis=-1).reshape(f * h * w, -1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope_tables(dims: tuple[int, int, int], grid: tuple[int, int, int], max_seq_len: int,
                theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    cos, sin = _rope_tables(tuple(dims), tuple(grid), max_seq_len, theta)
    return jnp.asarray(cos), jnp.asarray(sin)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved pairs (x[2i], x[2i+1]) of (batch, seq, heads, head_dim) by the tables."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x1, x2 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
