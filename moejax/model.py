"""Decoder-only transformer LM: RMSNorm, rotary causal attention (grouped-query), dense or MoE
FFN blocks, scanned over layers.

A dense model is the same config with num_experts = 0. Parameters carry logical dim names
(`out_sharding` metadata); parallel.RULES maps them to mesh axes and the state module creates
them in that layout. The blocks are stacks of periods (`layer_stacks`) whose parameters carry
a leading layer axis, each run by one `lax.scan`: compile time stays flat in depth.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from moejax import attention
from moejax.moe.experts import IN_NAMES, OUT_NAMES, ffn, in_shape
from moejax.moe.layer import MoE, MoEConfig
from moejax.parallel import constrain
from moejax.quant import QTYPES, einsum

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# What the backward pass keeps of each block's forward; everything else is recomputed.
# "matmuls" keeps the outputs of the attention and FFN matmuls, not the MoE dispatch buffers.
_MATMULS = ("attn_q", "attn_kv", "attn_ctx", "ffn_in", "moe_out")
REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "matmuls": jax.checkpoint_policies.save_only_these_names(*_MATMULS),
}


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


def kv_heads(cfg) -> int:
    return cfg.num_kv_heads or cfg.num_heads


def dense_qtype(cfg):
    """The quantization of the attention and dense FFN matmuls (moejax/quant.py); the router,
    the embeddings and the output logits are never quantized."""
    return QTYPES[cfg.quantization] if cfg.quantize_dense else None


QK_NORMS = ("none", "head", "all")


class Attention(nnx.Module):
    """Causal self-attention; num_heads / kv_heads query heads share each key-value head.

    qk_norm RMS-normalizes queries and keys before the rotation: over each head (Qwen3-MoE)
    or over all heads of the projection together (OLMoE)."""

    def __init__(self, cfg, mesh, dtype, param_dtype, rngs):
        d, h, kv, hd = cfg.d_model, cfg.num_heads, kv_heads(cfg), cfg.head_dim
        self.q = param(rngs, (d, h, hd), ("embed", "heads", None), param_dtype, d)
        self.kv = param(rngs, (d, 2, kv, hd), ("embed", None, "kv_heads", None), param_dtype, d)
        self.out = param(rngs, (h, hd, d), ("heads", None, "embed"), param_dtype, h * hd)
        self.theta, self.dtype, self.mesh = cfg.rope_theta, dtype, mesh
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
        q = checkpoint_name(constrain(q, self.mesh, ("batch", None, "heads", None)), "attn_q")
        k, v = (checkpoint_name(constrain(a, self.mesh, ("batch", None, "kv_heads", None)),
                                "attn_kv") for a in (k, v))
        return rotary(q, positions, self.theta), rotary(k, positions, self.theta), v

    def __call__(self, x, positions):
        q, k, v = self.project(x, positions)
        y = checkpoint_name(attention.causal(q, k, v, self.mesh), "attn_ctx")
        return einsum("bshe,hed->bsd", y, self.out[...].astype(self.dtype), self.qtype)

    def decode(self, x, positions, cache, layer):
        """Attention of x [B, S, d] at positions [B, S] over the cache of its stack, {"k", "v"}:
        [repeats, period, B, L, kv, hd], whose slot `layer` = (repeat, j) is this layer's.
        The new keys and values are written at their positions first; a query sees the keys
        at positions <= its own, so what lies past a row's end (padding, stale) is never read.
        """
        q, k, v = self.project(x, positions)
        rows = jnp.arange(x.shape[0])[:, None]
        # Only the S new rows are written, in place: the cache is a scan carry, not xs/ys,
        # which would copy all of it through every layer of every step.
        cache = {"k": cache["k"].at[(*layer, rows, positions)].set(k),
                 "v": cache["v"].at[(*layer, rows, positions)].set(v)}
        keys, values = cache["k"][layer], cache["v"][layer]  # [B, L, kv, hd]
        mask = jnp.arange(keys.shape[1]) <= positions[:, None, :, None]  # [B, 1, S, L]
        y = jax.nn.dot_product_attention(q, keys, values, mask=mask)
        return einsum("bshe,hed->bsd", y, self.out[...].astype(self.dtype), self.qtype), cache


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


def is_moe_layer(cfg, layer: int) -> bool:
    """MoE in every `moe_every`-th layer after the first `first_dense_layers`."""
    if cfg.num_experts == 0 or layer < cfg.first_dense_layers:
        return False
    return (layer - cfg.first_dense_layers) % cfg.moe_every == cfg.moe_every - 1


def moe_layer_ids(cfg) -> list[int]:
    """Indices of the MoE layers; the rows of the trainer's per-layer routing metrics."""
    return [i for i in range(cfg.num_layers) if is_moe_layer(cfg, i)]


