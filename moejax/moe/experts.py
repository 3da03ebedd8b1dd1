"""The one place that picks the expert kernels per backend: capacity buffers (equal groups)
and grouped matmuls (rows sorted by expert, ragged groups).

`qtype` (moejax/moe/quant.py; None = float) quantizes a block's matmuls for training. Neither
megablox nor cpu.py's scan has a quantized form, so a quantized run takes Qwix's ragged dot
(dropless) or batched dot_general (capacity) on every backend: one switch, `qtype`.

Biases (model.moe_bias, gpt-oss; the layer's in_bias and out_bias): b_in [E, g*f] on the
input projection, b_out [E, d] on the output, each expert its own, never quantized. Added to
the rows an expert runs: the empty slots of a capacity buffer may hold bias-only outputs, but
combine reads only the slots of kept assignments (and passes the others no gradient); the
dropless rows past the last group get none.
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox.ops import backend as megablox
from jax.sharding import PartitionSpec as P

from moejax.moe import cpu, quant
from moejax.moe.dispatch import take_rows
from moejax.moe.ffn import activate, same_varying_axes, varying


def capacity_experts(x: jax.Array, w_in: jax.Array, w_out: jax.Array, activation,
                     filled: jax.Array | None = None, segments: int = 1,
                     qtype=None, b_in: jax.Array | None = None,
                     b_out: jax.Array | None = None) -> jax.Array:
    """x: [E, S * C, d] capacity buffers, S segments of C slots per expert -> [E, S * C, d];
    b_in [E, g*f], b_out [E, d]: the experts' biases, or None.

    GPU and TPU: one batched matmul per projection, XLA's own kernel for equal groups. CPU:
    `cpu.experts_ffn`, which computes only the filled rows (filled: [E, S] tokens at the
    front of each segment, None = find them from the zero padding). Quantized: the batched
    matmul everywhere (an empty slot is a zero row: its scale is 1 and its output zero).
    """
    if qtype is not None:
        return batched_experts(x, w_in, w_out, activation, qtype, b_in, b_out)
    # cpu.py's scan is traced for every platform but lowered only for the CPU.
    return jax.lax.platform_dependent(
        cpu=lambda: cpu.experts_ffn(x, w_in, w_out, activation, filled, segments, b_in, b_out),
        default=lambda: batched_experts(x, w_in, w_out, activation, None, b_in, b_out))


def batched_experts(x, w_in, w_out, activation, qtype=None, b_in=None, b_out=None):
    """[E, R, d] -> [E, R, d], every row of every expert's buffer."""
    if qtype is not None:  # Qwix's custom VJPs want the weights as varying as the tokens
        x, w_in, w_out = same_varying_axes(x, w_in, w_out)
    h = quant.einsum("erd,edf->erf", x, w_in, qtype)
    if b_in is not None:
        h = h + b_in[:, None]
    y = quant.einsum("erf,efd->erd", activate(h, activation), w_out, qtype)
    return y if b_out is None else y + b_out[:, None]


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
                   qtype=None) -> jax.Array:
    """x: [M, k] rows sorted by group, w: [G, k, n], group_sizes: [G] summing to at most M
    -> [M, n]: group g's rows times w[g]; rows past the last group are zero.

    TPU: the megablox grouped matmul (Pallas, shipped in jax). Elsewhere `lax.ragged_dot`,
    which XLA:GPU lowers to grouped GEMMs and XLA:CPU to a masked dot over all G groups.
    Quantized: `quant.ragged_dot` (Qwix, a `ragged_dot` of the quantized operands) everywhere.
    """
    if qtype is not None:
        x, w = same_varying_axes(x, w)
        return quant.ragged_dot(x, w, group_sizes, qtype)
    return jax.lax.platform_dependent(x, w, group_sizes, tpu=megablox_gmm,
                                      default=jax.lax.ragged_dot)


