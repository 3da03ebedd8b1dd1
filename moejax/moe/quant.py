"""Quantized training (QAT) of the matmuls, by Qwix's quantized-training ops.

`model.quantization` names the forward operands' type: int8, or fp8 (float8_e4m3fn). Both
operands of a matmul are quantized symmetrically with absmax scales, one per row of the
activations and one per output column of the weights, per expert where there are experts
(every axis that is not contracted has its own scale: Qwix's choice for dot_general):
int8 q = round(x / scale) with scale = absmax / 127, fp8 q = e4m3(x / scale) with
scale = absmax / 448. The backward pass is the straight-through one Qwix's qt ops give:
gradients of the matmul of the quantized-then-dequantized operands, kept from the forward
pass; the gradients themselves stay in the compute dtype.

Qwix's ops are called directly rather than through `qwix.quantize_model` and its
QtProvider, which intercepts jnp.einsum / lax.ragged_dot inside NNX modules: it tells weights
from activations by tracing an operand back to an nnx.Param of the calling module, through
unary ops, or else by shape, and the expert weights reach their matmuls through the MoE
shard_map's boundary, an all-gather and a reshape to [E, d, g*f], so neither finds them. It
would also keep unquantized residuals for dot_general but quantized ones for ragged_dot, so
the capacity and dropless paths would differ in their gradients. Called here, both paths
quantize the same way, stated once.
"""

import math
from functools import partial

import jax
import jax.numpy as jnp
import qwix
from qwix._src.core import (
    dot_general_qt as qwix_dot_general_qt,
    ragged_dot_qt as qwix_ragged_dot_qt,
)
from qwix._src.core.einsum_info import EinsumInfo

# `model.quantization` -> the qtype of the forward operands (None: float matmuls).
QTYPES = {"none": None, "int8": jnp.int8, "fp8": jnp.float8_e4m3fn}


def calibration(qtype) -> str:
    """Qwix's calibration method for `qtype`.

    Qwix maps an integer absmax to the bound plus a half (int8 127.5, int4 7.5), exactly a
    rounding tie: -127.5 rounds to -128 and +127.5 saturates at 127, and which side a row's
    largest element lands on then turns on the last bit of x / scale, which XLA computes
    differently in differently fused programs (one mesh layout against another). Scaling
    the absmax by 127.5 / 127 (7.5 / 7) maps it to 127 (7), far from any tie: symmetric
    [-127, 127] ([-7, 7]), the same on every layout.
    """
    bound = {jnp.int8: 127, jnp.int4: 7}.get(qtype)
    return f"absmax,{(bound + 0.5) / bound}" if bound else "absmax"


def backend_note(name: str, device) -> str | None:
    """One line where `device` has no matmul of `model.quantization`'s type, else None. XLA
    then converts the quantized operands back and multiplies in float32: the numbers of the
    quantized matmul (an e4m3 product is exact in float32), none of its speed."""
    if name != "fp8":
        return None
    capability = getattr(device, "compute_capability", None)
    if device.platform == "cpu":
        return ("model.quantization=fp8: XLA:CPU has no float8 matmul; it runs the "
                "float8_e4m3fn operands upcast to float32 (fp8's numbers, not its speed)")
    if device.platform == "gpu" and capability and float(capability) < 8.9:
        return (f"model.quantization=fp8: this GPU (compute capability {capability}) has no "
                "float8 matmul, which needs 8.9+ (Ada, Hopper); XLA upcasts the operands")
    return None


def einsum(spec: str, x: jax.Array, w: jax.Array, qtype=None) -> jax.Array:
    """jnp.einsum(spec, x, w), both operands quantized to `qtype` when one is given
    (`qwix`'s dot_general_qt). x is the activation, w the weight."""
    if qtype is None:
        return jnp.einsum(spec, x, w)
    info = EinsumInfo.parse(spec, ndims=(x.ndim, w.ndim))
    config = qwix_dot_general_qt.DotGeneralQtConfig(
        lhs_qtype=qtype, rhs_qtype=qtype, lhs_calibration_method=calibration(qtype),
        rhs_calibration_method=calibration(qtype))
    y = qwix_dot_general_qt.dot_general_qt(x, w, info.dimension_numbers, config)
    return y if info.output_perm is None else y.transpose(info.output_perm)


def ragged_dot(x: jax.Array, w: jax.Array, group_sizes: jax.Array, qtype) -> jax.Array:
    """lax.ragged_dot(x [M, k], w [G, k, n], group_sizes [G]) with both operands quantized
    to `qtype`: x per row, w per group and output column."""
    return _ragged_dot(x, w, group_sizes, qtype)


# Qwix's ragged_dot_qt gives w one scale per output column shared by all groups; with the
# experts split over devices each device would then scale by its own experts' largest
# weights, and the numbers would depend on the mesh. Here w is quantized per group (expert)
# too, as dot_general_qt does for the capacity path's batched matmul; the matmul of the
# quantized operands and the backward pass are Qwix's own (ragged_dot, ragged_dot_qt_bwd,
# which handles per-group scales when, as here, the gradients are not quantized).
@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ragged_dot(x, w, group_sizes, qtype):
    return _ragged_dot_fwd(x, w, group_sizes, qtype)[0]


def _ragged_dot_fwd(x, w, group_sizes, qtype):
    qx = qwix.quantize(x, qtype, channelwise_axes=(0,), calibration_method=calibration(qtype))
    qw = qwix.quantize(w, qtype, channelwise_axes=(0, 2), calibration_method=calibration(qtype))
    return qwix.ragged_dot(qx, qw, group_sizes), (qx, qw, group_sizes)


def _ragged_dot_bwd(qtype, residuals, g):
    config = qwix_ragged_dot_qt.RaggedDotQtConfig(lhs_qtype=qtype, rhs_qtype=qtype)
    return qwix_ragged_dot_qt.ragged_dot_qt_bwd(config, None, None, None, residuals, g)


_ragged_dot.defvjp(_ragged_dot_fwd, _ragged_dot_bwd)


# Weight-only quantization for inference (generate, convert to-hf): the routed experts'
# weights held as int8 or int4 with float32 scales, dequantized where they are used. int8 has
# one scale per output channel; int4 one per INT4_GROUP consecutive inputs of a channel, since
# a 15-level grid over a whole channel loses its small weights.
WEIGHT_ONLY = {"int8": jnp.int8, "int4": jnp.int4}
SCALE_DTYPE = jnp.float32
INT4_GROUP = 128


def weight_group(dim: int, name: str) -> int:
    """Inputs that share a scale: the whole channel (int8), or INT4_GROUP of them, fewer
    where that does not divide the input dim (the largest divisor of it that INT4_GROUP has)."""
    return dim if name == "int8" else math.gcd(dim, INT4_GROUP)


def quantize_weight(w: jax.Array, name: str, axis: int) -> qwix.QArray:
    """w's weight-only quantization (Qwix's absmax calibration, symmetric) along its input
    dim `axis`: every other dim channelwise, the input dim in weight_group's tiles."""
    axis %= w.ndim
    other = tuple(a for a in range(w.ndim) if a != axis)
    qtype = WEIGHT_ONLY[name]
    tiles = {axis: weight_group(w.shape[axis], name)} if name == "int4" else None
    return qwix.quantize(w.astype(jnp.float32), qtype, channelwise_axes=other, tiled_axes=tiles,
                         calibration_method=calibration(qtype), scale_dtype=SCALE_DTYPE)
