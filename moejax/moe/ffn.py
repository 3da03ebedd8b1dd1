"""The feed-forward math the dense FFN and every expert kernel share: activations, the layout
of the weights, and the one shard_map typing helper the kernels need.

Parameters: w_in [..., d, g, f] with g = 2 for gated activations (gate, then linear) and 1
otherwise, w_out [..., f, d]; leading axes are experts. Keeping g apart lets `tensor` split f
without splitting gate from linear. The expert kernels take w_in flattened to [E, d, g*f]
(`flat_in`: gate half first), as one wide matmul runs faster than two narrow ones.
"""

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from moejax.moe import quant

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
    """Columns of a flattened w_in: 2 * d_ff for gated activations."""
    return 2 * d_ff if is_gated(activation) else d_ff


def in_shape(d_model: int, d_ff: int, activation: str) -> tuple[int, int, int]:
    """Shape of one FFN's w_in: [d, g, f]; its logical dims are IN_NAMES."""
    return d_model, 2 if is_gated(activation) else 1, d_ff


IN_NAMES = ("embed", None, "mlp")
OUT_NAMES = ("mlp", "embed")


def flat_in(w_in: jax.Array) -> jax.Array:
    """[..., d, g, f] -> [..., d, g*f], gate columns first."""
    return w_in.reshape(*w_in.shape[:-2], -1)


def activate(h: jax.Array, activation: str) -> jax.Array:
    """The activation of a flattened w_in's output [..., g*f] -> [..., f]."""
    act, gated = ACTIVATIONS[activation]
    if gated:
        gate, h = jnp.split(h, 2, axis=-1)
        return act(gate) * h
    return act(h)


def ffn(x: jax.Array, w_in: jax.Array, w_out: jax.Array, activation: str,
        qtype=None) -> jax.Array:
    """x: [..., T, d], w_in: [..., d, g, f], w_out: [..., f, d] -> [..., T, d]."""
    act, gated = ACTIVATIONS[activation]

    def project(g):  # one matmul per half: XLA:CPU runs a [d, 2, f] contraction slower
        return checkpoint_name(quant.einsum("...td,...df->...tf", x, w_in[..., g, :], qtype),
                               "ffn_in")

    h = act(project(0)) * project(1) if gated else act(project(0))
    return quant.einsum("...tf,...fd->...td", h, w_out, qtype)


def varying(a) -> frozenset:
    """The mesh axes `a` varies over inside shard_map (empty outside)."""
    return jax.typeof(a).manual_axis_type.varying


def same_varying_axes(*arrays):
    """The arrays, each marked varying over every mesh axis any of them varies over."""
    axes = frozenset().union(*map(varying, arrays))
    return [jax.lax.pcast(a, tuple(sorted(axes - varying(a))), to="varying") for a in arrays]
