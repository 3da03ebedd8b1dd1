"""Grouped-query causal self-attention: projections, optional q/k norm and biases, rotary
positions, the kernel per backend (kernels.py), and decoding with a key-value cache."""

import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from moejax.model import kernels, xla_attention
from moejax.model.layers import RMSNorm, Rope, dense_qtype, param, rotary
from moejax.moe.quant import einsum
from moejax.parallel import constrain


def kv_heads(cfg) -> int:
    return cfg.num_kv_heads or cfg.num_heads


QK_NORMS = ("none", "head", "all")


class Attention(nnx.Module):
    """Causal self-attention; num_heads / kv_heads query heads share each key-value head.

    qk_norm RMS-normalizes queries and keys before the rotation: over each head (Qwen3-MoE)
    or over all heads of the projection together (OLMoE)."""

    def __init__(self, cfg, mesh, dtype, param_dtype, rngs, window: int = 0):
        d, h, kv, hd = cfg.d_model, cfg.num_heads, kv_heads(cfg), cfg.head_dim
        self.q = param(rngs, (d, h, hd), ("embed", "heads", None), param_dtype, d)
        self.kv = param(rngs, (d, 2, kv, hd), ("embed", None, "kv_heads", None), param_dtype, d)
        self.out = param(rngs, (h, hd, d), ("heads", None, "embed"), param_dtype, h * hd)
        self.theta, self.dtype, self.mesh = cfg.rope_theta, dtype, mesh
        self.kv_heads, self.head_dim = kv, hd
        # YaRN's frequencies and the softmax scale it implies (None: 1/sqrt(head_dim)).
        self.rope = Rope.from_config(cfg)
        self.scale = self.rope.softmax_scale(hd)
        self.qtype = dense_qtype(cfg)
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(hd, cfg.norm_eps, param_dtype, (None,))
            self.k_norm = RMSNorm(hd, cfg.norm_eps, param_dtype, (None,))
        elif cfg.qk_norm == "all":
            self.q_norm = RMSNorm((h, hd), cfg.norm_eps, param_dtype, ("heads", None))
            self.k_norm = RMSNorm((kv, hd), cfg.norm_eps, param_dtype, ("kv_heads", None))
        self.qk_norm = cfg.qk_norm != "none"
        if cfg.qkv_bias:  # Qwen2-MoE
            self.q_bias = nnx.Param(jnp.zeros((h, hd), param_dtype), out_sharding=("heads", None),
                                    eager_sharding=False)
            self.kv_bias = nnx.Param(jnp.zeros((2, kv, hd), param_dtype),
                                     out_sharding=(None, "kv_heads", None), eager_sharding=False)
        self.qkv_bias = cfg.qkv_bias
        # 0 full causal attention, W > 0 the W most recent positions (itself included):
        # this layer's (transformer.layer_window); kernels.causal refuses W < 0.
        self.window = window
        # gpt-oss: a learned logit per head that every softmax row adds to its normalizer
        # (kernels.causal's sinks), and a bias on the output projection.
        self.sinks = (nnx.Param(jnp.zeros((h,), jnp.float32), out_sharding=("heads",),
                                eager_sharding=False) if cfg.get("attention_sinks") else None)
        self.out_bias = (nnx.Param(jnp.zeros((d,), param_dtype), out_sharding=("embed",),
                                   eager_sharding=False) if cfg.get("out_bias") else None)

    def project(self, x, positions):
        """x: [B, S, d] -> q [B, S, h, hd], k and v [B, S, kv, hd]; q, k rotated to positions."""
        q = einsum("bsd,dhe->bshe", x, self.q[...].astype(self.dtype), self.qtype)
        k, v = jnp.unstack(einsum("bsd,dkhe->kbshe", x, self.kv[...].astype(self.dtype),
                                  self.qtype))
        if self.qkv_bias:
            kv_bias = self.kv_bias[...].astype(self.dtype)
            q, k, v = q + self.q_bias[...].astype(self.dtype), k + kv_bias[0], v + kv_bias[1]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = checkpoint_name(constrain(q, self.mesh, ("batch", "seq", "heads", None)), "attn_q")
        k, v = (checkpoint_name(constrain(a, self.mesh, ("batch", "seq", "kv_heads", None)),
                                "attn_kv") for a in (k, v))
        return (rotary(q, positions, self.theta, self.rope),
                rotary(k, positions, self.theta, self.rope), v)

    def __call__(self, x, positions, segments=None, max_logit: bool = False):
        """x: [B, S, d] at positions [B, S]; a token attends to the tokens of its own
        document (segments [B, S]; None: the row is one) at its position and before (the
        `window` most recent of them where one is set). -> [B, S, d]; with max_logit, that
        and each head's largest logit [h] (kernels.max_logits: QK-clip's statistic)."""
        q, k, v = self.project(x, positions)
        y = checkpoint_name(kernels.causal(q, k, v, self.mesh, self.scale, segments,
                                           self.window, self.sink()), "attn_ctx")
        if not max_logit:
            return self.output(y)
        return self.output(y), kernels.max_logits(q, k, self.mesh, self.scale, segments,
                                                  self.window)

    def sink(self):
        return None if self.sinks is None else self.sinks[...]

    def output(self, y):
        """The heads' contexts [B, S, h, hd] -> [B, S, d] (plus gpt-oss's output bias)."""
        y = einsum("bshe,hed->bsd", y, self.out[...].astype(self.dtype), self.qtype)
        return y if self.out_bias is None else y + self.out_bias[...].astype(self.dtype)

    def decode(self, x, positions, cache, layer):
        """Attention of x [B, S, d] at positions [B, S] over the cache of its stack, {"k", "v"}:
        [repeats, period, B, L, kv, hd], whose slot `layer` = (repeat, j) is this layer's.
        The new keys and values are written at their positions first; a query sees the keys
        at positions <= its own, so what lies past a row's end (padding, stale) is never read,
        and with a sliding window W only the last W of them: the cache stays full length, the
        older keys masked.
        """
        q, k, v = self.project(x, positions)
        rows = jnp.arange(x.shape[0])[:, None]
        # Only the S new rows are written, in place: the cache is a scan carry, not xs/ys,
        # which would copy all of it through every layer of every step.
        cache = {"k": cache["k"].at[(*layer, rows, positions)].set(k),
                 "v": cache["v"].at[(*layer, rows, positions)].set(v)}
        keys, values = cache["k"][layer], cache["v"][layer]  # [B, L, kv, hd]
        behind = positions[:, None, :, None] - jnp.arange(keys.shape[1])  # [B, 1, S, L]
        mask = (behind >= 0) & (behind < self.window) if self.window else behind >= 0
        y = xla_attention.masked(q, keys, values, mask, self.scale, self.sink())
        return self.output(y), cache

    def empty_cache(self, repeats: int, period: int, batch: int, cache_len: int, dtype):
        """{"k", "v"}: [repeats, period, batch, cache_len, kv_heads, head_dim] each."""
        shape = (repeats, period, batch, cache_len, self.kv_heads, self.head_dim)
        return {name: constrain(jnp.zeros(shape, dtype), self.mesh,
                                ("batch", None, "kv_heads", None)) for name in ("k", "v")}

    @staticmethod
    def cache_bytes_per_token(cfg, itemsize: int) -> int:
        """What the key-value cache holds per token, all layers together."""
        return cfg.num_layers * 2 * kv_heads(cfg) * cfg.head_dim * itemsize
