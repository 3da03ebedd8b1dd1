"""The device mesh and the one table of how arrays are laid out on it.

Four mesh axes; a size-1 axis costs nothing:
  data    pure data parallelism: weights replicated
  fsdp    data parallelism with every weight and optimizer moment split (ZeRO-3)
  expert  experts split; tokens travel to them by all-to-all
  tensor  heads and FFN hidden units split (Megatron); tokens replicated
Tokens (the batch) are split over every axis but `tensor`. Models name the logical dims of
their parameters and activations; `RULES` maps those names to mesh axes.
"""

import math

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "expert", "tensor")
TOKEN_AXES = ("data", "fsdp", "expert")
EXPERT_AXIS = "expert"

# logical dim -> mesh axes. A dim its axes do not divide stays whole (see `spec`).
RULES = {
    "batch": TOKEN_AXES,
    "vocab": ("tensor",),
    "embed": ("fsdp",),  # weights only: activations keep d_model whole
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "experts": ("expert",),
}


def mesh_sizes(mesh_config, num_devices: int) -> dict:
    """{axis: size} from the config's mesh, the one -1 (if any) filled with the devices left."""
    sizes = {a: int(mesh_config[a]) for a in AXES}
    rest = [a for a in AXES if sizes[a] == -1]
    if len(rest) == 1:
        known = math.prod(s for a, s in sizes.items() if a != rest[0])
        sizes[rest[0]] = max(num_devices // max(known, 1), 1)
    return sizes


def make_mesh(sizes: dict, devices=None) -> Mesh:
    """A mesh of the four axes; `sizes` may leave axes out (size 1)."""
    devices = jax.devices() if devices is None else devices
    shape = tuple(sizes.get(a, 1) for a in AXES)
    if math.prod(shape) > len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(shape)} devices, "
                         f"only {len(devices)} available")
    return jax.make_mesh(shape, AXES, (AxisType.Auto,) * len(AXES),
                         devices=devices[: math.prod(shape)])


def spec(names, shape, mesh: Mesh) -> P:
    """PartitionSpec for an array whose trailing dims have these logical names (leading dims
    without a name, such as the layer axis of scanned blocks, are never split). A mesh axis
    of size 1, or one that does not divide its dim, is left out."""
    names = (None,) * (len(shape) - len(names)) + tuple(names)
    out = []
    for name, dim in zip(names, shape, strict=True):
        axes = tuple(a for a in RULES.get(name, ()) if mesh.shape[a] > 1)
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def undivided(names, shape, mesh: Mesh) -> list[str]:
    """The logical dims whose mesh axes `spec` had to leave out because they do not divide."""
    names = (None,) * (len(shape) - len(names)) + tuple(names)
    got = spec(names, shape, mesh)
    return [f"{name}={dim}" for name, dim, s in zip(names, shape, got, strict=True)
            if name and any(mesh.shape[a] > 1 for a in RULES.get(name, ())) and s is None]


def names_of(variable) -> tuple:
    """The logical dim names a model gave a parameter (nnx metadata `out_sharding`)."""
    return tuple(variable.get_metadata().get("out_sharding") or ())


def variable_shardings(tree, mesh: Mesh):
    """`tree` (an nnx State, or an optimizer state holding copies of one; live or abstract)
    with each Variable's value replaced by its NamedSharding from RULES and every other leaf
    (step counts) by a replicated one: the same tree structure, as jit and device_put want."""
    from flax import nnx

    def layout(x):
        if not isinstance(x, nnx.Variable):
            return NamedSharding(mesh, P())
        return x.replace(NamedSharding(mesh, spec(names_of(x), x.shape, mesh)))

    return jax.tree.map(layout, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, mesh: Mesh | None, names) -> jax.Array:
    """Pin an activation's layout (logical names per dim) so XLA gathers weights, not tokens."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(names, x.shape, mesh)))


def token_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(TOKEN_AXES))


def num_token_shards(mesh: Mesh | None) -> int:
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in TOKEN_AXES)


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{a}={mesh.shape[a]}" for a in AXES)
