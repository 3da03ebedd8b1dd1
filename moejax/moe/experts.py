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
