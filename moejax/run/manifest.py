"""Expert-complete checkpoints: a manifest of checksums saved beside the state and checked
against the arrays a restore produced, on whatever layout it produced them.

Every routed expert's weight (an ExpertParam: w_in, w_out, and their AdamW moments, which
carry the same type) gets one checksum per expert: [layers, E] for a scanned stack, [E] for
a multi-token prediction module's block. Every other array (the rest of the parameters and
of the optimizer state, step counts included) gets one for the whole tensor.

The checksum of an array's slice x (one expert's, or the whole tensor) is exact in its bits:
each element's bits b_j (bitcast to an unsigned integer of its width, then widened to
uint32; a 64-bit element counts as two 32-bit ones) times an odd weight w_j = (2j + 1) *
0x9E3779B1 (j: its row-major position in the slice), summed, all mod 2**32. An odd weight
makes every single flipped bit change the sum (2**k * odd is never 0 mod 2**32); the weights
differing by position make a swap of two different elements change it too, except for a
chance of about 2**-32, as for any other change. A zeroed slice sums to 0. Integer sums mod
2**32 do not depend on the order they are added in, so the checksum of a sharded array is
the same on every mesh: it is computed where the shards are (jitted; each device sums its
own, one all-reduce of [layers, E] numbers), never gathering a weight to one place.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import parallel
from moejax.moe.layer import ExpertParam

GOLDEN = 0x9E3779B1  # odd: 2**32 / the golden ratio, spreading the positions' weights
FORMULA = "sum_j bits_j * ((2j + 1) * 0x9E3779B1) mod 2**32, per expert (ExpertParam)"
VERSION = 1


class ManifestError(ValueError):
    """A restored array differs from what the checkpoint's manifest says was saved."""


def expert_dims(leaf) -> int:
    """How many leading dims the per-expert checksums keep: those up to and including the
    experts dim of an ExpertParam ([layers, E] stacked, [E] alone); 0 (one checksum) else."""
    if not isinstance(leaf, ExpertParam):
        return 0
    return leaf.get_value().ndim - len(parallel.names_of(leaf)) + 1


def as_uint32(x: jax.Array) -> jax.Array:
    """x's bits as uint32, element by element (a 64-bit element as a trailing pair)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = jnp.dtype(x.dtype).itemsize
    if width >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[width]).astype(
        jnp.uint32)


def checksum(x: jax.Array, keep: int) -> jax.Array:
    """x: [*kept, *rest] -> uint32 [*kept]: the sum above over each slice x[i] of the rest."""
    bits = as_uint32(x)
    rest = bits.shape[keep:]
    position = jnp.zeros(rest, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(rest))):  # row-major position within the slice
        position = position + jax.lax.broadcasted_iota(jnp.uint32, rest, axis) * jnp.uint32(
            stride % 2**32)
        stride *= rest[axis]
    weight = (position * jnp.uint32(2) + jnp.uint32(1)) * jnp.uint32(GOLDEN)
    return jnp.sum(bits * weight, axis=tuple(range(keep, bits.ndim)), dtype=jnp.uint32)


@functools.cache
def program(mesh):
    """The jitted checksums of a list of arrays; on `mesh` (if any) its results replicated,
    since every process reads them."""
    def sums(arrays, keeps):  # an offloaded optimizer state's arrays summed on the device
        return [checksum(x, keep) for x, keep in zip(parallel.on_device(arrays), keeps,
                                                     strict=True)]

    out = NamedSharding(mesh, P()) if mesh is not None else None
    return jax.jit(sums, static_argnums=1, out_shardings=out)


def checksums(named: list) -> dict:
    """{name: uint32 numpy array} for [(name, leaf)] (a leaf: an nnx Variable or an array),
    computed on the devices holding each array, as one jitted program."""
    names = [n for n, _ in named]
    leaves = [leaf for _, leaf in named]
    arrays = [leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf for leaf in leaves]
    keeps = tuple(expert_dims(leaf) for leaf in leaves)
    mesh = next((a.sharding.mesh for a in arrays
                 if isinstance(getattr(a, "sharding", None), NamedSharding)), None)
    sums = jax.device_get(program(mesh)(arrays, keeps))
    return {n: np.asarray(s, np.uint32) for n, s in zip(names, sums, strict=True)}


def to_json(sums: dict) -> dict:
    """The manifest as saved: per-expert checksums as nested lists, others as one integer."""
    return {"version": VERSION, "checksum": FORMULA,
            "tensors": {n: s.tolist() for n, s in sorted(sums.items())}}


def verify(sums: dict, manifest: dict, partial: bool = False) -> None:
    """Raise ManifestError, one line naming the tensor (and layer and expert), unless the
    restored arrays' `sums` equal the manifest's: every tensor in both (`partial`: those of
    `sums` only, for a restore of part of the state), each expert present (the manifest's
    [layers, E] the restored model's) and equal to the one saved."""
    saved = manifest.get("tensors", {})
    if manifest.get("version") != VERSION:
        raise ManifestError(f"manifest version {manifest.get('version')!r}: unknown; allowed: "
                            f"{VERSION}")
    missing = sorted((saved.keys() - sums.keys()) if not partial else ())
    if unlisted := sorted(sums.keys() - saved.keys()):
        raise ManifestError(f"{unlisted[0]}: restored, but not in the checkpoint's manifest "
                            f"({len(unlisted)} such); allowed: a checkpoint of this model")
    if missing:
        raise ManifestError(f"{missing[0]}: in the checkpoint's manifest, not restored "
                            f"({len(missing)} such); allowed: a checkpoint of this model")
    for name in sorted(sums):
        got, want = sums[name], np.asarray(saved[name], np.int64)
        if got.shape != want.shape:
            raise ManifestError(f"{name}: the manifest holds {describe(want.shape)}, the "
                                f"restored model {describe(got.shape)}; allowed: a checkpoint "
                                "with every expert of this model")
        bad = np.argwhere(got.astype(np.int64) != want)
        if bad.size:
            raise ManifestError(mismatch(name, got.astype(np.int64), want, tuple(bad[0]),
                                         len(bad)))


def describe(shape: tuple) -> str:
    words = {0: "one checksum", 1: "[E] checksums", 2: "[layers, E] checksums"}
    return f"{words.get(len(shape), 'checksums')} {list(shape)}"


def mismatch(name: str, got: np.ndarray, want: np.ndarray, at: tuple, count: int) -> str:
    """'params....w_out layer 1 expert 3: checksum 0x.. vs manifest 0x.. (why)'."""
    where = " ".join(f"{w} {i}" for w, i in zip(("layer", "expert")[-len(at):], at,
                                                strict=True)) if at else ""
    line = f"{name}{' ' + where if where else ''}: checksum 0x{got[at]:08x} vs manifest " \
           f"0x{want[at]:08x}"
    if at and got[at] == 0:
        line += " (all zeros: the expert is missing)"
    elif at:  # the same as another expert of its layer, which was distinct when saved
        row = at[:-1]
        twins = [e for e in range(got.shape[-1]) if e != at[-1] and got[(*row, e)] == got[at]
                 and want[(*row, e)] != want[at]]
        if twins:
            line += f" (equal to expert {twins[0]}'s: a duplicate, not the expert saved)"
    return line + (f"; {count - 1} more differ" if count > 1 else "")
