"""Feed-forward blocks shared by the dense FFN and the batched experts.

Weights carry any number of leading batch axes: a dense FFN has w_in [d, f], the experts
have w_in [E, d, f] and take x [E, tokens, d]. Gated activations keep both input projections
in one w_in [..., d, 2f] (gate half first): one wide matmul runs faster than two narrow ones.
"""

import jax
import jax.numpy as jnp

# name -> (activation, gated). Gated: act(x @ w_gate) * (x @ w_lin), w_in = [w_gate | w_lin].
ACTIVATIONS = {
    "swiglu": (jax.nn.silu, True),
    "geglu": (jax.nn.gelu, True),
    "gelu": (jax.nn.gelu, False),
    "relu": (jax.nn.relu, False),
}


def is_gated(activation: str) -> bool:
    return ACTIVATIONS[activation][1]


def in_width(d_ff: int, activation: str) -> int:
    """Columns of w_in: 2 * d_ff for gated activations."""
    return 2 * d_ff if is_gated(activation) else d_ff


# Up to this many experts on a device run as separate 2-D matmuls: XLA:CPU runs a batched
# matmul ~10-25% slower than the same work as 2-D matmuls, but unrolling many small ones
# costs more in per-op overhead than it saves (docs/benchmarks.md).
UNROLL_EXPERTS = 8


def experts_ffn(x: jax.Array, w_in: jax.Array, w_out: jax.Array, activation: str) -> jax.Array:
    """x: [E, T, d], w_in: [E, d, in_width], w_out: [E, d_ff, d] -> [E, T, d]."""
    if x.shape[0] > UNROLL_EXPERTS:
        return ffn(x, w_in, w_out, activation)
    return jnp.stack([ffn(x[e], w_in[e], w_out[e], activation) for e in range(x.shape[0])])


def ffn(x: jax.Array, w_in: jax.Array, w_out: jax.Array, activation: str) -> jax.Array:
    """x: [..., T, d], w_in: [..., d, in_width], w_out: [..., d_ff, d] -> [..., T, d]."""
    act, gated = ACTIVATIONS[activation]
    h = jnp.einsum("...td,...df->...tf", x, w_in)
    if gated:
        gate, h = jnp.split(h, 2, axis=-1)
        h = act(gate) * h
    else:
        h = act(h)
    return jnp.einsum("...tf,...fd->...td", h, w_out)


def grouped_ffn(x: jax.Array, w_in: jax.Array, w_out: jax.Array, group_sizes: jax.Array,
                activation: str) -> jax.Array:
    """x: [N, d] rows sorted by expert, group_sizes: [E] rows per expert -> [N, d].

    A grouped matmul (`lax.ragged_dot`): no padding, nothing dropped. Fast where XLA has a
    grouped-matmul kernel (GPU, TPU); XLA:CPU lowers it to a masked dot over all E experts.
    """
    act, gated = ACTIVATIONS[activation]
    h = jax.lax.ragged_dot(x, w_in, group_sizes)
    if gated:
        gate, h = jnp.split(h, 2, axis=-1)
        h = act(gate) * h
    else:
        h = act(h)
    return jax.lax.ragged_dot(h, w_out, group_sizes)
