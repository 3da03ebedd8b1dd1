"""Attention in plain XLA: the causal, window and document masks, attention under an
explicit mask with gpt-oss's sinks (what CPU runs and decoding uses), and `blockwise`, a
flash attention whose logits are a block of keys at a time (context parallelism's CPU path
and the planner's). kernels.py picks among these and the accelerator kernels."""

import functools
import math

import jax
import jax.numpy as jnp


def seen(q_index, kv_index, window: int = 0) -> jax.Array:
    """[Sq, Skv] bool: the key at or before the query and, with a sliding window W > 0, fewer
    than W positions back (transformers' sliding_window: kv > q - W), itself included."""
    behind = q_index[:, None] - kv_index[None, :]
    return (behind >= 0) & (behind < window) if window else behind >= 0


def document_mask(q_segments, kv_segments, q_index, kv_index, window: int = 0) -> jax.Array:
    """[B, 1, Sq, Skv] bool: same document (both None: one per row) and key at or before the
    query, within `window` (`seen`). q_index [Sq], kv_index [Skv]: positions in the sequence.
    Documents are contiguous runs, so sequence distance within one is its positions'."""
    mask = seen(q_index, kv_index, window)[None, None]
    if q_segments is None:
        return mask
    return mask & (q_segments[:, None, :, None] == kv_segments[:, None, None, :])


def document_starts(segments: jax.Array) -> jax.Array:
    """[B, S] bool: where each row's runs of one segment id (its documents, padding) begin."""
    return jnp.concatenate([jnp.ones_like(segments[:, :1], bool),
                            segments[:, 1:] != segments[:, :-1]], axis=1)


def masked(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
           scale: float | None = None, sinks: jax.Array | None = None) -> jax.Array:
    """q [B, Sq, H, hd], k, v [B, Skv, KV, hd], mask [B or 1, 1, Sq, Skv] bool (True: seen)
    -> [B, Sq, H, hd]: attention under an explicit mask, decoding's over the cache. Without
    sinks, jax.nn.dot_product_attention's; with sinks [H] (float), their extra logit s_h in
    each row's normalizer, in float32 (jax's attention takes no sinks). A row that sees no
    key gives 0."""
    if sinks is None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    kv = k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = jnp.einsum("bqkgd,bskd->bqkgs", _grouped(q, kv) * scale, k.astype(jnp.float32))
    s = jnp.where(mask[:, 0, :, None, None, :], s, -jnp.inf)
    sink = _grouped_sinks(sinks, kv)[..., None]  # [kv, group, 1]
    # The sink is finite, so the shift is too, even where a row sees no key.
    top = jax.lax.stop_gradient(jnp.maximum(s.max(-1, keepdims=True), sink))
    p = jnp.exp(s - top)
    p = p / (p.sum(-1, keepdims=True) + jnp.exp(sink - top))
    y = jnp.einsum("bqkgs,bskd->bqkgd", p, v.astype(jnp.float32))
    return y.reshape(q.shape).astype(q.dtype)


def row_max(q, k, q_segments, kv_segments, q_index, scale: float, block: int,
            window: int = 0) -> jax.Array:
    """[b, Sq, h] float32: each query row's largest scaled logit over the keys it sees
    (`blockwise`'s mask), keys `block` at a time: QK-clip's statistic, where the kernels
    never expose their logits. q [b, Sq, h, hd] at positions q_index [Sq], k [b, S, kv, hd]
    at 0 .. S-1, segments [b, Sq] / [b, S]."""
    top, _ = _row_scan(q, k, q_segments, kv_segments, q_index, scale, block, window, False)
    return top.reshape(q.shape[:3])


def row_lse(q, k, q_segments, kv_segments, q_index, scale: float, block: int,
            window: int = 0) -> jax.Array:
    """[b, Sq, h] float32: each query row's log-sum-exp of its scaled logits over the keys it
    sees, as row_max walks them, without gradient: the normalizer a sink is weighed against
    where the kernel does not return its own (cudnn_attention, packed)."""
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    top, total = _row_scan(q, k, q_segments, kv_segments, q_index, scale, block, window, True)
    return (top + jnp.log(total)).reshape(q.shape[:3])


