"""The feed-forward math the dense FFN and every expert kernel share: activations, the layout
of the weights, and the one shard_map typing helper the kernels need.

Parameters: w_in [..., d, g, f] with g = 2 for gated activations (gate, then linear) and 1
otherwise, w_out [..., f, d]; leading axes are experts. Keeping g apart lets `tensor` split f
without splitting gate from linear. The expert kernels take w_in flattened to [E, d, g*f]
(`flat_in`: gate half first), as one wide matmul runs faster than two narrow ones.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from moejax.moe import quant

SWIGLU_ALPHA = 1.702  # gpt-oss: sigmoid(1.702 x) is the sigmoid approximation of gelu
SWIGLU_LIMIT = 7.0  # model.swiglu_limit's default (gpt-oss)


def clamped_swiglu(gate: jax.Array, lin: jax.Array, limit: float = SWIGLU_LIMIT) -> jax.Array:
    """gpt-oss's gated unit: the gate capped above at `limit`, the linear half clipped to
    [-limit, limit] and shifted by 1, gate * sigmoid(1.702 gate) in place of silu."""
    gate = jnp.minimum(gate, limit)
    lin = jnp.clip(lin, -limit, limit)
    return (lin + 1) * gate * jax.nn.sigmoid(SWIGLU_ALPHA * gate)


# name -> (activation, gated). Gated: act(x @ w_gate, x @ w_lin), w_in = [w_gate | w_lin].
ACTIVATIONS = {
    "swiglu": (lambda gate, lin: jax.nn.silu(gate) * lin, True),
    "geglu": (lambda gate, lin: jax.nn.gelu(gate) * lin, True),
    "clamped_swiglu": (clamped_swiglu, True),
    "gelu": (jax.nn.gelu, False),
    "relu": (jax.nn.relu, False),
}
# Those whose zero input row gives a zero output and passes back no gradient, so that a
# zero row can stand for an empty capacity slot (cpu.trailing_filled). Not plain gelu
# (gelu'(0) = 0.5) nor clamped_swiglu (its linear half's + 1).
ZERO_AT_ZERO = ("swiglu", "geglu", "relu")


@dataclasses.dataclass(frozen=True)
class Activation:
    """An activation with its parameters; the expert kernels and ffn take one or a bare name,
    which stands for the defaults."""

    name: str
    limit: float = SWIGLU_LIMIT  # clamped_swiglu only

    def __call__(self, *halves: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.name][0]
        return act(*halves, limit=self.limit) if self.name == "clamped_swiglu" else act(*halves)


def as_activation(activation: "str | Activation") -> Activation:
    return activation if isinstance(activation, Activation) else Activation(activation)


def activation_of(model_config) -> Activation:
    """model.activation with its parameter: clamped_swiglu's limit (model.swiglu_limit)."""
    return Activation(model_config.activation,
                      float(model_config.get("swiglu_limit", SWIGLU_LIMIT)))


def is_gated(activation: "str | Activation") -> bool:
    return ACTIVATIONS[as_activation(activation).name][1]


def zero_at_zero(activation: "str | Activation") -> bool:
    return as_activation(activation).name in ZERO_AT_ZERO


def in_width(d_ff: int, activation) -> int:
    """Columns of a flattened w_in: 2 * d_ff for gated activations."""
    return 2 * d_ff if is_gated(activation) else d_ff


def in_shape(d_model: int, d_ff: int, activation) -> tuple[int, int, int]:
    """Shape of one FFN's w_in: [d, g, f]; its logical dims are IN_NAMES."""
    return d_model, 2 if is_gated(activation) else 1, d_ff


IN_NAMES = ("embed", None, "mlp")
OUT_NAMES = ("mlp", "embed")


def flat_in(w_in: jax.Array) -> jax.Array:
    """[..., d, g, f] -> [..., d, g*f], gate columns first (an input bias [..., g, f] too)."""
    return w_in.reshape(*w_in.shape[:-2], -1)


def activate(h: jax.Array, activation) -> jax.Array:
    """The activation of a flattened w_in's output [..., g*f] -> [..., f]."""
    activation = as_activation(activation)
    if is_gated(activation):
        return activation(*jnp.split(h, 2, axis=-1))
    return activation(h)


def ffn(x: jax.Array, w_in: jax.Array, w_out: jax.Array, activation,
        qtype=None) -> jax.Array:
    """x: [..., T, d], w_in: [..., d, g, f], w_out: [..., f, d] -> [..., T, d]."""
    activation = as_activation(activation)

    def project(g):  # one matmul per half: XLA:CPU runs a [d, 2, f] contraction slower
        return checkpoint_name(quant.einsum("...td,...df->...tf", x, w_in[..., g, :], qtype),
                               "ffn_in")

    h = activation(project(0), project(1)) if is_gated(activation) else activation(project(0))
    return quant.einsum("...tf,...fd->...td", h, w_out, qtype)


def varying(a) -> frozenset:
    """The mesh axes `a` varies over inside shard_map (empty outside)."""
    return jax.typeof(a).manual_axis_type.varying


def same_varying_axes(*arrays):
    """The arrays, each marked varying over every mesh axis any of them varies over."""
    axes = frozenset().union(*map(varying, arrays))
    return [jax.lax.pcast(a, tuple(sorted(axes - varying(a))), to="varying") for a in arrays]