def layer_stacks(cfg) -> list[tuple[int, int]]:
    """The layers as scanned stacks, in order: (repeats, period), a period being the blocks
    one scan step runs. The first dense layers, then periods of moe_every blocks that end in
    the MoE slot, then dense layers left over. A dense model (num_experts = 0) has the same
    stacks, so a dense run's checkpoint names match its MoE twin's (upcycling)."""
    first, every = cfg.first_dense_layers, cfg.moe_every
    periods, tail = divmod(cfg.num_layers - first, every)
    return [(n, p) for n, p in ((first, 1), (periods, every), (tail, 1)) if n]


class Block(nnx.Module):
    def __init__(self, cfg, layer: int, mesh, rngs):
        dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        self.mesh = mesh
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype)
        self.attn = Attention(cfg, mesh, dtype, param_dtype, rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype)
        if is_moe_layer(cfg, layer):
            self.ffn = MoE(cfg.d_model, cfg.d_ff, MoEConfig.from_config(cfg), cfg.activation,
                           mesh=mesh, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        else:
            # A dense model (num_experts = 0) widens its FFNs to k * d_ff so it does the same
            # FLOPs per token as the MoE it is compared to; dense_d_ff, if set, wins.
            d_ff = cfg.dense_d_ff or cfg.d_ff * (cfg.top_k if cfg.num_experts == 0 else 1)
            self.ffn = MLP(cfg.d_model, d_ff, cfg.activation, dtype, param_dtype, rngs,
                           dense_qtype(cfg))

    def __call__(self, x, positions, *, train, rng):
        return self.feed_forward(x + self.attn(self.attn_norm(x), positions), train, rng)

    def decode(self, x, positions, cache, layer):
        y, cache = self.attn.decode(self.attn_norm(x), positions, cache, layer)
        return self.feed_forward(x + y, train=False, rng=None)[0], cache

    def feed_forward(self, x, train, rng):
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            y, aux = self.ffn(h, train=train, rng=rng)
        else:
            y, aux = self.ffn(h), None
        return constrain(x + y, self.mesh, ("batch", None, None)), aux


class Stack(nnx.Module):
    """`repeats` periods of `period` blocks from layer `first` on; every parameter has a
    leading axis of size `repeats`, and a scan runs one period per step."""

    def __init__(self, cfg, first: int, repeats: int, period: int, mesh, rngs):
        def one(key):
            r = nnx.Rngs(key)
            return nnx.List([Block(cfg, first + j, mesh, r) for j in range(period)])

        keys = jax.random.split(rngs.params(), repeats)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: one(keys[0])))
        self.blocks = nnx.merge(graphdef, jax.vmap(lambda k: nnx.state(one(k)))(keys))
        self.layers = tuple(range(first, first + repeats * period, period))  # static

    def __call__(self, x, positions, *, train, rng, remat: str):
        graphdef, state = nnx.split(self.blocks)

        def body(x, inputs):
            state, layer = inputs
            aux = None
            for j, block in enumerate(nnx.merge(graphdef, state)):
                x, a = block(x, positions, train=train,
                             rng=None if rng is None else jax.random.fold_in(rng, layer + j))
                aux = a if a is not None else aux
            return x, aux

        if REMAT[remat] is not None:
            body = jax.checkpoint(body, policy=REMAT[remat], prevent_cse=False)
        return jax.lax.scan(body, x, (state, jnp.asarray(self.layers)))

    def decode(self, x, positions, cache):
        """x: [B, S, d] at positions [B, S]; cache: {"k", "v"} [repeats, period, B, L, kv, hd],
        carried through the scan so each layer writes its new rows in place."""
        graphdef, state = nnx.split(self.blocks)

        def body(carry, inputs):
            x, cache = carry
            state, repeat = inputs
            for j, block in enumerate(nnx.merge(graphdef, state)):
                x, cache = block.decode(x, positions, cache, (repeat, j))
            return (x, cache), None

        (x, cache), _ = jax.lax.scan(body, (x, cache), (state, jnp.arange(len(self.layers))))
        return x, cache

    def empty_cache(self, batch: int, cache_len: int, dtype):
        repeats, _, _, kv, hd = self.blocks[0].attn.kv.shape  # [repeats, d, 2, kv, hd]
        shape = (repeats, len(self.blocks), batch, cache_len, kv, hd)
        mesh = self.blocks[0].mesh
        return {name: constrain(jnp.zeros(shape, dtype), mesh, ("batch", None, "kv_heads", None))
                for name in ("k", "v")}


