"""The experts on XLA:CPU, where only tests and laptops run: one expert at a time.

A scan over experts with a hand-written backward: XLA:CPU runs 2-D matmuls faster than a
batched one, writes each expert's result in place into the stacked output, and a switch on
the filled rows of each expert's capacity buffer runs only those (a capacity factor of 1.25
leaves ~20% of the slots empty). Nothing here is lowered for GPU or TPU: `experts.py` picks
this module per platform, and only for the CPU.
"""

from functools import partial

import jax
import jax.numpy as jnp

from moejax.moe.dispatch import take_rows
from moejax.moe.ffn import activate, same_varying_axes, zero_at_zero


def experts_ffn(x: jax.Array, w_in: jax.Array, w_out: jax.Array, activation,
                filled: jax.Array | None, segments: int, b_in: jax.Array | None = None,
                b_out: jax.Array | None = None) -> jax.Array:
    """x: [E, S * C, d] -> [E, S * C, d]: expert e's FFN on its S segments of C slots, with
    the biases b_in [E, g*f] and b_out [E, d] where given (zero elsewhere).

    A segment is the slots one capacity group sent to expert e: its first filled[e, s] rows
    are tokens, the rest is padding (zero in, zero out). filled: [E, S] int, or None to find
    it from the zero padding. Only filled rows are computed, rounded up to a chunk (see
    `_prefix_lengths`). With S > 1 each expert's filled rows are first gathered to the front.
    """
    if filled is None:
        filled = trailing_filled(x, segments, activation, biased=b_in is not None)
    # One program for both: a zero bias adds nothing, and its gradient is dropped.
    b_in = jnp.zeros((w_in.shape[0], w_in.shape[-1]), w_in.dtype) if b_in is None else b_in
    b_out = jnp.zeros((w_out.shape[0], w_out.shape[-1]), w_out.dtype) if b_out is None else b_out
    # Inside shard_map the weights are invariant over the token axes and x is not; mark them
    # varying here so that autodiff, not the custom VJP, sums their gradients over those axes.
    x, w_in, w_out, b_in, b_out, filled = same_varying_axes(x, w_in, w_out, b_in, b_out, filled)
    return _experts(x, w_in, w_out, b_in, b_out, filled.astype(jnp.int32), activation)


def trailing_filled(x: jax.Array, segments: int, activation, biased: bool = False) -> jax.Array:
    """[E, S * C, d] -> filled [E, S]: each segment's rows up to its last nonzero one.

    Padding slots are zero, so this finds the filled rows without being told. A token whose
    input is exactly zero, last in its queue, counts as padding: the same numbers where a
    zero row gives zero output and passes back no gradient (ffn.ZERO_AT_ZERO). Elsewhere
    (plain gelu: gelu'(0) = 0.5; clamped_swiglu; any expert with biases) every row runs.
    """
    num_experts, rows, _ = x.shape
    cap = rows // segments
    if biased or not zero_at_zero(activation):
        return jnp.full((num_experts, segments), cap, jnp.int32)
    nonzero = jnp.any(x != 0, axis=-1).reshape(num_experts, segments, cap)
    return jnp.max(jnp.where(nonzero, jnp.arange(1, cap + 1), 0), axis=-1).astype(jnp.int32)


