"""Parameter accounting: total vs active parameters and bytes per device.

Total parameters decide memory; active parameters (what one token touches) decide compute.
"""

import math

import jax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from moejax.moe.layer import ExpertParam


def param_counts(model: nnx.Module, top_k: int, num_experts: int) -> dict:
    """{'total', 'active', 'expert'}: a token runs k of E experts in every MoE layer."""
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    expert = sum(x.size for x in jax.tree.leaves(nnx.state(model, ExpertParam)))
    active = total - expert + (expert * top_k // num_experts if num_experts else 0)
    return {"total": total, "active": active, "expert": expert}


def bytes_per_device(model: nnx.Module, mesh: Mesh) -> int:
    """Bytes of parameters each device holds under their `out_sharding` on this mesh."""
    state = nnx.state(model, nnx.Param)
    specs = nnx.get_partition_spec(state)
    leaves = jax.tree.leaves(state)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
    total = 0
    for x, spec in zip(leaves, spec_leaves, strict=True):
        axes = [a for entry in spec if entry is not None
                for a in (entry if isinstance(entry, tuple) else (entry,))]
        total += x.size * x.dtype.itemsize // math.prod(mesh.shape[a] for a in axes)
    return total
