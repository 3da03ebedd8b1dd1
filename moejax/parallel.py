"""The device mesh and the one table of how arrays are laid out on it.

Five mesh axes; a size-1 axis costs nothing:
  data    pure data parallelism: weights replicated
  fsdp    data parallelism with every weight and optimizer moment split (ZeRO-3)
  expert  experts split, tokens travel to them by all-to-all; other weights split as by fsdp
  context the sequence split (context parallelism): attention gathers keys and values
          (model/context.py); weights and optimizer split, as over fsdp
  tensor  heads and FFN hidden units split (Megatron); tokens replicated
Rows of the batch are split over data, fsdp and expert; the positions of each row over
context (activations: the logical dim "seq"). Models name the logical dims of
their parameters and activations; `RULES` maps those names to mesh axes.

Weights: a routed expert's weight is split over `expert` by its experts dim and over `fsdp`
and `context` by its d_model dim; every other weight (attention, embeddings, norms, dense
FFNs, routers) has its d_model dim split over `fsdp`, `expert` and `context` together, as
MaxText's rules do, so that each device holds 1 / (fsdp x expert x context) of the whole
state, not `expert` or `context` copies of it (a long-context run's devices hold different
positions of the same rows: a data-parallel axis for the weights). A mesh
axis splits at most one dim of an array: the first that claims it (see `spec`).
"""

import math

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "expert", "context", "tensor")
TOKEN_AXES = ("data", "fsdp", "expert")
EXPERT_AXIS = "expert"
SEQ_AXIS = "context"
# What the MoE layer treats as token shards: rows over TOKEN_AXES, positions over context.
TOKEN_SHARD_AXES = (*TOKEN_AXES, SEQ_AXIS)

# logical dim -> mesh axes. A dim its axes do not divide stays whole (see `spec`).
RULES = {
    "batch": TOKEN_AXES,
    "seq": (SEQ_AXIS,),  # activations only
    "vocab": ("tensor",),
    "embed": ("fsdp", "expert", SEQ_AXIS),  # weights only: activations keep d_model whole
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "experts": ("expert",),
}


def mesh_sizes(mesh_config, num_devices: int) -> dict:
    """{axis: size} from the config's mesh, the one -1 (if any) filled with the devices left."""
    sizes = {a: int(mesh_config.get(a, 1)) for a in AXES}
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


def _layout(names, shape, mesh: Mesh) -> list[tuple[tuple, tuple]]:
    """(the mesh axes RULES asks for, the axes it gets) per dim. Dims are walked in order and
    an axis an earlier dim took is not offered again: an expert weight [E, d, ...] named
    ("experts", "embed", ...) has E over `expert` and d over `fsdp` and `context` alone. Axes
    of size 1 are not asked for; trailing axes are dropped until the rest divide the dim."""
    names = (None,) * (len(shape) - len(names)) + tuple(names)
    taken, out = set(), []
    for name, dim in zip(names, shape, strict=True):
        wanted = tuple(a for a in RULES.get(name, ()) if mesh.shape[a] > 1 and a not in taken)
        axes = wanted
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        taken.update(axes)
        out.append((wanted, axes))
    return out


def spec(names, shape, mesh: Mesh) -> P:
    """PartitionSpec for an array whose trailing dims have these logical names (leading dims
    without a name, such as the layer axis of scanned blocks, are never split). A mesh axis
    of size 1, one that does not divide its dim, or one an earlier dim took, is left out."""
    return P(*(axes[0] if len(axes) == 1 else (axes or None)
               for _, axes in _layout(names, shape, mesh)))


def undivided(names, shape, mesh: Mesh) -> list[str]:
    """The logical dims some of whose mesh axes `spec` had to leave out because they do not
    divide them ('embed=48 (expert)' for d_model 48 on fsdp=4 x expert=8)."""
    names = (None,) * (len(shape) - len(names)) + tuple(names)
    return [f"{name}={dim} ({', '.join(a for a in wanted if a not in axes)})"
            for name, dim, (wanted, axes) in zip(names, shape, _layout(names, shape, mesh),
                                                  strict=True)
            if len(axes) < len(wanted)]


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
        if not holds_array(x):
            return x
        return x.replace(NamedSharding(mesh, spec(names_of(x), x.shape, mesh)))

    return jax.tree.map(layout, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, mesh: Mesh | None, names) -> jax.Array:
    """Pin an activation's layout (logical names per dim) so XLA gathers weights, not tokens."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(names, x.shape, mesh)))


def holds_array(v) -> bool:
    """False for a Variable holding no array: the optax.MaskedNode that stands for a leaf
    another partition of the optimizer owns (train.optimizer=muon, run/optim.py)."""
    from flax import nnx

    return hasattr(v.get_value() if isinstance(v, nnx.Variable) else v, "shape")


def on_device(tree):
    """Inside jit: the leaves of `tree` that rest in host memory (an offloaded optimizer
    state, run/state.py) moved to device memory, where XLA computes on them; the others as
    they are."""
    def move(x):
        host = jax.typeof(x).memory_space == jax.memory.Space.Host
        return jax.device_put(x, jax.memory.Space.Device) if host else x

    return jax.tree.map(move, tree)


def token_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(TOKEN_AXES))


def num_token_shards(mesh: Mesh | None) -> int:
    """Devices holding distinct tokens of a batch: rows x sequence shards."""
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in TOKEN_SHARD_AXES)


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{a}={mesh.shape[a]}" for a in AXES)
