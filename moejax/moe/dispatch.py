"""Index-based dispatch of one group's tokens into [E * C] expert slots and combine back.

No [tokens, E, C] one-hot tensor is ever built: each assignment owns at most one slot
(`slot = expert * C + position`), each slot knows which assignment fills it, and both
directions are gathers. Their gradients are gathers too (custom VJPs), because the
scatter-add that autodiff would emit for a gather is a slow serial loop on CPU.
"""

import jax
import jax.numpy as jnp


def slots(expert_ids: jax.Array, positions: jax.Array, keep: jax.Array, capacity: int,
          num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Slot of each assignment and the assignment that fills each slot.

    expert_ids, positions, keep: [T, k]. Returns
      slot:   [T, k] int32 in [0, E*C), or E*C for a dropped assignment;
      source: [E*C] int32 flat assignment index t*k + j filling the slot, or T*k if empty.
    """
    num_slots = num_experts * capacity
    slot = jnp.where(keep, expert_ids * capacity + positions, num_slots).astype(jnp.int32)
    source = jnp.full((num_slots,), slot.size, jnp.int32)
    source = source.at[slot.reshape(-1)].set(jnp.arange(slot.size, dtype=jnp.int32), mode="drop")
    return slot, source


def sorted_slots(expert_ids: jax.Array, num_experts: int):
    """Dropless layout: every assignment gets a row of a [T*k, d] buffer sorted by expert.

    expert_ids: [T, k]. Returns slot [T, k] (row of each assignment), source [T*k] (the
    assignment t*k + j in each row) and group_sizes [E] (rows per expert), the same contract
    as `slots`, so `dispatch` and `combine` work unchanged.
    """
    flat = expert_ids.reshape(-1)
    source = jnp.argsort(flat, stable=True).astype(jnp.int32)
    slot = jnp.zeros_like(source).at[source].set(jnp.arange(flat.size, dtype=jnp.int32))
    return slot.reshape(expert_ids.shape), source, jnp.bincount(flat, length=num_experts)


def take_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x[idx] along axis 0, zeros where idx is out of range (dropped / empty)."""
    return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def dispatch(x: jax.Array, slot: jax.Array, source: jax.Array) -> jax.Array:
    """x: [T, d] -> buffer [E*C, d]; empty slots are zero."""
    k = slot.shape[1]
    return take_rows(x, source // k)


def _dispatch_fwd(x, slot, source):
    return dispatch(x, slot, source), (slot, source)


def _dispatch_bwd(res, d_buffer):
    slot, source = res
    return take_rows(d_buffer, slot).sum(axis=1), None, None


dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def combine(buffer: jax.Array, gates: jax.Array, slot: jax.Array, source: jax.Array) -> jax.Array:
    """buffer: [E*C, d] expert outputs, gates: [T, k] -> y: [T, d] = sum_j gate_j * buffer[slot_j].

    A dropped assignment contributes zero, so the residual stream alone carries that token.
    """
    picked = take_rows(buffer, slot)  # [T, k, d]
    return jnp.einsum("tkd,tk->td", picked, gates.astype(buffer.dtype))


def _combine_fwd(buffer, gates, slot, source):
    return combine(buffer, gates, slot, source), (buffer, gates, slot, source)


def _combine_bwd(res, dy):
    buffer, gates, slot, source = res
    k = slot.shape[1]
    gate_of_slot = take_rows(gates.reshape(-1), source).astype(dy.dtype)  # [E*C], 0 if empty
    d_buffer = take_rows(dy, source // k) * gate_of_slot[:, None]
    d_gates = jnp.einsum("tkd,td->tk", take_rows(buffer, slot), dy).astype(gates.dtype)
    return d_buffer, _summed_like(d_gates, gates), None, None


def _summed_like(ct, primal):
    """Inside shard_map a cotangent can vary over mesh axes its primal does not: with experts
    split over `tensor`, each tensor rank combines partial expert outputs with the same gates.
    The gradient of such an input is the sum over those axes."""
    def varying(a):
        return jax.typeof(a).manual_axis_type.varying

    extra = tuple(sorted(varying(ct) - varying(primal)))
    return jax.lax.psum(ct, extra) if extra else ct


combine.defvjp(_combine_fwd, _combine_bwd)
