"""The small layers of the Wan transformer: a linear layer that can carry a LoRA adapter, and norms.

Parameters keep diffusers' names (`kernel` = transposed `weight`, `scale` = norm `weight`) so that
conversion is a transpose and a rename (`spatialalign_jax.model.params`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from .config import LoraConfig

Dtype = jnp.dtype
HALF = (jnp.bfloat16, jnp.float16)


@jax.custom_vjp
def _half_dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _half_dense_fwd(x, kernel):
    return _half_dense(x, kernel), (x, kernel)


def _half_dense_bwd(res, g):
    # The cotangent goes back to half precision so the two backward products run at the half-precision
    # rate too; the kernel product contracts the kernel's output axis in place (a transposed copy
    # would fall off XLA:CPU's fast path). A frozen kernel's gradient is dead code that XLA removes.
    x, kernel = res
    g = g.astype(x.dtype)
    dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    batch = tuple(range(x.ndim - 1))
    dk = jax.lax.dot_general(x, g, ((batch, batch), ((), ())), preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_half_dense.defvjp(_half_dense_fwd, _half_dense_bwd)


def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x @ kernel` over the last axis of `x`.

    XLA:CPU multiplies bf16 at twice the fp32 rate only when the product is asked for in fp32
    (otherwise it upcasts first and runs at the fp32 rate), so on CPU half-precision inputs give an
    fp32 result, accumulated in fp32 as a GPU does; on other backends the product keeps the input dtype.
    (fp16 takes the same path; it is exact but not faster on CPUs without native fp16 products.)
    """
    if x.dtype in HALF and kernel.dtype == x.dtype and jax.default_backend() == "cpu":
        return _half_dense(x, kernel)
    return x @ kernel


def _uniform(key: jax.Array, shape: tuple[int, ...], bound: float, dtype: Dtype) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


class Linear(nnx.Module):
    """`y = x W + b`, plus `(alpha / r) x A B` when it carries a LoRA adapter and LoRA is on.

    Initialised as torch's `nn.Linear` and PEFT's LoRA (A Kaiming-uniform with a = sqrt(5), B zero),
    so a freshly built model has the statistics of a freshly built diffusers one.
    """

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, lora: LoraConfig | None = None):
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        self.kernel = nnx.Param(_uniform(rngs.params(), (in_features, out_features), bound, param_dtype))
        self.bias = nnx.Param(_uniform(rngs.params(), (out_features,), bound, param_dtype))
        self.dtype = dtype
        if lora is not None:
            # fp32 whatever the base dtype: the trained weights and their optimiser state
            self.lora_A = nnx.LoRAParam(_uniform(rngs.params(), (in_features, lora.rank), bound, jnp.float32))
            self.lora_B = nnx.LoRAParam(jnp.zeros((lora.rank, out_features), jnp.float32))
            self.lora_scale = lora.scale
        else:
            self.lora_A = self.lora_B = None

    def __call__(self, x: jax.Array, use_lora: bool = True) -> jax.Array:
        x = x.astype(self.dtype)
        y = dense(x, self.kernel[...].astype(self.dtype))
        y = (y + self.bias[...].astype(y.dtype)).astype(self.dtype)
        if use_lora and self.lora_A is not None:
            # PEFT runs the adapter in its weights' dtype (fp32) and adds it to the base output before
            # casting back, so bf16 training still gets fp32 adapter outputs and gradients.
            a = self.lora_A[...]
            delta = (x.astype(a.dtype) @ a) @ self.lora_B[...] * self.lora_scale
            y = (y.astype(jnp.promote_types(y.dtype, delta.dtype)) + delta).astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """diffusers' FP32LayerNorm: statistics and affine in fp32, whatever the input dtype."""

    def __init__(self, dim: int, *, eps: float, elementwise_affine: bool):
        self.eps = eps
        if elementwise_affine:
            self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
            self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        else:
            self.scale = self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y


class RMSNorm(nnx.Module):
    """torch.nn.RMSNorm over the last axis (Wan normalises q and k across all heads at once)."""

    def __init__(self, dim: int, *, eps: float, param_dtype: Dtype = jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)