def _prefix_lengths(rows: int) -> tuple[int, ...]:
    """Static row counts the experts can run at: 0 and multiples of a chunk up to `rows`.

    At most 16 chunks: each length is a separately compiled branch (compiling 16 costs the
    tiny config well under a second), and the chunk is what an expert computes beyond its
    tokens at worst.
    """
    chunk = -(-max(1, -(-rows // 16)) // 8) * 8  # ceil(rows / 16) rounded up to a multiple of 8
    return tuple(min(rows, m * chunk) for m in range(-(-rows // chunk) + 1))


def _compaction(filled: jax.Array, cap: int):
    """Row maps between one expert's [S * C] slots and its filled rows packed to the front.

    Returns src [S * C] (slot of each packed row; S * C past the last), back [S * C] (packed
    row of each slot; S * C if empty) and the number of filled rows.
    """
    rows = filled.shape[0] * cap
    slot = jnp.arange(rows, dtype=jnp.int32)
    seg, pos = slot // cap, slot % cap
    start = jnp.cumsum(filled) - filled
    back = jnp.where(pos < filled[seg], start[seg] + pos, rows)
    src = jnp.full((rows,), rows, jnp.int32).at[back].set(slot, mode="drop")
    return src, back, filled.sum()


def _pad_rows(a: jax.Array, rows: int) -> jax.Array:
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, 0)))


def _on_filled_rows(filled, rows):
    """pack / unpack between one expert's [S*C] slots and its filled rows at the front, the
    switch index that covers those rows and the static lengths it picks from."""
    segments = filled.shape[0]
    src, back, n = _compaction(filled, rows // segments)
    lengths = _prefix_lengths(rows)
    index = (n + lengths[1] - 1) // lengths[1]
    if segments == 1:  # the filled rows already lead
        return (lambda a: a), (lambda a: a), index, lengths
    return (lambda a: take_rows(a, src)), (lambda a: take_rows(a, back)), index, lengths


def _one_expert_fwd(x, w_in, w_out, b_in, b_out, filled, activation):
    """x: [S*C, d] -> y [S*C, d] and the pre-activation h [S*C, in_width] (packed rows);
    rows past the filled ones stay zero, biases and all."""
    rows = x.shape[0]
    pack, unpack, index, lengths = _on_filled_rows(filled, rows)

    def branch(length):
        def run(x, w_in, w_out, b_in, b_out):
            h = x[:length] @ w_in + b_in
            y = activate(h, activation) @ w_out + b_out
            return _pad_rows(y, rows), _pad_rows(h, rows)
        return run

    y, h = jax.lax.switch(index, [branch(m) for m in lengths], pack(x), w_in, w_out, b_in, b_out)
    return unpack(y), h


def _one_expert_bwd(x, w_in, w_out, filled, h, dy, activation, grads_in_scan):
    """-> dx, expert e's weight gradients and its bias gradients (the filled rows' dh and dy
    summed); with grads_in_scan=False, in place of the weight gradients the inputs of their
    matmuls in slot order: dh [S*C, in_width] and a [S*C, d_ff]."""
    rows = x.shape[0]
    pack, unpack, index, lengths = _on_filled_rows(filled, rows)

    def branch(length):
        def run(x, w_in, w_out, h, dy):
            x, h, dy = x[:length], h[:length], dy[:length]
            a, act_vjp = jax.vjp(lambda h: activate(h, activation), h)
            dh, = act_vjp(dy @ w_out.T)
            dx = _pad_rows(dh @ w_in.T, rows)
            biases = dh.sum(0), dy.sum(0)
            if grads_in_scan:
                return dx, x.T @ dh, a.T @ dy, *biases
            return dx, _pad_rows(dh, rows), _pad_rows(a, rows), *biases
        return run

    dx, g_in, g_out, db_in, db_out = jax.lax.switch(index, [branch(m) for m in lengths],
                                                    pack(x), w_in, w_out, h, pack(dy))
    if grads_in_scan:
        return unpack(dx), g_in, g_out, db_in, db_out
    return unpack(dx), unpack(g_in), unpack(g_out), db_in, db_out


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def _experts(x, w_in, w_out, b_in, b_out, filled, activation):
    return _experts_fwd(x, w_in, w_out, b_in, b_out, filled, activation)[0]


def _experts_fwd(x, w_in, w_out, b_in, b_out, filled, activation):
    y, h = _scan_fwd(x, w_in, w_out, b_in, b_out, filled, activation)
    return y, (x, w_in, w_out, filled, h)


def _scan_fwd(x, w_in, w_out, b_in, b_out, filled, activation):
    def body(_, args):
        return None, _one_expert_fwd(*args, activation)

    _, (y, h) = jax.lax.scan(body, None, (x, w_in, w_out, b_in, b_out, filled))
    return y, h


def _experts_bwd(activation, res, dy):
    dx, g_in, g_out, db_in, db_out = _scan_bwd(*res, dy, activation)
    return dx, g_in, g_out, db_in, db_out, None


def _scan_bwd(x, w_in, w_out, filled, h, dy, activation):
    # A weight gradient made inside the scan is written to a temporary, then copied into the
    # zero-filled stacked output: three passes over each expert's d x d_ff weights. Made
    # after the scan as one batched matmul, it is written once, but the scan must store dh
    # and a (rows x d_ff per expert) and the matmul runs the empty slots too. With fewer
    # rows than d_model the second costs less (`bench layer`, E = 256: experts 20% faster).
    grads_in_scan = x.shape[1] >= x.shape[2]

    def body(_, args):
        return None, _one_expert_bwd(*args, activation, grads_in_scan)

    _, (dx, g_in, g_out, db_in, db_out) = jax.lax.scan(body, None,
                                                       (x, w_in, w_out, filled, h, dy))
    if grads_in_scan:
        return dx, g_in, g_out, db_in, db_out
    return (dx, jnp.einsum("erd,erf->edf", x, g_in), jnp.einsum("erf,erd->efd", g_out, dy),
            db_in, db_out)


_experts.defvjp(_experts_fwd, _experts_bwd)
