"""Dropless experts: every assignment is computed, in rows sorted by expert that one grouped
matmul runs (`experts.grouped_ffn`). Three ways to get the rows to their experts:

sorted_ffn   all experts on this device.
ragged_ffn   experts split over the `expert` axis; each row travels to its expert's device
             and back by `lax.ragged_all_to_all`, which moves only the rows that exist.
             Each sender places its rows so that every receiver finds them grouped by local
             expert, and within an expert by source device, and the way back is the same
             exchange reversed; for that every device needs the whole [devices, E] table of
             row counts, one small all_gather of ints.
ring_ffn     experts split too; every device all-gathers the tokens of its `expert` peers,
             runs the assignments to its own experts and reduce-scatters the outputs back.
             It moves `expert` times the tokens but has no ragged collective, which some GPU
             stacks run poorly, and XLA:CPU, which lacks the op, runs it in place of
             ragged_ffn (tests/test_dropless.py runs ragged_ffn on CPU with a stand-in).
"""

import jax
import jax.numpy as jnp

from moejax.moe.dispatch import combine, dispatch, sorted_slots
from moejax.moe.experts import grouped_ffn
from moejax.moe.ffn import same_varying_axes


def _experts_ffn(rows, experts, group_sizes, activation, qtype):
    """experts.grouped_ffn with the experts dict's weights and biases (if any)."""
    return grouped_ffn(rows, experts["w_in"], experts["w_out"], group_sizes, activation, qtype,
                       experts.get("in_bias"), experts.get("out_bias"))


def sorted_ffn(x, gates, expert_ids, experts, activation, qtype=None):
    """x: [N, d], gates and expert_ids: [N, k] -> [N, d], all experts here. experts: w_in,
    w_out and optionally in_bias, out_bias (moe/layer.py). qtype: the matmuls' quantization
    (moejax/moe/quant.py), None = float, as in the two below."""
    slot, source, sizes = sorted_slots(expert_ids, experts["w_in"].shape[0])
    ys = _experts_ffn(dispatch(x, slot, source), experts, sizes, activation, qtype)
    return combine(ys, gates, slot, source)


def ring_ffn(x, gates, expert_ids, experts, activation, expert_axis, qtype=None):
    """As ragged_ffn, by all-gather and reduce-scatter over `expert_axis`.

    Assignments to other devices' experts are sorted last, into a group without weights
    that the grouped matmul leaves zero, and given no slot and no gate: they add nothing
    and get no gradient here; their own device computes them.
    """
    local = experts["w_in"].shape[0]
    x, gates, expert_ids = (jax.lax.all_gather(a, expert_axis, axis=0, tiled=True)
                            for a in (x, gates, expert_ids))
    ids = expert_ids - jax.lax.axis_index(expert_axis) * local
    mine = (ids >= 0) & (ids < local)
    slot, source, sizes = sorted_slots(jnp.where(mine, ids, local), local + 1)
    slot = jnp.where(mine, slot, slot.size)
    ys = _experts_ffn(dispatch(x, slot, source), experts, sizes[:local], activation, qtype)
    y = combine(ys, jnp.where(mine, gates, 0), slot, source)
    return jax.lax.psum_scatter(y, expert_axis, scatter_dimension=0, tiled=True)


def _exclusive_cumsum(a, axis):
    return jnp.cumsum(a, axis=axis) - a


def ragged_ffn(x, gates, expert_ids, experts, activation, expert_axis, qtype=None, *,
               ragged_all_to_all=jax.lax.ragged_all_to_all):
    """x: [N, d] this device's tokens; gates, expert_ids: [N, k] over all E experts; experts:
    this device's E_local experts. Returns [N, d]; nothing is dropped.

    The receive buffer is static: [devices x N x k, d] rows, what one device gets if every
    assignment on its expert-axis peers picks its experts.
    """
    n, k = expert_ids.shape
    devices = jax.lax.axis_size(expert_axis)
    me = jax.lax.axis_index(expert_axis)
    local = experts["w_in"].shape[0]
    slot, source, counts = sorted_slots(expert_ids, devices * local)
    rows = dispatch(x, slot, source)  # [N*k, d] sorted by expert

    table = jax.lax.all_gather(counts, expert_axis)  # [source device, expert]: rows sent
    sorted_start = _exclusive_cumsum(table, 1)  # where each device's rows for g begin
    to_me = jax.lax.dynamic_slice_in_dim(table, me * local, local, axis=1)  # [source, local]
    group_sizes = to_me.sum(0)
    # Where expert g's group starts on the device that owns it, then where this device's
    # rows for g start inside that group.
    received = table.sum(0).reshape(devices, local)
    group_start = _exclusive_cumsum(received, 1).reshape(-1)
    before_me = _exclusive_cumsum(table, 0)[me]
    # The op's result has its output buffer's mesh-axis type: make each buffer vary like
    # the rows it receives (with `tensor` > 1 the expert outputs vary over it too).
    rows, buffer = same_varying_axes(rows, jnp.zeros((devices * n * k, x.shape[1]), x.dtype))
    # Slice g goes to device g // local; this device receives slices (source, local expert).
    arrived = ragged_all_to_all(rows, buffer, sorted_start[me], counts,
                                group_start + before_me, to_me.reshape(-1),
                                axis_name=expert_axis)

    ys = _experts_ffn(arrived, experts, group_sizes, activation, qtype)

    # Back: slice (source s, local e) of ys starts at e's group plus the rows of sources
    # before s, and lands where s sorted expert me * local + e.
    start_here = (_exclusive_cumsum(group_sizes, 0)[None, :] + _exclusive_cumsum(to_me, 0))
    start_there = jax.lax.dynamic_slice_in_dim(sorted_start, me * local, local, axis=1)
    ys, into = same_varying_axes(ys, jnp.zeros_like(rows))
    back = ragged_all_to_all(ys, into, start_here.reshape(-1),
                             to_me.reshape(-1), start_there.reshape(-1), counts,
                             axis_name=expert_axis)
    return combine(back, gates, slot, source)
