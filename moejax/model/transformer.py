"""Decoder-only transformer LM: RMSNorm, rotary causal attention (grouped-query), dense or MoE
FFN blocks, scanned over layers.

A dense model is the same config with num_experts = 0. Parameters carry logical dim names
(`out_sharding` metadata); parallel.RULES maps them to mesh axes and the state module creates
them in that layout. The blocks are stacks of periods (`layer_stacks`) whose parameters carry
a leading layer axis, each run by one `lax.scan`: compile time stays flat in depth.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from moejax.model import xla_attention
from moejax.model.attention import Attention
from moejax.model.layers import DTYPES, MLP, RMSNorm, dense_qtype, param
from moejax.model.mla import LatentAttention
from moejax.model.mtp import MTP
from moejax.moe.ffn import activation_of
from moejax.moe.layer import MoE, MoEConfig
from moejax.parallel import constrain

# model.attention: grouped-query, or DeepSeek's multi-head latent attention
ATTENTIONS = {"gqa": Attention, "mla": LatentAttention}

# What the backward pass keeps of each block's forward; everything else is recomputed.
# "matmuls" keeps the outputs of the attention and FFN matmuls, not the MoE dispatch buffers;
# "offload" keeps only each block's input, as "full" does, but in host memory (pinned_host)
# until the backward pass brings it back: device memory then holds no layer's activations.
_MATMULS = ("attn_q", "attn_kv", "attn_ctx", "ffn_in", "moe_out")
LAYER_INPUT = "layer_input"
REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "matmuls": jax.checkpoint_policies.save_only_these_names(*_MATMULS),
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT],
        offload_src="device", offload_dst="pinned_host"),
}
FORWARD_AGAIN = ("full", "offload")  # the policies that recompute the whole forward


def is_moe_layer(cfg, layer: int) -> bool:
    """MoE in every `moe_every`-th layer after the first `first_dense_layers`."""
    if cfg.num_experts == 0 or layer < cfg.first_dense_layers:
        return False
    return (layer - cfg.first_dense_layers) % cfg.moe_every == cfg.moe_every - 1


def moe_layer_ids(cfg, mtp: bool = False) -> list[int]:
    """Indices of the MoE layers; the rows of the trainer's per-layer routing metrics. With
    `mtp`, the multi-token prediction modules' (layers num_layers + k) follow."""
    return [i for i in range(cfg.num_layers + (cfg.mtp_layers if mtp else 0))
            if is_moe_layer(cfg, i)]


def layer_window(cfg, layer: int) -> int:
    """The sliding window of `layer`'s attention (0: full causal): model.sliding_window, but
    every `full_attention_every`-th layer attends in full (gpt-oss: 2, the odd layers)."""
    every = cfg.get("full_attention_every", 0)
    return 0 if every and layer % every == every - 1 else cfg.get("sliding_window", 0)


