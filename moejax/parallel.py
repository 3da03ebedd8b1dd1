"""The device mesh and the one table of how arrays are laid out on it.

Two axes: `data` and `expert`. Tokens (the batch) are split over both, so every device
holds different tokens; expert weights are split over `expert` and replicated over `data`.
"""

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

TOKEN_AXES = ("data", "expert")  # batch dimension is sharded over both axes
EXPERT_AXIS = "expert"


def make_mesh(data: int, expert: int, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    if data * expert > len(devices):
        raise ValueError(
            f"mesh data={data} x expert={expert} needs {data * expert} devices, "
            f"only {len(devices)} available"
        )
    return jax.make_mesh((data, expert), ("data", "expert"), (AxisType.Auto, AxisType.Auto),
                         devices=devices[: data * expert])


def token_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(TOKEN_AXES))


def num_token_shards(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["expert"]


def shard_model(model, mesh: Mesh) -> None:
    """Move every parameter of an NNX model to the layout its `out_sharding` ask for."""
    from flax import nnx

    state = nnx.state(model)
    specs = nnx.get_partition_spec(state)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda s: isinstance(s, P))
    nnx.update(model, jax.device_put(state, shardings))


def replicate_unplaced(tree, mesh: Mesh):
    """Give every leaf not already laid out on `mesh` (optimizer step counts, say) a replicated
    layout there, so checkpoints restore every leaf onto the mesh."""
    def place(x):
        s = x.sharding
        return s if isinstance(s, NamedSharding) and s.mesh == mesh else NamedSharding(mesh, P())
    return jax.device_put(tree, jax.tree.map(place, tree))
