"""Context parallelism: the sequence split over mesh axis `context`, causal work balanced.

Each of the C devices of the context axis holds one chunk of S / C positions of q, k, v and the
segments, in natural order. Causal attention asks the last chunk for about 2C-1 times the work of
the first, so the queries are dealt out again: the sequence is cut into 2C halves of S / 2C and
device i computes halves i and 2C-1-i, an early and a late one, whose key prefixes together
are (2C+1) S / 2C long on every device. Two ppermutes carry the query halves (and their
segments) there, two carry the outputs back; keys, values and segments are all-gathered over
`context` in natural order. Autodiff transposes them: the backward ppermutes the query and
output cotangents the other way and reduce-scatters the key and value gradients.

Per device and attention layer, forward: the all-gathers receive (C-1)/C of k and v,
2 x [b, S, kv, hd], and [b, S] segments; the ppermutes send q and receive the output,
[b, S/C, h, hd] each (a half whose owner is its holder, as half 0 on device 0, stays). Backward:
the same bytes again, as reduce-scatters of dk, dv and ppermutes of dq and the output's
cotangent.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from moejax import parallel

AXIS = parallel.SEQ_AXIS


def size(mesh: Mesh | None) -> int:
    """Devices the sequence is split over (1: no context parallelism)."""
    return 1 if mesh is None else dict(mesh.shape).get(AXIS, 1)


def _owner(half: int, c: int) -> int:
    """The device that computes half `half` of the 2C."""
    return half if half < c else 2 * c - 1 - half


def query_index(seq: int, c: int) -> np.ndarray:
    """[S] int32: the position in the sequence of each query row in the balanced order, the
    rows of device i being halves i and 2C-1-i (device-major)."""
    half = seq // (2 * c)
    order = [h for i in range(c) for h in (i, 2 * c - 1 - i)]
    return np.concatenate([np.arange(h * half, (h + 1) * half) for h in order]).astype(np.int32)


def balance(x: jax.Array, c: int) -> jax.Array:
    """Inside shard_map: this device's natural chunk [b, S/C, ...] (halves 2d, 2d+1) -> the
    rows it computes, [b, S/C, ...] (halves d, 2C-1-d). Even halves travel by one ppermute,
    odd halves by the other: each is a permutation of the devices."""
    first, second = jnp.split(x, 2, axis=1)
    even = jax.lax.ppermute(first, AXIS, [(d, _owner(2 * d, c)) for d in range(c)])
    odd = jax.lax.ppermute(second, AXIS, [(d, _owner(2 * d + 1, c)) for d in range(c)])
    # Device d's early half d is even when d is.
    d_is_even = jax.lax.axis_index(AXIS) % 2 == 0
    return jnp.where(d_is_even, jnp.concatenate([even, odd], 1),
                     jnp.concatenate([odd, even], 1))


def unbalance(y: jax.Array, c: int) -> jax.Array:
    """The inverse of `balance`: the computed rows back to this device's natural chunk."""
    early, late = jnp.split(y, 2, axis=1)
    d_is_even = jax.lax.axis_index(AXIS) % 2 == 0
    even, odd = (jnp.where(d_is_even, early, late), jnp.where(d_is_even, late, early))
    first = jax.lax.ppermute(even, AXIS, [(_owner(2 * d, c), d) for d in range(c)])
    second = jax.lax.ppermute(odd, AXIS, [(_owner(2 * d + 1, c), d) for d in range(c)])
    return jnp.concatenate([first, second], 1)


def gather(x: jax.Array) -> jax.Array:
    """Inside shard_map: [b, S/C, ...] -> [b, S, ...], every chunk in natural order."""
    return jax.lax.all_gather(x, AXIS, axis=1, tiled=True)


def repeat_kv(k: jax.Array, v: jax.Array, head_shards: int):
    """Query heads split `head_shards` ways but too few kv heads to split alike: repeat each
    kv head so every device holds the ones its query heads read, and no more."""
    if k.shape[2] % head_shards == 0:
        return k, v
    times = math.lcm(k.shape[2], head_shards) // k.shape[2]
    return jnp.repeat(k, times, axis=2), jnp.repeat(v, times, axis=2)


def specs(q_shape, mesh: Mesh) -> tuple[P, int]:
    """The shard_map spec of q, k, v ([B, S, heads, hd]) and how many ways heads split."""
    spec = parallel.spec(("batch", "seq", "heads", None), q_shape, mesh)
    return spec, math.prod(mesh.shape[a] for a in jax.tree.leaves(spec[2]))


def attend(per_device, q, k, v, segments, mesh: Mesh, kernel=(), kernel_spec=()):
    """Attention with the sequence split over `context`, run per device under shard_map.

    q [B, S, H, hd], k, v [B, S, KV, hd], segments [B, S] or None (natural order, S a multiple
    of 2C). per_device(q [b, S/C, h, hd] balanced, k, v [b, S, kv, hd], q_segments [b, S/C]
    balanced, kv_segments [b, S] (both None without segments), q_index [S/C] (each row's
    position), kernel) -> [b, S/C, h, hd]. `kernel` is a pytree passed in with `kernel_spec`
    (the splash kernel's mask info, split over `context` by query rows)."""
    c, seq = size(mesh), q.shape[1]
    if seq % (2 * c):
        raise ValueError(f"sequence {seq} does not split into 2 x context = {2 * c} equal "
                         "halves (context parallelism balances causal work by halves)")
    spec, head_shards = specs(q.shape, mesh)
    if spec[1] != AXIS:
        raise ValueError(f"sequence {seq} is not split over {AXIS}: spec {spec}")
    k, v = repeat_kv(k, v, head_shards)
    index = jnp.asarray(query_index(seq, c))
    row_spec = P(spec[0], AXIS)

    def body(q, k, v, index, kernel, *segments):
        k, v = gather(k), gather(v)
        q_seg = kv_seg = None
        if segments:
            q_seg, kv_seg = balance(segments[0], c), gather(segments[0])
        y = per_device(balance(q, c), k, v, q_seg, kv_seg, index, kernel)
        return unbalance(y, c)

    args = (q, k, v, index, kernel) + ((segments,) if segments is not None else ())
    in_specs = (spec, spec, spec, P(AXIS), kernel_spec) + ((row_spec,) * len(args[5:]))
    # check_vma=False: the splash kernel's pallas_calls declare no per-axis variance.
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=spec,
                         check_vma=False)(*args)