def band_lse(q, k, segments, scale: float, window: int) -> jax.Array:
    """row_lse of a layer with a sliding window, q and k at positions 0 .. S-1 (segments
    [b, S]): each tile of 128 query rows against only the key tiles its band reaches, not
    all S keys (for gpt-oss's 128-token window at 4,096 tokens, 256 keys a row, not 4,096)."""
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    b, seq = segments.shape
    tile = math.gcd(seq, 128)
    n = seq // tile
    reach = band_keys(seq, window) // tile
    qg = _grouped(q, k.shape[2]) * scale
    qg = qg.reshape(b, n, tile, *qg.shape[2:])  # [b, n, tile, kv, group, hd]
    keys, index = k.reshape(b, n, tile, *k.shape[2:]), jnp.arange(seq).reshape(n, tile)
    rows = segments.reshape(b, n, tile)
    top, total = jnp.full(qg.shape[:-1], -jnp.inf), jnp.zeros(qg.shape[:-1], jnp.float32)
    for d in range(reach):  # query tile i against key tile i - d
        shifted = jnp.concatenate([jnp.zeros_like(keys[:, :d]), keys[:, :n - d]], 1)
        segs = jnp.concatenate([jnp.full_like(rows[:, :d], -1), rows[:, :n - d]], 1)
        at = index - d * tile  # the shifted keys' positions (< 0: none)
        seen = ((at[:, None, :] >= 0) & (at[:, None, :] <= index[:, :, None])
                & (index[:, :, None] - at[:, None, :] < window))
        seen = seen[None] & (rows[..., :, None] == segs[..., None, :])  # [b, n, tile, tile]
        s = jnp.einsum("bnqkgd,bnskd->bnqkgs", qg, shifted.astype(jnp.float32))
        top, total = _logsumexp_step(top, total, jnp.where(seen[:, :, :, None, None, :], s,
                                                            -jnp.inf))
    return (top + jnp.log(total)).reshape(b, seq, -1)


