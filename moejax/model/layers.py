"""The model's small pieces: weights with logical dims, RMSNorm, rotary positions, the dense
FFN, and the dtypes configs name."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.config_ranges import ConfigError
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


ROPE_SCALINGS = ("none", "yarn")


@dataclasses.dataclass(frozen=True)
class Rope:
    """The rotary embedding's parameters: base `theta`, and YaRN's (arXiv 2309.00071) where
    `scaling` is "yarn", read as transformers' rope_scaling reads them (DeepSeek-V3, Kimi K2).
    mscale and mscale_all_dim 0 mean "not given", as a missing key does there."""

    theta: float
    scaling: str = "none"
    factor: float = 1.0  # context extension: the low frequencies are divided by it
    original_max_len: int = 0  # the pretraining context whose wavelengths bound the ramp
    beta_fast: float = 32.0  # rotations over original_max_len above which a pair extrapolates
    beta_slow: float = 1.0  # ... and below which it interpolates (divided by factor)
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    truncate: bool = True  # the ramp's ends rounded out to whole pairs (gpt-oss: not)
    fraction: float = 1.0  # of each head's dims that rotate, the first ones (GLM-4.5: 0.5)

    @classmethod
    def from_config(cls, cfg) -> "Rope":
        return cls(cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor,
                   cfg.rope_original_max_len or cfg.max_seq_len, cfg.rope_beta_fast,
                   cfg.rope_beta_slow, cfg.rope_mscale, cfg.rope_mscale_all_dim,
                   cfg.get("rope_truncate", True), fraction=rope_fraction(cfg))

    def rotary_dims(self, head_dim: int) -> int:
        """How many of a head's dims rotate: int(head_dim * fraction), as transformers
        computes it (partial_rotary_factor)."""
        return int(head_dim * self.fraction)

    def attention_factor(self) -> float:
        """What cos and sin are multiplied by: YaRN's temperature, as a ratio of two
        magnitudes where both mscales are given (then 1 for DeepSeek-V3's 1.0 / 1.0)."""
        if self.scaling == "none":
            return 1.0
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor,
                                                                      self.mscale_all_dim)
        return yarn_mscale(self.factor)

    def softmax_scale(self, head_dim: int) -> float | None:
        """The attention logits' scale: 1/sqrt(head_dim), times yarn_mscale(factor,
        mscale_all_dim)**2 where mscale_all_dim is given (DeepSeek-V3). None: the kernels'
        own 1/sqrt(head_dim), the path taken without YaRN."""
        if self.scaling == "none" or not self.mscale_all_dim:
            return None
        return head_dim**-0.5 * yarn_mscale(self.factor, self.mscale_all_dim) ** 2

    def frequencies(self, dim: int) -> np.ndarray:
        """[dim // 2] float32 inverse frequencies under YaRN: a pair that turns more than
        beta_fast times over original_max_len keeps its frequency, one that turns fewer than
        beta_slow times is divided by factor, and a linear ramp blends the pairs between."""
        half = dim // 2
        base = self.theta ** (np.arange(half, dtype=np.float64) * 2 / dim)

        def pair_of(rotations):  # the pair index that turns `rotations` times
            return dim * math.log(self.original_max_len / (rotations * 2 * math.pi)) / (
                2 * math.log(self.theta))

        low, high = pair_of(self.beta_fast), pair_of(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # transformers' guard against a zero-width ramp
        interpolated = np.clip((np.arange(half, dtype=np.float64) - low) / (high - low), 0, 1)
        freqs = (1 - interpolated) / base + interpolated / (self.factor * base)
        return freqs.astype(np.float32)


def rope_fraction(cfg) -> float:
    """model.rope_fraction (runs from before the key: 1.0), checked: in (0, 1], leaving an
    even number >= 2 of each head's dims to rotate; 1 with attention=mla, whose heads keep
    their rotary dims apart (qk_rope_head_dim)."""
    fraction = cfg.get("rope_fraction", 1.0)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not (
            0 < fraction <= 1):
        raise ConfigError(f"model.rope_fraction={fraction!r}: allowed: a number in (0, 1]")
    if fraction == 1:
        return 1.0
    if cfg.get("attention", "gqa") == "mla":
        raise ConfigError(f"model.rope_fraction={fraction!r}: allowed with attention=mla: 1.0 "
                          "(its rotary width is qk_rope_head_dim)")
    dims = int(cfg.head_dim * fraction)
    if dims < 2 or dims % 2:
        raise ConfigError(f"model.rope_fraction={fraction!r}: rotates int(head_dim="
                          f"{cfg.head_dim} x {fraction}) = {dims} dims; allowed: a fraction "
                          "leaving an even number >= 2 of them")
    return float(fraction)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction, 0.1 * mscale * ln(factor) + 1; 1 where factor <= 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rotary(x, positions, theta: float, rope: Rope | None = None):
    """x: [B, S, heads, head_dim], positions: [B, S]. Rotates pairs (i, i + r/2) of a head's
    first r = rope.rotary_dims(head_dim) dims (all of them unless rope.fraction < 1) and
    passes the others through, as transformers' partial rotary does (GLM-4.5). With a YaRN
    `rope`, its frequencies over those r dims, and cos and sin times its attention factor."""
    dims = x.shape[-1] if rope is None else rope.rotary_dims(x.shape[-1])
    if dims < x.shape[-1]:
        turned = rotary(x[..., :dims], positions, theta, dataclasses.replace(rope, fraction=1.0))
        return jnp.concatenate([turned, x[..., dims:]], -1)
    half = x.shape[-1] // 2
    if rope is None or rope.scaling == "none":
        freqs, factor = theta ** (-jnp.arange(half, dtype=jnp.float32) / half), None
    else:
        freqs, factor = jnp.asarray(rope.frequencies(x.shape[-1])), rope.attention_factor()
    angles = positions[..., None, None].astype(jnp.float32) * freqs  # [B, S, 1, half]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    if factor is not None:
        sin, cos = sin * factor, cos * factor
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
