"""Decoder-only transformer LM: RMSNorm, rotary causal attention, dense or MoE FFN blocks.

A dense model is the same config with num_experts = 0. Parameters carry layout names
(`out_sharding`); the trainer creates them in that layout (nnx.get_named_sharding under jit).
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from moejax.moe.experts import ffn, in_width
from moejax.moe.layer import MoE, MoEConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def param(rngs, shape, dtype, fan_in):
    """A replicated weight, normal with std 1/sqrt(fan_in)."""
    w = jax.random.normal(rngs.params(), shape, jnp.float32) * fan_in**-0.5
    return nnx.Param(w.astype(dtype), out_sharding=(None,) * len(shape), eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(None,),
                               eager_sharding=False)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rotary(x, positions, theta: float):
    """x: [B, S, heads, head_dim], positions: [B, S]. Rotates pairs (i, i + head_dim/2)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None, None].astype(jnp.float32) * freqs  # [B, S, 1, half]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg, dtype, param_dtype, rngs):
        d, h, hd = cfg.d_model, cfg.num_heads, cfg.head_dim
        self.qkv = param(rngs, (d, 3, h, hd), param_dtype, d)
        self.out = param(rngs, (h, hd, d), param_dtype, h * hd)
        self.theta, self.dtype = cfg.rope_theta, dtype

    def __call__(self, x, positions):
        q, k, v = jnp.unstack(jnp.einsum("bsd,dkhe->kbshe", x, self.qkv[...].astype(self.dtype)))
        q, k = rotary(q, positions, self.theta), rotary(k, positions, self.theta)
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return jnp.einsum("bshe,hed->bsd", y, self.out[...].astype(self.dtype))


class MLP(nnx.Module):
    def __init__(self, d_model, d_ff, activation, dtype, param_dtype, rngs):
        self.w_in = param(rngs, (d_model, in_width(d_ff, activation)), param_dtype, d_model)
        self.w_out = param(rngs, (d_ff, d_model), param_dtype, d_ff)
        self.activation, self.dtype = activation, dtype

    def __call__(self, x):
        w_in, w_out = self.w_in[...].astype(self.dtype), self.w_out[...].astype(self.dtype)
        return ffn(x.reshape(-1, x.shape[-1]), w_in, w_out, self.activation).reshape(x.shape)


def is_moe_layer(cfg, layer: int) -> bool:
    """MoE in every `moe_every`-th layer after the first `first_dense_layers`."""
    if cfg.num_experts == 0 or layer < cfg.first_dense_layers:
        return False
    return (layer - cfg.first_dense_layers) % cfg.moe_every == cfg.moe_every - 1


def moe_layer_ids(cfg) -> list[int]:
    """Indices of the MoE layers; the rows of the trainer's per-layer routing metrics."""
    return [i for i in range(cfg.num_layers) if is_moe_layer(cfg, i)]


def moe_config(cfg) -> MoEConfig:
    return MoEConfig(num_experts=cfg.num_experts, top_k=cfg.top_k,
                     capacity_factor=cfg.capacity_factor,
                     eval_capacity_factor=cfg.eval_capacity_factor,
                     min_capacity=cfg.min_capacity, renormalize=cfg.renormalize,
                     jitter_eps=cfg.jitter_eps, num_groups=cfg.num_groups or None,
                     dropless=cfg.dropless, score=cfg.router_score, routing=cfg.routing,
                     bias_rate=cfg.bias_rate, num_shared=cfg.num_shared_experts)


class Block(nnx.Module):
    def __init__(self, cfg, layer: int, mesh, rngs):
        dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        self.attn_norm = RMSNorm(cfg.d_model, param_dtype)
        self.attn = Attention(cfg, dtype, param_dtype, rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, param_dtype)
        if is_moe_layer(cfg, layer):
            self.ffn = MoE(cfg.d_model, cfg.d_ff, moe_config(cfg), cfg.activation, mesh=mesh,
                           rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        else:
            # Dense layers of an MoE model keep d_ff; a dense model (num_experts = 0) widens
            # them to k * d_ff so it does the same FLOPs per token as the MoE it is compared to.
            d_ff = cfg.d_ff * (cfg.top_k if cfg.num_experts == 0 else 1)
            self.ffn = MLP(cfg.d_model, d_ff, cfg.activation, dtype, param_dtype, rngs)

    def __call__(self, x, positions, *, train, rng):
        x = x + self.attn(self.attn_norm(x), positions)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            y, aux = self.ffn(h, train=train, rng=rng)
            return x + y, aux
        return x + self.ffn(h), None


class Transformer(nnx.Module):
    def __init__(self, cfg, *, mesh: Mesh | None, rngs: nnx.Rngs):
        self.dtype = DTYPES[cfg.dtype]
        param_dtype = DTYPES[cfg.param_dtype]
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), param_dtype, cfg.d_model)
        self.blocks = nnx.List([Block(cfg, i, mesh, rngs) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, param_dtype)
        self.unembed = (None if cfg.tie_embeddings
                        else param(rngs, (cfg.d_model, cfg.vocab_size), param_dtype, cfg.d_model))

    def __call__(self, tokens, *, train: bool, rng=None):
        """tokens: [B, S] int -> float32 logits [B, S, V] and the MoE layers' aux dicts."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.embed[...].astype(self.dtype)[tokens]
        aux = []
        for i, block in enumerate(self.blocks):
            x, a = block(x, positions, train=train,
                         rng=None if rng is None else jax.random.fold_in(rng, i))
            if a is not None:
                aux.append(a)
        x = self.final_norm(x)
        if self.unembed is None:
            logits = jnp.einsum("bsd,vd->bsv", x, self.embed[...].astype(self.dtype))
        else:
            logits = jnp.einsum("bsd,dv->bsv", x, self.unembed[...].astype(self.dtype))
        return logits.astype(jnp.float32), aux