class Transformer(nnx.Module):
    def __init__(self, cfg, *, mesh: Mesh | None, rngs: nnx.Rngs):
        self.dtype, self.mesh, self.remat = DTYPES[cfg.dtype], mesh, cfg.remat
        self.max_seq_len = cfg.max_seq_len  # static: what generate may fill a cache up to
        param_dtype = DTYPES[cfg.param_dtype]
        self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), param_dtype,
                           cfg.d_model)
        stacks, first = [], 0
        for repeats, period in layer_stacks(cfg):
            stacks.append(Stack(cfg, first, repeats, period, mesh, rngs))
            first += repeats * period
        self.stacks = nnx.List(stacks)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype)
        self.unembed = (None if cfg.tie_embeddings else
                        param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                              param_dtype, cfg.d_model))

    def __call__(self, tokens, *, train: bool, rng=None):
        """tokens: [B, S] int -> float32 logits [B, S, V] and the MoE layers' aux dict, each
        value stacked over MoE layers in layer order ({} for a dense model)."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = self.embed_tokens(tokens)
        aux = []
        for stack in self.stacks:
            x, a = stack(x, positions, train=train, rng=rng, remat=self.remat)
            if a is not None:
                aux.append(a)
        aux = jax.tree.map(lambda *a: jnp.concatenate(a), *aux) if aux else {}
        return self.logits(x), aux

    def decode(self, tokens, start, cache, *, last=None):
        """Inference with a key-value cache. tokens: [B, S] int, row b at positions start[b] ..
        start[b] + S - 1; start: [B] int32; cache: from `init_cache`, holding every earlier
        position of each row. Returns float32 logits [B, S, V] and the cache with these
        tokens' keys and values written. MoE layers run as in evaluation (train=False).
        last: [B] int or None; given, only the logits of tokens[b, last[b]]: [B, 1, V]."""
        positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=start.dtype)
        x = self.embed_tokens(tokens)
        new_cache = []
        for stack, c in zip(self.stacks, cache, strict=True):
            x, c = stack.decode(x, positions, c)
            new_cache.append(c)
        if last is not None:  # a prefill needs one row's logits, not S x V of them
            x = jnp.take_along_axis(x, last[:, None, None], axis=1)
        return self.logits(x), new_cache

    def init_cache(self, batch: int, cache_len: int) -> list[dict]:
        """An empty cache for `batch` rows of up to `cache_len` positions, in the activation
        dtype: per stack {"k", "v"}: [repeats, period, batch, cache_len, kv_heads, head_dim]."""
        return [stack.empty_cache(batch, cache_len, self.dtype) for stack in self.stacks]

    def embed_tokens(self, tokens):
        # ZeRO-3 by hand for the lookup: gather the table's fsdp shards first, as XLA does for
        # matmul weights; a lookup into the split table would reshard the tokens instead.
        table = constrain(self.embed[...].astype(self.dtype), self.mesh, ("vocab", None))
        return constrain(jnp.take(table, tokens, axis=0), self.mesh, ("batch", None, None))

    def logits(self, x):
        """x: [B, S, d] from the last block -> float32 logits [B, S, V], accumulated and
        returned in float32 whatever the compute dtype: the loss's log-softmax reads them."""
        x = self.final_norm(x)
        if self.unembed is None:
            logits = jnp.einsum("bsd,vd->bsv", x, self.embed[...].astype(self.dtype),
                                preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("bsd,dv->bsv", x, self.unembed[...].astype(self.dtype),
                                preferred_element_type=jnp.float32)
        return constrain(logits, self.mesh, ("batch", None, "vocab"))
