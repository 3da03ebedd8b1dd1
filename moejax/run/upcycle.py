"""Sparse upcycling (Komatsuzaki et al. 2023): start an MoE run from a dense run's checkpoint.

Every expert of an MoE layer starts as a copy of that layer's dense FFN; the router and any
shared experts start fresh; every other weight is copied as is; the optimizer starts fresh.
With gates that sum to 1 (`model.renormalize`) and nothing dropped (`model.dispatch=dropless`, or a
capacity no token exceeds), the upcycled model computes exactly what the dense one did.
"""

import contextlib

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax.config_lib import ConfigError
from moejax.run.checkpoint import path_name, restore_params, run_checkpoints, shapes

# The MoE layer's own weights (a dense FFN has none), fresh; attn.out_bias is the dense run's.
FRESH = ("router", "router_bias", "shared_in", "shared_out", "shared_gate",
         "router_logit_bias", "ffn.in_bias", "ffn.out_bias")
KEY = "train.init_from"


def plan(dense: dict, moe: dict) -> dict:
    """dense, moe: {'stacks.0.blocks.0.ffn.w_in': shape}, the leading axis of a stack's
    weights being its layers. Returns {name: 'fresh' | 'copy' | 'experts'}; raises ConfigError
    naming the first parameter the dense run cannot provide, or that only it has. An expert
    weight [L, E, ...] is made from the dense FFN weight [L, ...] of the same name."""
    how = {}
    for name, shape in moe.items():
        last = name.rsplit(".", 1)[-1]
        if last in FRESH or ".".join(name.rsplit(".", 2)[-2:]) in FRESH:
            how[name] = "fresh"
        elif name not in dense:
            raise ConfigError(f"{KEY}: the dense checkpoint has no {name}; allowed: a run of "
                              "the same model with num_experts=0")
        elif dense[name] == shape:
            how[name] = "copy"
        elif last in ("w_in", "w_out") and shape[:1] + shape[2:] == dense[name]:
            how[name] = "experts"
        else:
            raise ConfigError(f"{KEY}: {name} is {dense[name]} in the dense checkpoint, {shape} "
                              "here; allowed: a dense run of the same shapes whose FFN is as "
                              "wide as one expert (dense d_ff x top_k = MoE d_ff)")
    # A weight the MoE lacks (an untied unembedding, say) computes something it would not.
    if extra := sorted(dense.keys() - moe.keys()):
        raise ConfigError(f"{KEY}: the dense checkpoint has {extra[0]}, this model has not; "
                          "allowed: a run of the same model with num_experts=0")
    return how


def check(workdir: str, moe_params) -> dict:
    """Shapes only (checkpoint metadata), so a mismatch is reported before anything compiles."""
    with contextlib.closing(run_checkpoints(workdir, KEY)) as mgr:
        saved = mgr.item_metadata(mgr.latest_step())["state"]["params"]
    return plan(shapes(saved), shapes(moe_params))


def load(workdir: str, moe_params, mesh):
    """moe_params (live, sharded) with every weight but the fresh ones taken from the dense run's
    newest checkpoint. Returns (params, the dense step).

    Only the dense weights the MoE takes are read, not the optimizer state (twice their size),
    each once and straight into a layout of the MoE's: a copied weight into its own, an FFN
    weight that becomes the experts into that of one expert (the MoE's less its expert axis),
    then broadcast over that axis on device: nothing is gathered or goes through the host.
    """
    live = {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(moe_params)[0]}
    with contextlib.closing(run_checkpoints(workdir, KEY)) as mgr:
        step = mgr.latest_step()
        saved = mgr.item_metadata(step)["state"]["params"]
        how = plan(shapes(saved), shapes(moe_params))

        def sharding(path):
            name = path_name(path)
            like = live[name]
            if how[name] == "copy":
                return like.sharding
            spec = (*like.sharding.spec, *(None,) * (like.ndim - len(like.sharding.spec)))
            return NamedSharding(mesh, P(spec[0], *spec[2:]))  # [L, E, ...] less the E axis

        target = jax.tree_util.tree_map_with_path(
            lambda p, m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding(p)), saved)
        dense = restore_params(mgr, step, target)
    dense = {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(dense)[0]}

    def fill(path, like):
        name = path_name(path)
        if how[name] == "fresh":
            return like
        if how[name] == "copy":
            return dense[name].astype(like.dtype)
        # [L, ...] -> [L, E, ...]: every expert of layer l a copy of its dense FFN.
        return jax.jit(lambda w: jnp.broadcast_to(w[:, None], like.shape).astype(like.dtype),
                       out_shardings=like.sharding)(dense[name])

    return jax.tree_util.tree_map_with_path(fill, moe_params), step
