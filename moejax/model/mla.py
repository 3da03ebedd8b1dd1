"""Multi-head latent attention (DeepSeek-V2/V3, Kimi K2), as transformers' DeepseekV3 computes it.

Keys and values come from one low-rank latent c = norm(x @ kv_down) per token, shared by all
heads, and one rotary key k_rope per token, also shared: each head's key is [c @ kv_up_k,
k_rope] and its value c @ kv_up_v. The query is full-rank, or low-rank through its own norm
(q_lora_rank). Training expands c into per-head keys and values and runs the same causal
kernel as grouped-query attention; decoding caches only c and k_rope (kv_lora_rank +
qk_rope_head_dim numbers per token and layer) and folds kv_up into the query and the output
("absorbed"), so the cache is never expanded.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from moejax.model import kernels
from moejax.model.layers import RMSNorm, Rope, dense_qtype, param, rotary
from moejax.moe.quant import einsum
from moejax.parallel import constrain


class LatentAttention(nnx.Module):
    """The latent dims of q_up and kv_up are split like d_model ("embed"): they are the
    inputs of those matmuls, and unsplit they would be whole on every device (3.3B
    parameters of DeepSeek-V3)."""

    def __init__(self, cfg, mesh, dtype, param_dtype, rngs):
        d, h = cfg.d_model, cfg.num_heads
        n, r, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        rq, rkv = cfg.q_lora_rank, cfg.kv_lora_rank
        if rq:
            self.q_down = param(rngs, (d, rq), ("embed", None), param_dtype, d)
            self.q_norm = RMSNorm(rq, cfg.norm_eps, param_dtype, (None,))
            self.q_up = param(rngs, (rq, h, n + r), ("embed", "heads", None), param_dtype, rq)
        else:
            self.q = param(rngs, (d, h, n + r), ("embed", "heads", None), param_dtype, d)
        self.kv_down = param(rngs, (d, rkv + r), ("embed", None), param_dtype, d)
        self.kv_norm = RMSNorm(rkv, cfg.norm_eps, param_dtype, (None,))
        self.kv_up = param(rngs, (rkv, h, n + v), ("embed", "heads", None), param_dtype, rkv)
        self.out = param(rngs, (h, v, d), ("heads", None, "embed"), param_dtype, h * v)
        self.nope, self.rope_dim, self.v_dim, self.rank = n, r, v, rkv
        self.dtype, self.mesh, self.theta = dtype, mesh, cfg.rope_theta
        self.rope = Rope.from_config(cfg)
        self.scale = self.rope.softmax_scale(n + r) or (n + r) ** -0.5
        self.qtype = dense_qtype(cfg)

    def w(self, name):
        return getattr(self, name)[...].astype(self.dtype)

    def query(self, x, positions):
        """[B, S, d] -> q_nope [B, S, h, n] and the rotated q_rope [B, S, h, r]."""
        if hasattr(self, "q_up"):
            c = self.q_norm(einsum("bsd,dr->bsr", x, self.w("q_down"), self.qtype))
            q = einsum("bsr,rhe->bshe", c, self.w("q_up"), self.qtype)
        else:
            q = einsum("bsd,dhe->bshe", x, self.w("q"), self.qtype)
        q = checkpoint_name(constrain(q, self.mesh, ("batch", "seq", "heads", None)), "attn_q")
        return q[..., :self.nope], rotary(q[..., self.nope:], positions, self.theta, self.rope)

    def latent(self, x, positions):
        """[B, S, d] -> the normed latent c [B, S, Rkv] and the rotated k_rope [B, S, r]."""
        ckr = einsum("bsd,dr->bsr", x, self.w("kv_down"), self.qtype)
        ckr = checkpoint_name(constrain(ckr, self.mesh, ("batch", "seq", None)), "attn_kv")
        c, k_rope = ckr[..., :self.rank], ckr[..., self.rank:]
        k_rope = rotary(k_rope[:, :, None], positions, self.theta, self.rope)[:, :, 0]
        return self.kv_norm(c), k_rope

    def __call__(self, x, positions, segments=None, max_logit: bool = False):
        """x: [B, S, d] at positions [B, S] of documents `segments` ([B, S] or None: one)
        -> [B, S, d]; with max_logit, that and each head's largest logit [h]."""
        q_nope, q_rope = self.query(x, positions)
        c, k_rope = self.latent(x, positions)
        kv = einsum("bsr,rhe->bshe", c, self.w("kv_up"), self.qtype)
        kv = constrain(kv, self.mesh, ("batch", "seq", "heads", None))
        k_nope, v = kv[..., :self.nope], kv[..., self.nope:]
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], q_rope.shape)], -1)
        q = jnp.concatenate([q_nope, q_rope], -1)
        top = kernels.max_logits(q, k, self.mesh, self.scale, segments) if max_logit else None
        # The kernels want one head size for q, k and v: zero columns change no score and
        # no output, so the narrower side is padded and the padding cut off after.
        width = max(q.shape[-1], v.shape[-1])
        q, k, v = (jnp.pad(a, ((0, 0),) * 3 + ((0, width - a.shape[-1]),)) for a in (q, k, v))
        y = kernels.causal(q, k, v, self.mesh, self.scale, segments)[..., :self.v_dim]
        y = checkpoint_name(y, "attn_ctx")
        y = einsum("bshe,hed->bsd", y, self.w("out"), self.qtype)
        return (y, top) if max_logit else y

    def decode(self, x, positions, cache, layer):
        """Attention of x [B, S, d] at positions [B, S] over its stack's compressed cache,
        {"c": [repeats, period, B, L, Rkv], "k_rope": [..., B, L, r]}, slot `layer` this
        layer's. kv_up is absorbed: the query meets the latent through kv_up_k, and the
        context is carried back out through kv_up_v, so per token only c and k_rope are read.
        """
        q_nope, q_rope = self.query(x, positions)
        c, k_rope = self.latent(x, positions)
        rows = jnp.arange(x.shape[0])[:, None]
        cache = {"c": cache["c"].at[(*layer, rows, positions)].set(c.astype(cache["c"].dtype)),
                 "k_rope": cache["k_rope"].at[(*layer, rows, positions)].set(
                     k_rope.astype(cache["k_rope"].dtype))}
        cs, ks = cache["c"][layer], cache["k_rope"][layer]  # [B, L, Rkv], [B, L, r]
        kv_up = self.w("kv_up")
        q_latent = jnp.einsum("bshn,rhn->bshr", q_nope, kv_up[..., :self.nope])
        logits = (jnp.einsum("bshr,blr->bhsl", q_latent, cs, preferred_element_type=jnp.float32)
                  + jnp.einsum("bshe,ble->bhsl", q_rope, ks, preferred_element_type=jnp.float32))
        mask = jnp.arange(cs.shape[1]) <= positions[:, None, :, None]  # [B, 1, S, L]
        probs = jax.nn.softmax(jnp.where(mask, logits * self.scale, -jnp.inf), axis=-1)
        ctx = jnp.einsum("bhsl,blr->bshr", probs.astype(cs.dtype), cs)
        y = jnp.einsum("bshr,rhe->bshe", ctx, kv_up[..., self.nope:])
        return einsum("bshe,hed->bsd", y, self.w("out"), self.qtype), cache

    def empty_cache(self, repeats: int, period: int, batch: int, cache_len: int, dtype):
        """{"c", "k_rope"}: what decode reads, per stack; rows split like the batch."""
        shapes = {"c": self.rank, "k_rope": self.rope_dim}
        return {name: constrain(jnp.zeros((repeats, period, batch, cache_len, width), dtype),
                                self.mesh, ("batch", None, None))
                for name, width in shapes.items()}

    @staticmethod
    def cache_bytes_per_token(cfg, itemsize: int) -> int:
        """What the compressed cache holds per token, all layers together."""
        return cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * itemsize