def band_keys(seq: int, window: int) -> int:
    """The keys band_lse computes a row's logits over: the 128-row tiles (or gcd(seq, 128))
    a `window` reaches back from its own tile, itself included."""
    tile = math.gcd(seq, 128)
    return tile * min(seq // tile, -(-(window - 1) // tile) + 1)


def _logsumexp_step(top, total, s):
    """One block of logits s [..., keys] into a running max and sum of exp(logit - max)."""
    new_top = jnp.maximum(top, s.max(-1))
    safe = jnp.where(jnp.isfinite(new_top), new_top, 0.0)  # no key seen yet
    return new_top, total * jnp.exp(top - safe) + jnp.exp(s - safe[..., None]).sum(-1)


def _row_scan(q, k, q_segments, kv_segments, q_index, scale, block, window, total: bool):
    """Each row's running max of its logits and, if `total`, its sum of exp(logit - max)."""
    qg = _grouped(q, k.shape[2]) * scale
    kv_index = jnp.arange(k.shape[1]).reshape(-1, block)

    def step(carry, xs):
        top, sums = carry
        kb, segments, index = xs
        s = _block_scores(qg, kb, q_segments, segments, q_index, index, window)
        if total:
            return _logsumexp_step(top, sums, s), None
        return (jnp.maximum(top, s.max(-1)), sums), None

    xs = (_key_blocks(k, block), _key_blocks(kv_segments, block), kv_index)
    start = (jnp.full(qg.shape[:-1], -jnp.inf), jnp.zeros(qg.shape[:-1], jnp.float32))
    return jax.lax.scan(step, start, xs)[0]


def _grouped_sinks(sinks, kv: int):
    """[H] -> [kv, group] float32, the layout of `_grouped`'s heads."""
    return sinks.astype(jnp.float32).reshape(kv, -1)


def _key_blocks(x, block: int):
    """[b, S, ...] -> [S / block, b, block, ...]: what lax.scan walks."""
    return jnp.moveaxis(x.reshape(x.shape[0], -1, block, *x.shape[2:]), 1, 0)


def _block_scores(qg, kb, q_segments, kv_segments, q_index, kv_index, window):
    """Scaled logits of one key block, [b, Sq, kv, group, block] f32, -inf where masked."""
    s = jnp.einsum("bqkgd,bskd->bqkgs", qg, kb.astype(jnp.float32))
    mask = document_mask(q_segments, kv_segments, q_index, kv_index, window)[:, 0]
    return jnp.where(mask[:, :, None, None, :], s, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def blockwise(q, k, v, q_segments, kv_segments, q_index, sinks, scale: float, block: int,
              window: int):
    """Flash attention in XLA: q [b, Sq, h, hd] at positions q_index [Sq] against k, v
    [b, S, kv, hd] at 0 .. S-1, within documents (and `causal`'s window), keys `block` at a
    time with an online softmax; the backward recomputes each block's probabilities from the
    saved log-sum-exp. The logits held at once are [b, Sq, h, block], not [b, Sq, h, S]: the
    CPU path (and the planner) of context parallelism, where S is long. sinks [h] or None:
    `causal`'s, a key seen before the first block, with no value."""
    return _blockwise_fwd(q, k, v, q_segments, kv_segments, q_index, sinks, scale, block,
                          window)[0]


def _grouped(q, kv: int):
    return q.reshape(*q.shape[:2], kv, q.shape[2] // kv, q.shape[3]).astype(jnp.float32)


def _blockwise_fwd(q, k, v, q_segments, kv_segments, q_index, sinks, scale, block, window):
    qg = _grouped(q, k.shape[2]) * scale
    kv_index = jnp.arange(k.shape[1]).reshape(-1, block)

    def step(carry, xs):
        out, top, total = carry
        kb, vb, segments, index = xs
        s = _block_scores(qg, kb, q_segments, segments, q_index, index, window)
        new_top = jnp.maximum(top, s.max(-1))
        safe = jnp.where(jnp.isfinite(new_top), new_top, 0.0)  # no key seen yet
        p = jnp.exp(s - safe[..., None])
        fade = jnp.exp(top - safe)
        out = out * fade[..., None] + jnp.einsum("bqkgs,bskd->bqkgd", p,
                                                 vb.astype(jnp.float32))
        return (out, new_top, total * fade + p.sum(-1)), None

    if sinks is None:
        top, total = jnp.full(qg.shape[:-1], -jnp.inf), jnp.zeros(qg.shape[:-1], jnp.float32)
    else:  # the sink as the first key seen: its logit the running max, exp(0) the total
        top = jnp.broadcast_to(_grouped_sinks(sinks, k.shape[2]), qg.shape[:-1])
        total = jnp.ones(qg.shape[:-1], jnp.float32)
    xs = (_key_blocks(k, block), _key_blocks(v, block), _key_blocks(kv_segments, block),
          kv_index)
    (out, top, total), _ = jax.lax.scan(step, (jnp.zeros(qg.shape, jnp.float32), top, total),
                                        xs)
    # Every query sees at least itself (padding sees padding): total > 0.
    y = (out / total[..., None]).reshape(q.shape).astype(q.dtype)
    return y, (q, k, v, q_segments, kv_segments, q_index, sinks, y, top + jnp.log(total))


def _blockwise_bwd(scale, block, window, residuals, dy):
    q, k, v, q_segments, kv_segments, q_index, sinks, y, lse = residuals
    kv = k.shape[2]
    qg, dyg = _grouped(q, kv) * scale, _grouped(dy, kv)
    rowdot = (dyg * _grouped(y, kv)).sum(-1)  # [b, Sq, kv, group]: sum_j p_ij dp_ij

    def step(dq, xs):
        kb, vb, segments, index = xs
        p = jnp.exp(_block_scores(qg, kb, q_segments, segments, q_index, index, window)
                    - lse[..., None])
        dp = jnp.einsum("bqkgd,bskd->bqkgs", dyg, vb.astype(jnp.float32))
        ds = p * (dp - rowdot[..., None])
        dq = dq + jnp.einsum("bqkgs,bskd->bqkgd", ds, kb.astype(jnp.float32))
        return dq, (jnp.einsum("bqkgs,bqkgd->bskd", ds, qg),
                    jnp.einsum("bqkgs,bqkgd->bskd", p, dyg))

    xs = (_key_blocks(k, block), _key_blocks(v, block), _key_blocks(kv_segments, block),
          jnp.arange(k.shape[1]).reshape(-1, block))
    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(qg.shape, jnp.float32), xs)

    def unblock(x, like):  # [S / block, b, block, kv, hd] -> [b, S, kv, hd]
        return jnp.moveaxis(x, 0, 1).reshape(like.shape).astype(like.dtype)

    dsinks = None
    if sinks is not None:
        # d loss / d s_h = -sum over rows of p_sink (dy . y): the sink's logit enters every
        # probability's normalizer, and its own "value" is 0.
        p_sink = jnp.exp(_grouped_sinks(sinks, kv) - lse)
        dsinks = -(p_sink * rowdot).sum((0, 1)).reshape(sinks.shape).astype(sinks.dtype)
    return ((dq * scale).reshape(q.shape).astype(q.dtype), unblock(dk, k), unblock(dv, v),
            None, None, None, dsinks)


blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
