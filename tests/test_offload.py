"""train.offload_optimizer: the optimizer's moments in host memory ("pinned_host") between
steps on TPU and GPU, lowered here for both (`jax.export`); on this CPU, where jax also has a
pinned_host memory, the same program runs for real (setup's `platform` named "gpu") and must
step exactly as the device-resident one; through `train` on CPU the key does nothing but say
so; and the planner's arithmetic for it."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from moejax import parallel
from moejax.plan import estimate
from moejax.run import state
from moejax.run.checkpoint import Checkpoints

MESH = {"data": 2, "expert": 4}
HOST, DEVICE = "pinned_host", "device"


def smoke_config(offload: bool):
    config = tiny.get_config("smoke")
    config.model.update(vocab_size=257)
    config.mesh.update(MESH)
    config.train.offload_optimizer = offload
    return config


def expected_kinds(s) -> list[str]:
    """The memory kind of each leaf of s.abstract, flattened: the optimizer's arrays on the
    host, its step counts and every parameter on the device."""
    def kind(path, x):
        return HOST if path[0].key == "opt_state" and x.ndim else DEVICE

    return [kind(p, x) for p, x in jax.tree_util.tree_flatten_with_path(s.abstract)[0]]


def batch(config, seed: int):
    shape = (config.data.batch_size, config.data.seq_len + 1)
    return np.random.default_rng(seed).integers(0, config.model.vocab_size, shape, np.int32)


@functools.cache
def exported(platform: str) -> tuple[str, list[str]]:
    config = smoke_config(True)
    config.data.update(seq_len=128, batch_size=8)  # splash attention works in 128-row blocks
    s = state.setup(config, parallel.make_mesh(MESH), platform)
    tokens = jax.ShapeDtypeStruct((8, 129), jnp.int32, sharding=parallel.token_sharding(s.mesh))
    return jax.export.export(state.train_step_fn(s), platforms=(platform,))(
        s.abstract, tokens, jnp.int32(0)).mlir_module(), expected_kinds(s)


def memory_kinds(signature: str) -> list[str]:
    """The mhlo.memory_kind of each argument (or result) in a func signature, in order."""
    return re.findall(r'mhlo\.memory_kind = "(\w+)"', signature)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_exported_step_takes_and_returns_the_moments_in_host_memory(platform):
    module, kinds = exported(platform)
    main = next(line for line in module.splitlines() if "func.func public @main" in line)
    args, results = main.split(") -> (", 1)
    # State, then the tokens and the step number (device); results: the state, then metrics.
    assert memory_kinds(args) == kinds + [DEVICE, DEVICE]
    assert memory_kinds(results)[:len(kinds)] == kinds
    assert kinds.count(HOST) >= 2 * 5  # mu and nu of at least the 5 kinds of weights
    # Inside: brought to the device for the update, and the new moments sent back.
    placements = re.findall(r'_xla_buffer_placement = "(\w+)"', module)
    assert placements.count(DEVICE) >= kinds.count(HOST)
    assert placements.count(HOST) >= kinds.count(HOST)


def run_steps(s, steps: int = 2):
    train_state, step_fn = state.init(s), state.train_step_fn(s)
    losses = []
    for i in range(steps):
        tokens = jax.device_put(batch(s.config, i), parallel.token_sharding(s.mesh))
        train_state, metrics = step_fn(train_state, tokens, jnp.int32(i))
        losses.append(float(metrics["loss"]))
    return train_state, losses


@pytest.fixture(scope="module")
def host_and_device():
    """Two steps with the moments in this CPU's pinned_host memory and in its device
    memory: (setup, final state, losses) of each."""
    mesh = parallel.make_mesh(MESH)
    host = state.setup(smoke_config(True), mesh, "gpu")
    device = state.setup(smoke_config(True), mesh, "cpu")
    assert (host.opt_memory, device.opt_memory) == (HOST, None)
    return (host, *run_steps(host)), (device, *run_steps(device))


def test_host_resident_moments_step_exactly_as_device_ones(host_and_device):
    (host, host_state, host_losses), (_, device_state, device_losses) = host_and_device
    assert host_losses == device_losses  # to the bit
    live = [x.sharding.memory_kind for x in jax.tree.leaves(host_state)]
    assert live == expected_kinds(host)  # the step returned them to the host
    for a, b in zip(jax.tree.leaves(host_state), jax.tree.leaves(device_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_restores_onto_host_memory(host_and_device, tmp_path):
    (host, host_state, _), _ = host_and_device
    ckpt = Checkpoints(str(tmp_path), 2, False)
    ckpt.save(2, host_state, {"step": 2})
    ckpt.latest.wait_until_finished()
    restored, meta = ckpt.restore(2, host.abstract)
    assert meta["step"] == 2
    assert [x.sharding.memory_kind for x in jax.tree.leaves(restored)] == expected_kinds(host)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(host_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ckpt.close()


@pytest.mark.slow  # two runs of train (14 s); the fixture above checks the steps themselves
def test_on_cpu_train_says_once_it_does_nothing_and_trains_the_same(tmp_path, capsys):
    from moejax.train import train_and_evaluate

    def run(offload, name):
        config = smoke_config(offload)
        config.train.update(steps=2, warmup_steps=1, eval_every=100, ckpt_every=100)
        return train_and_evaluate(config, str(tmp_path / name))["train_loss"]

    off = run(False, "off")
    assert "offload_optimizer" not in capsys.readouterr().out
    on = run(True, "on")
    line = "train.offload_optimizer: no effect on cpu (device and host memory are the same)"
    assert capsys.readouterr().out.splitlines().count(line) == 1
    assert on == off  # to the bit


def test_planner_moves_exactly_the_moments_off_the_device():
    """tiny:smoke on data=8: every weight whole on each device, so its AdamW moments are
    4 + 4 bytes per parameter (float32 mu and nu) on each."""
    plans = {o: estimate.plan(smoke_config(o), {"data": 8, "expert": 1}) for o in (False, True)}
    off, on = plans[False], plans[True]
    moments = off["params_total"] * (4 + 4)
    assert on["moments"] == off["moments"] == moments
    assert on["state"] == off["state"]  # the same program compiled: the key acts on the device
    o = estimate.offload(on)
    assert o["at_rest"] == off["memory"]["peak"] - moments
    assert o["update"] == 2 * off["params_total"] * 4 + 2 * moments
    assert o["transfer"] == 2 * moments
    f_off, f_on = estimate.fit(off, 2**40), estimate.fit(on, 2**40)
    assert f_off["peak"] == off["memory"]["peak"]
    assert f_on["peak"] == max(o["at_rest"], o["update"])
    for hbm in (f_on["peak"] - 1, f_on["peak"]):  # the verdict follows the offloaded peak
        assert estimate.fit(on, hbm)["fits"] == (hbm >= f_on["peak"])


@functools.cache
def exported_remat(remat: str) -> str:
    """The train step lowered for TPU under model.remat, the optimizer on the device."""
    config = smoke_config(False)
    config.model.remat = remat
    config.data.update(seq_len=128, batch_size=8)
    s = state.setup(config, parallel.make_mesh(MESH), "tpu")
    tokens = jax.ShapeDtypeStruct((8, 129), jnp.int32, sharding=parallel.token_sharding(s.mesh))
    return jax.export.export(state.train_step_fn(s), platforms=("tpu",))(
        s.abstract, tokens, jnp.int32(0)).mlir_module()


def test_remat_offload_sends_each_layer_input_to_host_memory_and_back():
    """remat=offload: the scan body's layer input goes to pinned_host in the forward and
    comes back to the device for the backward's recompute; remat=full keeps it in HBM.
    (This CPU's compiler ignores the placement: the numbers are remat=full's, test_state.)"""
    def placements(remat):
        return re.findall(r'_xla_buffer_placement = "(\w+)"', exported_remat(remat))

    offloaded = placements("offload")
    assert offloaded.count(HOST) >= 1 and offloaded.count(DEVICE) >= 1
    assert HOST not in placements("full")
