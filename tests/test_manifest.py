"""Expert-complete checkpoints (issue 34, item 3): the manifest's checksum against NumPy, a
restore onto another layout verified by it, and a checkpoint with one expert altered, zeroed
or duplicated refused in one line, the older one taken instead."""

import logging
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from moejax import parallel
from moejax.run import manifest, state
from moejax.run.checkpoint import Checkpoints, path_name
from tests.test_train import smoke

W_OUT = "params.stacks.0.blocks.0.ffn.w_out"  # [layers 2, experts 8, d_ff 64, d_model 32]
SAVED_MESH = {"expert": 4, "data": 2}


def config():
    return smoke(**{"model.vocab_size": 257, "model.bias_rate": 0.01})


def numpy_checksum(x: np.ndarray, keep: int) -> np.ndarray:
    """The manifest's formula written out in Python integers: per slice of the leading `keep`
    dims, sum of bits_j * ((2j + 1) * 0x9E3779B1) mod 2**32, j the row-major position."""
    width = x.dtype.itemsize
    bits = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[width]).astype(np.uint64)
    bits = bits.reshape(*x.shape[:keep], -1)
    j = np.arange(bits.shape[-1], dtype=np.uint64)
    weight = ((2 * j + 1) * 0x9E3779B1) % 2**32
    return ((bits * weight) % 2**32).sum(-1) % 2**32


def test_checksum_equals_numpy_and_sees_one_bit_and_a_swap():
    rng = np.random.default_rng(0)
    mesh = parallel.make_mesh({"expert": 4, "fsdp": 2})
    x = rng.normal(size=(2, 8, 6, 4)).astype(np.float32)
    # Sharded as an expert weight: experts over `expert`, the last dim over `fsdp`.
    sharded = jax.device_put(x, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, "expert", None, "fsdp")))
    cases = [(sharded, x, 2), (jnp.asarray(x.astype(ml_dtypes.bfloat16)),
                               x.astype(ml_dtypes.bfloat16), 2),
             (jnp.arange(-5, 7, dtype=jnp.int32), np.arange(-5, 7, dtype=np.int32), 0)]
    for arr, ref, keep in cases:
        got = np.asarray(manifest.checksum(arr, keep))
        np.testing.assert_array_equal(got, numpy_checksum(ref, keep))
    base = numpy_checksum(x, 2)
    flipped = x.copy()
    flipped.view(np.uint32)[1, 5, 3, 2] ^= 1 << 31  # the sign bit of one element
    changed = np.asarray(manifest.checksum(jnp.asarray(flipped), 2)) != base
    assert changed.sum() == 1 and changed[1, 5]
    swapped = x.copy()
    swapped[0, 2, [0, 1]] = swapped[0, 2, [1, 0]]  # two rows of one expert swapped
    assert np.asarray(manifest.checksum(jnp.asarray(swapped), 2))[0, 2] != base[0, 2]
    assert int(manifest.checksum(jnp.zeros((3, 5)), 0)) == 0


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir with checkpoints 1 and 2 of the smoke model (router bias on) saved from
    expert=4 x data=2; step 2's parameters are step 1's + 1 and its moments nonzero. Returns
    (workdir, step 2's state on the host)."""
    workdir = tmp_path_factory.mktemp("saved")
    s = state.setup(config(), parallel.make_mesh(SAVED_MESH))
    first = state.init(s)
    second = jax.jit(lambda t: jax.tree.map(lambda a: a + 1, t),
                     out_shardings=s.shardings)(first)
    ckpt = Checkpoints(str(workdir), 3, False)
    ckpt.save(1, first, {"step": 1, "tokens_seen": 0})
    ckpt.save(2, second, {"step": 2, "tokens_seen": 0})
    ckpt.close()
    return workdir, jax.device_get(second)


@pytest.fixture
def run(saved, tmp_path):
    shutil.copytree(saved[0], tmp_path / "run")
    return tmp_path / "run"


def test_resharded_restore_is_verified_by_the_manifest(saved, run, monkeypatch):
    workdir, host = run, saved[1]
    verified = []
    real = manifest.verify
    monkeypatch.setattr(manifest, "verify", lambda sums, m, partial=False: (
        verified.append(sorted(sums)), real(sums, m, partial))[1])
    s = state.setup(config(), parallel.make_mesh({"fsdp": 8}))
    ckpt = Checkpoints(str(workdir), 3, False)
    restored, meta = ckpt.restore_latest(s.abstract)
    ckpt.close()
    assert meta["step"] == 2 and len(verified) == 1
    assert W_OUT in verified[0] and "opt_state.1.0.nu.stacks.0.blocks.0.ffn.w_in" in verified[0]
    # The manifest on disk: per-expert sums of what was saved, by the NumPy formula.
    saved_manifest = ocp.JsonCheckpointHandler().restore(workdir / "checkpoints" / "2" /
                                                         "manifest")
    w_out = leaf(host, W_OUT)
    np.testing.assert_array_equal(np.asarray(saved_manifest["tensors"][W_OUT]),
                                  numpy_checksum(w_out, 2))
    assert np.asarray(saved_manifest["tensors"][W_OUT]).shape == (2, 8)
    assert isinstance(saved_manifest["tensors"]["params.embed"], int)
    np.testing.assert_array_equal(np.asarray(leaf(restored, W_OUT)), w_out)
    assert leaf(restored, W_OUT).sharding.spec == s.shardings["params"]["stacks"][0][
        "blocks"][0]["ffn"]["w_out"].get_value().spec


def leaf(tree, name):
    """The array at path `name` of a state."""
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda v: isinstance(v, nnx.Variable))
    found = [v for p, v in flat if path_name(p) == name]
    return found[0].get_value() if isinstance(found[0], nnx.Variable) else found[0]