def layer_stacks(cfg) -> list[tuple[int, int]]:
    """The layers as scanned stacks, in order: (repeats, period), a period being the blocks
    one scan step runs. The first dense layers, then periods of moe_every blocks that end in
    the MoE slot, then dense layers left over. A dense model (num_experts = 0) has the same
    stacks, so a dense run's checkpoint names match its MoE twin's (upcycling).

    Windowed and full attention alternating (full_attention_every = a) make each period a
    multiple of a, so that every scan step meets the same pattern; the layers left over
    form one stack of a single period."""
    first, every = cfg.first_dense_layers, cfg.moe_every
    a = cfg.get("full_attention_every", 0) if cfg.get("sliding_window", 0) else 0
    if a <= 1:
        periods, tail = divmod(cfg.num_layers - first, every)
        return [(n, p) for n, p in ((first, 1), (periods, every), (tail, 1)) if n]
    stacks = []
    for n, p in ((first, a), (cfg.num_layers - first, math.lcm(every, a))):
        stacks += [(n // p, p), (1, n % p)]
    return [(n, p) for n, p in stacks if n and p]


class Block(nnx.Module):
    def __init__(self, cfg, layer: int, mesh, rngs):
        dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        self.mesh = mesh
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype)
        window = {"window": layer_window(cfg, layer)} if cfg.attention == "gqa" else {}
        self.attn = ATTENTIONS[cfg.attention](cfg, mesh, dtype, param_dtype, rngs, **window)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype)
        if is_moe_layer(cfg, layer):
            self.ffn = MoE(cfg.d_model, cfg.d_ff, MoEConfig.from_config(cfg), cfg.activation,
                           mesh=mesh, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        else:
            # A dense model (num_experts = 0) widens its FFNs to k * d_ff so it does the same
            # FLOPs per token as the MoE it is compared to; dense_d_ff, if set, wins.
            d_ff = cfg.dense_d_ff or cfg.d_ff * (cfg.top_k if cfg.num_experts == 0 else 1)
            self.ffn = MLP(cfg.d_model, d_ff, activation_of(cfg), dtype, param_dtype, rngs,
                           dense_qtype(cfg))

    def __call__(self, x, positions, segments, *, train, rng, forced=None,
                 return_ids: bool = False, max_logit: bool = False):
        """segments: [B, S] documents (0: padding, which the MoE layer neither routes nor
        counts) or None (every row one document, no padding). forced, return_ids: the MoE
        layer's (moe/layer.py), for an MoE block. -> x, the MoE aux (or None) and, with
        max_logit, the attention's largest logit per head [h] (else None)."""
        y = self.attn(self.attn_norm(x), positions, segments, max_logit=max_logit)
        y, top = y if max_logit else (y, None)
        x, aux = self.feed_forward(x + y, train, rng, None if segments is None else segments != 0,
                                   forced, return_ids)
        return x, aux, top

    def decode(self, x, positions, cache, layer, return_ids: bool = False):
        """-> x, cache and, with return_ids, an MoE block's expert ids [B, S, k] (else None)."""
        y, cache = self.attn.decode(self.attn_norm(x), positions, cache, layer)
        x, aux = self.feed_forward(x + y, train=False, rng=None, return_ids=return_ids)
        return x, cache, aux["expert_ids"] if return_ids and aux else None

    def feed_forward(self, x, train, rng, real=None, forced=None, return_ids=False):
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            # Only what is asked for: quant_check wraps MoE.__call__ with its original arguments.
            asked = {"forced": forced} if forced is not None else {}
            asked.update({"return_ids": True} if return_ids else {})
            y, aux = self.ffn(h, train=train, rng=rng, real=real, **asked)
        else:
            y, aux = self.ffn(h), None
        return constrain(x + y, self.mesh, ("batch", "seq", None)), aux


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
        # The MoE blocks of a period, in order, and the stack's MoE layers: static.
        self.per_period = sum(is_moe_layer(cfg, first + j) for j in range(period))
        self.moe_layers = repeats * self.per_period

    def __call__(self, x, positions, segments, *, train, rng, remat: str, forced=None,
                 return_ids: bool = False, max_logits: bool = False):
        """forced: [moe_layers, B, S, k] expert ids for its MoE layers in order, or None.
        Returns x, the MoE blocks' aux, each value [moe_layers, ...] in layer order, and with
        max_logits each block's largest attention logits, {"blocks.j.attn": [repeats, h]}
        (the layout of that attention's parameters), else None."""
        graphdef, state = nnx.split(self.blocks)
        if forced is not None:  # [repeats, MoE blocks of a period, B, S, k]
            forced = forced.reshape(len(self.layers), self.per_period, *forced.shape[1:])

        def body(x, inputs):
            state, layer, ids = inputs
            aux, tops = [], {}
            for j, block in enumerate(nnx.merge(graphdef, state)):
                moe = isinstance(block.ffn, MoE)
                x = checkpoint_name(x, LAYER_INPUT)
                x, a, top = block(x, positions, segments, train=train,
                                  rng=None if rng is None else jax.random.fold_in(rng, layer + j),
                                  forced=ids[len(aux)] if moe and ids is not None else None,
                                  return_ids=return_ids, max_logit=max_logits)
                aux += [a] if moe else []
                if max_logits:
                    tops[f"blocks.{j}.attn"] = top
            return x, (jax.tree.map(lambda *a: jnp.stack(a), *aux) if aux else None, tops)

        if REMAT[remat] is not None:
            body = jax.checkpoint(body, policy=REMAT[remat], prevent_cse=False)
        x, (aux, tops) = jax.lax.scan(body, x, (state, jnp.asarray(self.layers), forced))
        return x, jax.tree.map(merge_periods, aux), tops or None

    def decode(self, x, positions, cache, return_ids: bool = False):
        """x: [B, S, d] at positions [B, S]; cache: the attention's (`empty_cache`), each
        array [repeats, period, B, L, ...], carried through the scan so each layer writes its
        new rows in place. Returns x, cache and, with return_ids and MoE blocks here, their
        expert ids [moe_layers, B, S, k] (else None)."""
        graphdef, state = nnx.split(self.blocks)

        def body(carry, inputs):
            x, cache = carry
            state, repeat = inputs
            ids = []
            for j, block in enumerate(nnx.merge(graphdef, state)):
                x, cache, block_ids = block.decode(x, positions, cache, (repeat, j), return_ids)
                ids += [] if block_ids is None else [block_ids]
            return (x, cache), jnp.stack(ids) if ids else None

        (x, cache), ids = jax.lax.scan(body, (x, cache), (state, jnp.arange(len(self.layers))))
        return x, cache, None if ids is None else merge_periods(ids)

    def empty_cache(self, batch: int, cache_len: int, dtype):
        return self.blocks[0].attn.empty_cache(len(self.layers), len(self.blocks), batch,
                                               cache_len, dtype)


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
        # DeepSeek-V3's multi-token prediction: module k runs layer num_layers + k's block
        self.mtp = nnx.List([MTP(cfg, Block(cfg, cfg.num_layers + k, mesh, rngs), rngs)
                             for k in range(cfg.mtp_layers)])
        self.num_layers = cfg.num_layers

    def __call__(self, tokens, *, train: bool, rng=None, segments=None, routing=None,
                 return_routing: bool = False, max_logits: bool = False):
        """tokens: [B, S] int -> float32 logits [B, S, V] and the MoE layers' aux dict, each
        value stacked over MoE layers in layer order ({} for a dense model). segments: [B, S]
        int, the document of each token (1, 2, ... along a row; 0 = padding), or None: each
        row one document. A document sees only itself, its positions starting at 0.
        routing: [B, S, moe_layers, k] int expert ids each MoE layer routes by instead of its
        router's choice (a recorded routing replayed; aux gains "routing_mismatch"), or None.
        return_routing: aux gains "expert_ids" [moe_layers, B, S, k], each token's experts
        before capacity drops; off, nothing of it is computed.
        max_logits: aux gains "max_logits", {"stacks.i.blocks.j.attn": [repeats, h]}, each
        attention head's largest logit over the batch (QK-clip's); off, none is computed."""
        x, aux, tops = self.hidden(tokens, train=train, rng=rng, segments=segments,
                                   routing=routing, return_routing=return_routing,
                                   max_logits=max_logits)
        aux = stacked(aux)
        return self.logits(x), {**aux, "max_logits": tops} if max_logits else aux

    def with_mtp(self, tokens, *, train: bool, rng=None, segments=None, routing=None,
                 max_logits: bool = False):
        """tokens: [B, S + 1], the inputs and the last target -> the logits for tokens[:, :-1]
        as __call__'s, aux over the MoE layers and then the MTP modules', and the MTP logits
        [D, B, S, V]: depth k's at position i score tokens[:, i + k + 1], those past the end
        scoring nothing (the loss masks them). routing: as __call__'s, for the main model's
        MoE layers; the MTP modules route by their own routers, so "routing_mismatch" is
        [main MoE layers]. max_logits: as __call__'s, the MTP blocks' too ("mtp.k.block.attn":
        [h])."""
        inputs = tokens[:, :-1]
        x, aux, tops = self.hidden(inputs, train=train, rng=rng, segments=segments,
                                   routing=routing, max_logits=max_logits)
        mismatch = [a.pop("routing_mismatch") for a in aux if "routing_mismatch" in a]
        positions = document_positions(inputs, segments)
        padded = jnp.pad(tokens, ((0, 0), (0, len(self.mtp))))
        # Depth 1 reads the main model's final-normed state, as transformers' and vLLM's
        # DeepSeek-V3 drafters do; depth k > 1 the block output of depth k - 1.
        normed = self.final_norm(x)
        h, logits = normed, []
        for k, module in enumerate(self.mtp, 1):
            ahead = self.embed_tokens(padded[:, k:k + inputs.shape[1]])
            layer_rng = None if rng is None else jax.random.fold_in(rng, self.num_layers + k)
            run = remat(module, self.remat, train=train, rng=layer_rng, max_logit=max_logits)
            h, a, normed_k, top = run(h, ahead, positions, segments)
            if max_logits:
                tops[f"mtp.{k - 1}.block.attn"] = top
            if a is not None:  # one layer: the leading axis the scanned stacks' aux have
                aux.append(jax.tree.map(lambda v: v[None], a))
            logits.append(self.head(normed_k))
        aux = stacked(aux)
        if mismatch:
            aux["routing_mismatch"] = jnp.concatenate(mismatch)
        if max_logits:
            aux["max_logits"] = tops
        return self.head(normed), aux, jnp.stack(logits)

    def hidden(self, tokens, *, train: bool, rng=None, segments=None, routing=None,
               return_routing: bool = False, max_logits: bool = False):
        """tokens: [B, S] -> the last block's output [B, S, d], the stacks' aux dicts and
        their largest attention logits ({} without max_logits). routing, return_routing,
        max_logits: as __call__'s."""
        moe_layers = sum(stack.moe_layers for stack in self.stacks)
        if routing is not None and routing.ndim == 3:  # [B, S, L * k], as data rows hold it
            routing = routing.reshape(*routing.shape[:2], moe_layers, -1)
        if routing is not None and (routing.ndim != 4 or routing.shape[2] != moe_layers):
            raise ValueError(f"routing: shape {routing.shape}; allowed: [B, S, {moe_layers}, "
                             f"top_k] expert ids ({moe_layers} MoE layers)")
        positions = document_positions(tokens, segments)
        x = self.embed_tokens(tokens)
        aux, tops, first = [], {}, 0
        for i, stack in enumerate(self.stacks):
            forced = None
            if routing is not None and stack.moe_layers:  # [B, S, L, k] -> [L_here, B, S, k]
                forced = jnp.moveaxis(routing[:, :, first:first + stack.moe_layers], 2, 0)
                first += stack.moe_layers
            x, a, top = stack(x, positions, segments, train=train, rng=rng, remat=self.remat,
                              forced=forced, return_ids=return_routing, max_logits=max_logits)
            if a is not None:
                aux.append(a)
            tops.update({f"stacks.{i}.{name}": s for name, s in (top or {}).items()})
        return x, aux, tops

    def decode(self, tokens, start, cache, *, last=None, return_routing: bool = False):
        """Inference with a key-value cache. tokens: [B, S] int, row b at positions start[b] ..
        start[b] + S - 1; start: [B] int32; cache: from `init_cache`, holding every earlier
        position of each row. Returns float32 logits [B, S, V] and the cache with these
        tokens' keys and values written. MoE layers run as in evaluation (train=False).
        last: [B] int or None; given, only the logits of tokens[b, last[b]]: [B, 1, V].
        return_routing: a third result, the expert ids of every token here [B, S, moe_layers,
        k] (generate's routing record), chosen as the training forward chooses them."""
        positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=start.dtype)
        x = self.embed_tokens(tokens)
        new_cache, ids = [], []
        for stack, c in zip(self.stacks, cache, strict=True):
            x, c, stack_ids = stack.decode(x, positions, c, return_routing)
            new_cache.append(c)
            if stack_ids is not None:
                ids.append(stack_ids)
        if last is not None:  # a prefill needs one row's logits, not S x V of them
            x = jnp.take_along_axis(x, last[:, None, None], axis=1)
        if not return_routing:
            return self.logits(x), new_cache
        return self.logits(x), new_cache, jnp.moveaxis(jnp.concatenate(ids), 0, 2)

    def init_cache(self, batch: int, cache_len: int) -> list[dict]:
        """An empty cache for `batch` rows of up to `cache_len` positions, in the activation
        dtype: per stack the attention's, {"k", "v"} (grouped-query) or {"c", "k_rope"} (latent),
        each [repeats, period, batch, cache_len, ...]."""
        return [stack.empty_cache(batch, cache_len, self.dtype) for stack in self.stacks]

    def embed_tokens(self, tokens):
        # ZeRO-3 by hand for the lookup: gather the table's fsdp shards first, as XLA does for
        # matmul weights; a lookup into the split table would reshard the tokens instead.
        table = constrain(self.embed[...].astype(self.dtype), self.mesh, ("vocab", None))
        return constrain(jnp.take(table, tokens, axis=0), self.mesh, ("batch", "seq", None))

    def logits(self, x):
        """x: [B, S, d] from the last block -> float32 logits [B, S, V]."""
        return self.head(self.final_norm(x))

    def head(self, x):
        """Normed x [B, S, d] -> float32 logits [B, S, V], accumulated and returned in float32
        whatever the compute dtype: the loss's log-softmax reads them."""
        if self.unembed is None:
            logits = jnp.einsum("bsd,vd->bsv", x, self.embed[...].astype(self.dtype),
                                preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("bsd,dv->bsv", x, self.unembed[...].astype(self.dtype),
                                preferred_element_type=jnp.float32)
        return constrain(logits, self.mesh, ("batch", "seq", "vocab"))


def document_positions(tokens, segments=None):
    """[B, S] positions: each token's place in its document (segments), or in its row."""
    index = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if segments is None:
        return index
    starts = xla_attention.document_starts(segments)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def remat(module: nnx.Module, policy: str, **static):
    """module(*arrays, **static), recomputed in the backward pass under REMAT[policy] as the
    stacks' blocks are; `static`: its Python arguments (train, ...)."""
    graphdef, state = nnx.split(module)

    def call(state, *arrays):
        return nnx.merge(graphdef, state)(*arrays, **static)

    if REMAT[policy] is not None:
        call = jax.checkpoint(call, policy=REMAT[policy], prevent_cse=False)
    return lambda *arrays: call(state, *arrays)


def merge_periods(a):
    """[repeats, MoE blocks of a period, ...] -> [moe_layers, ...], in layer order."""
    return a.reshape(-1, *a.shape[2:])


def stacked(aux: list) -> dict:
    """The MoE layers' aux dicts, each value [layers, ...], joined in layer order."""
    return jax.tree.map(lambda *a: jnp.concatenate(a), *aux) if aux else {}
