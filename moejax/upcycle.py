"""Sparse upcycling (Komatsuzaki et al. 2023): start an MoE run from a dense run's checkpoint.

Every expert of an MoE layer starts as a copy of that layer's dense FFN; the router and any
shared experts start fresh; every other weight is copied as is; the optimizer starts fresh.
With gates that sum to 1 (`model.renormalize`) and nothing dropped (`model.dropless`, or a
capacity no token exceeds), the upcycled model computes exactly what the dense one did.
"""

import contextlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from moejax.checkpoint import path_name, shapes
from moejax.config_lib import ConfigError

FRESH = ("router", "router_bias", "shared_in", "shared_out")
KEY = "train.init_from"


def plan(dense: dict, moe: dict) -> dict:
    """dense, moe: {'blocks.0.ffn.w_in': shape}. Returns {name: 'fresh' | 'copy' | 'experts'};
    raises ConfigError naming the first parameter the dense run cannot provide."""
    how = {}
    for name, shape in moe.items():
        last = name.rsplit(".", 1)[-1]
        if last in FRESH:
            how[name] = "fresh"
        elif name not in dense:
            raise ConfigError(f"{KEY}: the dense checkpoint has no {name}; allowed: a run of "
                              "the same model with num_experts=0")
        elif dense[name] == shape:
            how[name] = "copy"
        elif last in ("w_in", "w_out") and shape[1:] == dense[name]:
            how[name] = "experts"
        else:
            raise ConfigError(f"{KEY}: {name} is {dense[name]} in the dense checkpoint, {shape} "
                              "here; allowed: a dense run of the same shapes whose FFN is as "
                              "wide as one expert (dense d_ff x top_k = MoE d_ff)")
    return how


def checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
    path = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(path):  # else orbax would create it in someone else's run
        raise ConfigError(f"{KEY}={workdir!r}: no checkpoints/ in it; allowed: the --workdir "
                          "of a finished run")
    # The PyTree handler, not the Standard one: load() restores only part of the state.
    mgr = ocp.CheckpointManager(path, item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    if mgr.latest_step() is None:
        mgr.close()
        raise ConfigError(f"{KEY}={workdir!r}: no checkpoint in {path}; allowed: the --workdir "
                          "of a dense run that saved one")
    return mgr


def check(workdir: str, moe_params) -> dict:
    """Shapes only (checkpoint metadata), so a mismatch is reported before anything compiles."""
    with contextlib.closing(checkpoint_manager(workdir)) as mgr:
        saved = mgr.item_metadata(mgr.latest_step())["state"]["params"]
    return plan(shapes(saved), shapes(moe_params))


def load(workdir: str, moe_params, mesh):
    """moe_params (live, sharded) with every weight but the fresh ones taken from the dense run's
    newest checkpoint. Returns (params, the dense step).

    Only the dense weights the MoE takes are read, not the optimizer state (twice their size);
    a copied weight is read straight into its MoE sharding, an FFN weight that becomes the
    experts is read whole once and broadcast into the expert-sharded array.
    """
    live = {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(moe_params)[0]}
    replicated = NamedSharding(mesh, PartitionSpec())
    with contextlib.closing(checkpoint_manager(workdir)) as mgr:
        step = mgr.latest_step()
        saved = mgr.item_metadata(step)["state"]["params"]
        how = plan(shapes(saved), shapes(moe_params))

        def sharding(path):
            name = path_name(path)
            return live[name].sharding if how.get(name) == "copy" else replicated

        target = {"params": jax.tree_util.tree_map_with_path(
            lambda p, m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding(p)), saved)}
        dense = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))
    dense = {path_name(p): x for p, x in
             jax.tree_util.tree_flatten_with_path(dense.state["params"])[0]}

    def fill(path, like):
        name = path_name(path)
        if how[name] == "fresh":
            return like
        if how[name] == "copy":
            return dense[name].astype(like.dtype)
        w = np.asarray(jax.device_get(dense[name]), like.dtype)  # one copy per expert
        return jax.device_put(np.broadcast_to(w, like.shape), like.sharding)

    return jax.tree_util.tree_map_with_path(fill, moe_params), step
