"""The sharded train state (moejax/run/state.py, parallel.py) on the 8 simulated devices: bytes per
device, the same loss and gradients on every layout, one compile, remat, and restoring a
checkpoint onto another layout."""

import functools
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from moejax import parallel
from moejax.data.loader import first_batches
from moejax.run import state
from moejax.run.checkpoint import path_name
from moejax.train import open_data, train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(**model):
    """The smoke model with grouped-query heads, fixed capacity groups (so every layout drops
    the same tokens) and a vocabulary that `tensor` divides."""
    config = tiny.get_config("smoke")
    config.model.update(vocab_size=256, num_heads=4, num_kv_heads=2, head_dim=8,
                        num_groups=8, **model)
    return config


def on(config, layout):
    config = config.copy_and_resolve_references()
    config.mesh.update(dict(zip(("data", "fsdp", "expert", "tensor"), layout, strict=True)))
    return config


def batch(config):
    shape = (config.data.batch_size, config.data.seq_len + 1)
    return np.random.default_rng(0).integers(0, config.model.vocab_size, shape, np.int32)


def loss_and_grads(config):
    mesh = parallel.make_mesh(parallel.mesh_sizes(config.mesh, jax.device_count()))
    s = state.setup(config, mesh)
    params = state.init(s)["params"]
    tokens = jax.device_put(batch(config), parallel.token_sharding(mesh))
    grad = jax.jit(jax.value_and_grad(functools.partial(
        state.loss_fn, graphdef=s.graphdef, rng=jax.random.key(0), tc=config.train),
        has_aux=True))
    (loss, _), grads = grad(params, batch=tokens)
    flat = {path_name(p): np.asarray(g) for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    return float(loss), flat, params


def assert_same(got, want, what):
    for name in want:
        g, w = got[name], want[name]
        # rtol 1e-5 on each weight's gradient; entries far below its largest are compared
        # against that scale instead (a relative error of a near-zero sum is noise).
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * np.abs(w).max(),
                                   err_msg=f"{what}: {name}")


LAYOUTS = [  # (data, fsdp, expert, tensor); FSDP x EP and FSDP x TP: the remat tests'
    (8, 1, 1, 1),  # data parallel
    (1, 8, 1, 1),  # pure FSDP
    (1, 1, 4, 2),  # EP x TP
    (2, 2, 2, 1),  # data x FSDP x EP
    (1, 2, 2, 2),  # FSDP x EP x TP
]
# FSDP x EP, FSDP x TP, DP x EP
REMAT_LAYOUTS = {"full": (1, 4, 2, 1), "matmuls": (1, 4, 1, 2), "offload": (2, 1, 4, 1)}


@pytest.fixture(scope="module")
def one_device():
    return loss_and_grads(on(small(), (1, 1, 1, 1)))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "d{}f{}e{}t{}".format(*t))
def test_same_loss_and_gradients_on_every_layout(one_device, layout):
    loss0, grads0, _ = one_device
    loss, grads, params = loss_and_grads(on(small(), layout))
    assert grads.keys() == grads0.keys() and len(grads) == 10
    np.testing.assert_allclose(loss, loss0, rtol=1e-6)
    assert_same(grads, grads0, str(layout))
    assert_split(params, layout)


def assert_split(params, layout):
    """Each weight is really split as the table says (size-1 axes left out)."""
    sizes = dict(zip(("data", "fsdp", "expert", "tensor"), layout, strict=True))
    w_in = params["stacks"][0]["blocks"][0]["ffn"]["w_in"][...]
    assert list(w_in.sharding.spec) == [None] + [
        a if sizes.get(a, 1) > 1 else None for a in ("expert", "fsdp", None, "tensor")]


