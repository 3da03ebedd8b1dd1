"""Parameter accounting: total vs active parameters and bytes per device.

Total parameters decide memory; active parameters (what one token touches) decide compute.
"""

import math

import jax
from flax import nnx

from moejax.moe.layer import ExpertParam


def param_counts(model: nnx.Module, top_k: int, num_experts: int) -> dict:
    """{'total', 'active', 'expert'}: a token runs k of E experts in every MoE layer."""
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    expert = sum(x.size for x in jax.tree.leaves(nnx.state(model, ExpertParam)))
    active = total - expert + (expert * top_k // num_experts if num_experts else 0)
    return {"total": total, "active": active, "expert": expert}


def bytes_per_device(tree) -> int:
    """Bytes of `tree` on one device: its first local shard of each live array, or the shard
    shape of each abstract one (jax.ShapeDtypeStruct with a sharding). Shards are even."""
    def one(x):
        if isinstance(x, jax.Array):
            return x.addressable_shards[0].data.nbytes
        return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    return sum(one(x) for x in jax.tree.leaves(tree))