def rewrite_expert(run, step: int, change) -> None:
    """Write checkpoint `step`'s state again with expert 3 of layer 1 of w_out replaced by
    change(w_out) (with orbax, as the state item is written), keeping its old manifest."""
    s = state.setup(config(), parallel.make_mesh(SAVED_MESH))
    ckpt = Checkpoints(str(run), 3, False)
    restored, _ = ckpt.restore(step, s.abstract)
    ckpt.close()

    def edit(path, v):
        if path_name(path) != W_OUT:
            return v
        return v.replace(v.get_value().at[1, 3].set(change(v.get_value())))

    altered = jax.tree_util.tree_map_with_path(
        edit, restored, is_leaf=lambda v: isinstance(v, nnx.Variable))
    item = run / "checkpoints" / str(step) / "state"
    shutil.rmtree(item)
    with ocp.StandardCheckpointer() as writer:
        writer.save(item, altered)


@pytest.mark.parametrize("change,why", [
    (lambda w: w[1, 3] * (1 + 2**-20), ""),  # a few low bits of every element
    (lambda w: jnp.zeros_like(w[1, 3]), " (all zeros: the expert is missing)"),
    (lambda w: w[1, 2], " (equal to expert 2's: a duplicate, not the expert saved)"),
])
def test_an_altered_missing_or_duplicated_expert_is_refused(run, caplog, change, why):
    rewrite_expert(run, 2, change)
    s = state.setup(config(), parallel.make_mesh({"expert": 8}))
    ckpt = Checkpoints(str(run), 3, False)
    with caplog.at_level(logging.WARNING):
        restored = ckpt.restore_latest(s.abstract)
    ckpt.close()
    assert restored[1]["step"] == 1  # the older one
    lines = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert f"({W_OUT} layer 1 expert 3: checksum 0x" in lines[0]
    assert lines[0].split(" vs manifest 0x")[1][8:].startswith(f"{why}): skipped, moved to")
    assert [p.name.split(".")[0] for p in (run / "checkpoints").iterdir()
            if ".broken-" in p.name] == ["2"]


def test_without_a_manifest_restores_with_a_warning(run, caplog):
    shutil.rmtree(run / "checkpoints" / "2" / "manifest")
    s = state.setup(config(), parallel.make_mesh(SAVED_MESH))
    ckpt = Checkpoints(str(run), 3, False)
    with caplog.at_level(logging.WARNING):
        restored = ckpt.restore_latest(s.abstract)
    ckpt.close()
    assert restored[1]["step"] == 2
    assert any("has no manifest" in r.getMessage() and "unverified" in r.getMessage()
               for r in caplog.records)


def test_a_manifest_of_other_experts_is_one_line():
    """Checked before any value: the manifest's [layers, E] must be the restored model's."""
    sums = {"w": np.zeros((2, 4), np.uint32), "b": np.uint32(7)}
    good = manifest.to_json({"w": np.ones((2, 4), np.uint32), "b": np.uint32(7)})
    other = manifest.to_json({"w": np.zeros((2, 8), np.uint32), "b": np.uint32(7)})
    with pytest.raises(manifest.ManifestError, match=r"^w: the manifest holds \[layers, E\] "
                       r"checksums \[2, 8\], the restored model \[layers, E\] checksums \[2, 4\]"):
        manifest.verify(sums, other)
    with pytest.raises(manifest.ManifestError, match=r"^w layer 0 expert 0: checksum "
                       r"0x00000000 vs manifest 0x00000001 \(all zeros: the expert is missing\); "
                       "7 more differ$"):
        manifest.verify(sums, good)
    with pytest.raises(manifest.ManifestError, match="^b: in the checkpoint's manifest, not"):
        manifest.verify({"w": sums["w"]}, other)
    manifest.verify({"b": sums["b"]}, good, partial=True)

