"""Feed-forward blocks shared by the dense FFN and the batched experts.

Weights carry any number of leading batch axes: a dense FFN has w_in [d, f], the experts
have w_in [E, d, f] and take x [E, tokens, d].
"""

import jax
import jax.numpy as jnp

# name -> (activation, gated). Gated variants use two input projections (w_in, w_gate).
ACTIVATIONS = {
    "swiglu": (jax.nn.silu, True),
    "geglu": (jax.nn.gelu, True),
    "gelu": (jax.nn.gelu, False),
    "relu": (jax.nn.relu, False),
}


def is_gated(activation: str) -> bool:
    return ACTIVATIONS[activation][1]


def ffn(x: jax.Array, w_in: jax.Array, w_gate: jax.Array | None, w_out: jax.Array,
        activation: str) -> jax.Array:
    """x: [..., T, d], w_in/w_gate: [..., d, f], w_out: [..., f, d] -> [..., T, d]."""
    act, gated = ACTIVATIONS[activation]
    h = jnp.einsum("...td,...df->...tf", x, w_in)
    h = act(jnp.einsum("...td,...df->...tf", x, w_gate)) * h if gated else act(h)
    return jnp.einsum("...tf,...fd->...td", h, w_out)
