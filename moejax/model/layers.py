"""The model's small pieces: weights with logical dims, RMSNorm, rotary positions, the dense
FFN, and the dtypes configs name."""

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.moe.ffn import IN_NAMES, OUT_NAMES, ffn, in_shape
from moejax.moe.quant import QTYPES

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

def param(rngs, shape, names, dtype, fan_in):
    """A weight with logical dims `names`, normal with std 1/sqrt(fan_in)."""
    w = jax.random.normal(rngs.params(), shape, jnp.float32) * fan_in**-0.5
    return nnx.Param(w.astype(dtype), out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
    """Normalizes over the trailing len(shape) dims of its input, which `scale` has."""

    def __init__(self, shape, eps: float, param_dtype, names=("embed",)):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.scale = nnx.Param(jnp.ones(shape, param_dtype), out_sharding=names,
                               eager_sharding=False)
        self.eps = eps

    def __call__(self, x):
        axes = tuple(range(-self.scale.ndim, 0))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axes, keepdims=True) + self.eps)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rotary(x, positions, theta: float):
    """x: [B, S, heads, head_dim], positions: [B, S]. Rotates pairs (i, i + head_dim/2)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None, None].astype(jnp.float32) * freqs  # [B, S, 1, half]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def dense_qtype(cfg):
    """The quantization of the attention and dense FFN matmuls (moejax/moe/quant.py); the router,
    the embeddings and the output logits are never quantized."""
    return QTYPES[cfg.quantization] if cfg.quantize_dense else None


class MLP(nnx.Module):
    def __init__(self, d_model, d_ff, activation, dtype, param_dtype, rngs, qtype=None):
        self.w_in = param(rngs, in_shape(d_model, d_ff, activation), IN_NAMES, param_dtype,
                          d_model)
        self.w_out = param(rngs, (d_ff, d_model), OUT_NAMES, param_dtype, d_ff)
        self.activation, self.dtype, self.qtype = activation, dtype, qtype

    def __call__(self, x):
        w_in, w_out = self.w_in[...].astype(self.dtype), self.w_out[...].astype(self.dtype)
        return ffn(x.reshape(-1, x.shape[-1]), w_in, w_out, self.activation,
                   self.qtype).reshape(x.shape)