def megablox_gmm(x, w, group_sizes, *, interpret=False):
    """`grouped_matmul` by the megablox kernels: gmm forward, gmm and tgmm backward.

    The kernels work in tiles of rows and leave rows outside every group unwritten: the rows
    are padded to whole tiles and put in one more group, which has no weights, so that gmm
    zeroes its rows (it does for groups past the weights it is given), forward and backward.
    """
    m = x.shape[0]
    padded = -(-m // _row_tile(m)) * _row_tile(m)
    rest = jnp.array([padded], jnp.int32) - group_sizes.sum(dtype=jnp.int32)
    sizes = jnp.concatenate([group_sizes.astype(jnp.int32), rest])
    x, w, sizes = same_varying_axes(jnp.pad(x, ((0, padded - m), (0, 0))), w.astype(x.dtype),
                                    sizes)
    return _gmm(x, w, sizes, interpret)[:m]


def _row_tile(m):
    return min(512, -(-m // 128) * 128)


def _tiles(m, k, n):
    """(rows, contraction, output) tile of each kernel call: multiples of 128 or whole dims,
    as Mosaic wants; the gmm calls of the backward pass swap k and n."""
    return _row_tile(m), min(k, 1024), min(n, 1024)


# megablox declares its outputs without the mesh axes they vary over, which shard_map's type
# check (check_vma) rejects: the kernels run in a shard_map of no axes with the check off,
# and their results get the axes of the inputs (made equal above, so the cotangents have
# them too: autodiff, outside, sums the weight gradients over the token axes).
@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(x, w, sizes, interpret):
    return _gmm_fwd(x, w, sizes, interpret)[0]


def _unchecked(f, *args):
    """f(*args) in a shard_map of no further axes with the type check off; outside any
    shard_map, a plain call."""
    if not varying(args[0]):
        return f(*args)
    return jax.shard_map(f, in_specs=P(), out_specs=P(), axis_names=frozenset(),
                         check_vma=False)(*args)


def _gmm_fwd(x, w, sizes, interpret):
    y = _unchecked(lambda x, w, sizes: megablox.gmm(x, w, sizes, x.dtype, _tiles,
                                                     interpret=interpret), x, w, sizes)
    return _varying_like(y, x), (x, w, sizes)


def _gmm_bwd(interpret, res, dy):
    def grads(x, w, sizes, dy):  # as megablox's own VJP (megablox/ops.py)
        dx = megablox.gmm(dy, w, sizes, x.dtype, _tiles, transpose_rhs=True,
                          interpret=interpret)
        dw = megablox.tgmm(x.T, dy, sizes, w.dtype, _tiles, None, w.shape[0],
                           interpret=interpret)
        return dx, dw

    x, w, sizes = res
    dx, dw = _unchecked(grads, x, w, sizes, dy)
    return _varying_like(dx, x), _varying_like(dw, x), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _varying_like(a, like):
    missing = tuple(sorted(varying(like) - varying(a)))
    return jax.lax.pcast(a, missing, to="varying") if missing else a


def grouped_ffn(x: jax.Array, w_in: jax.Array, w_out: jax.Array, group_sizes: jax.Array,
                activation, qtype=None, b_in: jax.Array | None = None,
                b_out: jax.Array | None = None) -> jax.Array:
    """x: [N, d] rows sorted by expert, group_sizes: [E] rows per expert -> [N, d]: no
    padding, nothing dropped; rows past the last group give zero. b_in [E, g*f], b_out
    [E, d]: the experts' biases (both or neither), or None."""
    h = grouped_matmul(x, w_in, group_sizes, qtype)
    if b_in is None:
        return grouped_matmul(activate(h, activation), w_out, group_sizes, qtype)
    group = row_groups(group_sizes, x.shape[0])
    y = grouped_matmul(activate(h + take_rows(b_in, group), activation), w_out, group_sizes,
                       qtype)
    return y + take_rows(b_out, group)


def row_groups(group_sizes: jax.Array, rows: int) -> jax.Array:
    """[rows] the group of each row of a buffer sorted by group; G for the rows past the
    last group (take_rows gives them zeros)."""
    ends = jnp.cumsum(group_sizes)
    return jnp.searchsorted(ends, jnp.arange(rows, dtype=ends.dtype), side="right")