@pytest.mark.slow
def test_all_four_axes_on_16_devices(one_device):
    """data=2 x fsdp=2 x expert=2 x tensor=2 needs 16 devices: a process of its own."""
    loss0, grads0, _ = one_device
    code = ("import numpy as np, sys; from tests import test_state as t; "
            "loss, g, _ = t.loss_and_grads(t.on(t.small(), (2, 2, 2, 2))); "
            "np.savez(sys.argv[1], loss=loss, **g)")
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"four_axes_{os.getpid()}.npz")
    env = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"].replace("device_count=8",
                                                                      "device_count=16")}
    run = subprocess.run([sys.executable, "-c", code, out], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = dict(np.load(out))
    os.remove(out)
    np.testing.assert_allclose(float(got.pop("loss")), loss0, rtol=1e-6)
    assert_same(got, grads0, "2x2x2x2")


@pytest.mark.parametrize("remat", ["full", "matmuls",
                                   pytest.param("offload", marks=pytest.mark.slow)])
def test_remat_changes_no_number(one_device, remat):
    """Each on a layout of its own, which LAYOUTS leaves to it: the same numbers with
    recomputation and on that layout."""
    loss0, grads0, _ = one_device
    loss, grads, params = loss_and_grads(on(small(remat=remat), REMAT_LAYOUTS[remat]))
    np.testing.assert_allclose(loss, loss0, rtol=1e-6)
    assert_same(grads, grads0, remat)
    assert_split(params, REMAT_LAYOUTS[remat])


def state_bytes(tree) -> dict:
    """Bytes each device holds of `tree`, read off the live arrays' shards."""
    held = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


@pytest.mark.parametrize("width", [1, 4], ids=["tiny", "4x_wider"])
def test_fsdp_holds_an_eighth_of_the_state_on_each_device(width):
    config = tiny.get_config()
    config.model.update(vocab_size=257, d_model=128 * width, d_ff=256 * width,
                        num_heads=4 * width)
    config = on(config, (1, 8, 1, 1))
    s = state.setup(config, parallel.make_mesh(parallel.mesh_sizes(config.mesh, 8)))
    train_state = state.init(s)
    total = sum(x.nbytes for x in jax.tree.leaves(train_state))
    held = state_bytes(train_state)
    assert len(held) == 8
    print(f"width x{width}: {total / 2**20:.1f} MiB in all, per device "
          f"{min(held.values()) / 2**20:.2f}-{max(held.values()) / 2**20:.2f} MiB")
    for device_bytes in held.values():
        assert abs(device_bytes - total / 8) <= 0.05 * total / 8


def ckpt_run():
    """The checkpoint test's run; the step test steps the same program (FSDP x EP), so the
    suite compiles that train step and init once (the persistent cache)."""
    config = small(num_layers=1)
    config.model.vocab_size = 260  # real byte-tokenized data: its 257 ids, a multiple of tensor
    # Checkpoints at the stops only (and step 3 of the uninterrupted run), and no evaluation
    # after step 0 (train.steps past the last stop): the moved layouts compile and save nothing
    # the restore does not need.
    config.train.update(steps=7, ckpt_every=100, eval_every=100)
    return config


def test_step_compiles_once_and_keeps_the_layout():
    config = on(ckpt_run(), (1, 4, 2, 1))
    s = state.setup(config, parallel.make_mesh(parallel.mesh_sizes(config.mesh, 8)))
    train_state = state.init(s)
    layout = jax.tree.map(lambda x: x.sharding, train_state)
    held = state_bytes(train_state)
    step_fn = state.train_step_fn(s)
    # The training data's first batch ({"tokens", "segments", "loss_mask"}), as a run reads it.
    shape = (config.data.batch_size, config.data.seq_len + 1)
    tokens = first_batches(open_data(config)[0], parallel.token_sharding(s.mesh), shape, 1)[0]
    for step in range(3):
        train_state, metrics = step_fn(train_state, tokens, jnp.int32(step))
        assert np.isfinite(float(metrics["loss"]))
        assert jax.tree.map(lambda x: x.sharding, train_state) == layout
        assert state_bytes(train_state) == held  # the first step is no different
    assert step_fn._cache_size() == 1


def test_checkpoint_restores_onto_other_layouts(tmp_path):
    config = ckpt_run()
    straight = on(config, (1, 4, 2, 1))
    straight.train.update(stop_at=6, ckpt_every=3)
    straight = train_and_evaluate(straight, str(tmp_path / "straight"))
    # The moved run starts from the uninterrupted run's step-3 checkpoint, its newest once the
    # later one is gone: what a run stopped at step 3 on that layout leaves.
    shutil.copytree(tmp_path / "straight", tmp_path / "moved")
    shutil.rmtree(tmp_path / "moved" / "checkpoints" / "6")
    for layout, steps in (((1, 2, 4, 1), [4]), ((2, 1, 2, 2), [5, 6])):
        moved = on(config, layout)
        moved.train.stop_at = steps[-1]
        got = train_and_evaluate(moved, str(tmp_path / "moved"))["train_loss"]
        assert sorted(got) == steps
        np.testing.assert_allclose([got[s] for s in steps],
                                   [straight["train_loss"][s] for s in steps], rtol=1e-5)


def test_moe_layer_ids_and_stacks_follow_the_config():
    from moejax.model.transformer import layer_stacks, moe_layer_ids

    for layers, first, every, moe in [(4, 0, 1, [0, 1, 2, 3]), (4, 1, 2, [2]),
                                      (7, 1, 2, [2, 4, 6]), (5, 0, 2, [1, 3])]:
        config = small(num_layers=layers, first_dense_layers=first, moe_every=every)
        assert moe_layer_ids(config.model) == moe
        assert sum(n * p for n, p in layer_stacks(config.model)) == layers


# Every layer MoE is the smoke model every training test runs; these two interleave dense
# layers (first ones dense, a dense layer left over at the end; or dense first in each pair).
@pytest.mark.parametrize("layers,first,every,moe", [(7, 1, 2, [2, 4, 6]), (5, 0, 2, [1, 3])])
def test_scanned_stacks_put_the_moe_layers_where_the_config_says(layers, first, every, moe):
    from moejax.model.transformer import Transformer

    config = small(num_layers=layers, first_dense_layers=first, moe_every=every)
    # Random weights drawn by NumPy into the abstract model: the structure is under test, and
    # the jitted initializer of seven stacked layers compiles for longer than the forward.
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: Transformer(config.model, mesh=None, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    model = nnx.merge(graphdef, jax.tree.map(
        lambda a: jnp.asarray(rng.normal(0, 0.05, a.shape), a.dtype), abstract))
    routers = [x for p, x in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
               if path_name(p).endswith("ffn.router")]
    assert [r.shape[0] for r in routers] == [len(moe)]  # one stack holds every MoE layer
    logits, aux = nnx.jit(lambda m, t: m(t, train=False))(model, jnp.asarray(batch(config))[:, :-1])
    assert logits.shape == (16, 32, 256)
    assert aux["tokens_per_expert"].shape == (len(moe), 8)
    np.testing.assert_array_equal(aux["tokens_per_expert"].sum(-1), 16 * 32 * 2)


def test_weight_decay_spares_norm_scales_and_biases():
    """AdamW decays weight matrices only: one step from zero gradients moves exactly them."""
    config = small(qk_norm="all", qkv_bias=True, num_shared_experts=1, shared_gate=True)
    config.train.warmup_steps = 0  # the first step's learning rate is not 0
    s = state.setup(config, parallel.make_mesh({}))
    # Every weight 1 (the initializer is beside the point, and compiles for longer than this),
    # as NumPy arrays: jnp would compile a program for each shape.
    params = jax.tree.map(lambda a: np.ones(a.shape, a.dtype), s.abstract["params"])
    tx, _ = state.make_optimizer(config.train)
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, jax.jit(tx.init)(params), params)
    moved = {path_name(p) for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]
             if np.abs(np.asarray(u)).max() > 0}
    names = {path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    spared = {n for n in names if n.endswith(("scale", "bias"))}
    assert spared and not spared & moved
    assert moved == names - spared, sorted(names - spared - moved)
