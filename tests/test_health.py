"""The training-health sentinel (moejax/run/health.py): a frozen expert, a NaN named down to
its expert, a poisoned state never saved, a stalled step; and the imbalance tax's numbers."""

import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from moejax import parallel, train
from moejax.run import health, state
from moejax.run.checkpoint import Checkpoints, path_name
from moejax.run.metrics import Imbalance
from tests.test_train import smoke

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W_OUT = "stacks.0.blocks.0.ffn.w_out"


def set_leaf(tree, name: str, fn):
    """`tree` with the array named `name` replaced by fn(array)."""
    def one(path, v):
        return fn(v) if path_name(path) == name else v

    return jax.tree_util.tree_map_with_path(one, tree)


@pytest.fixture(scope="module")
def stepping():
    """A sigmoid-routed smoke model on data 2 x expert 4 whose router bias keeps expert 5 from
    ever being chosen, its jitted train step, and three batches."""
    config = smoke(**{"model.vocab_size": 257, "model.router_score": "sigmoid",
                      "mesh.data": 2, "mesh.expert": 4})
    setup = state.setup(config, parallel.make_mesh(parallel.mesh_sizes(config.mesh, 8)))
    bias = np.zeros((2, 8), np.float32)
    bias[:, 5] = -100.0  # sigmoid scores are in (0, 1): expert 5 always ranks last
    s = state.init(setup)
    s["params"] = set_leaf(s["params"], "stacks.0.blocks.0.ffn.router_bias",
                           lambda v: jax.device_put(bias, v.sharding))
    batches = [np.asarray(jax.random.randint(jax.random.key(i), (16, 33), 0, 257))
               for i in range(3)]
    return setup, s, state.train_step_fn(setup), batches


def test_frozen_expert_is_named(stepping):
    setup, s, step_fn, batches = stepping
    frozen, warnings = health.FrozenExperts(patience=3), []
    s = jax.tree.map(lambda x: x.copy(), s)  # the step donates its input
    for i, batch in enumerate(batches, start=1):
        s, m = step_fn(s, batch, np.int32(i))
        m = jax.device_get(m)
        assert not m["skipped"]
        grads = m["health"]["expert_grad_norm"]
        assert set(grads) == {"stacks.0.blocks.0.ffn.w_in", W_OUT}
        # Only expert 5 gets no token: its gradient is exactly 0, every other one's is not.
        for g in grads.values():
            assert g.shape == (2, 8) and (g[:, 5] == 0).all() and (np.delete(g, 5, 1) > 0).all()
        warnings += frozen.update(i, grads, m["health"]["expert_update_norm"], m["lr"])
    assert sorted(warnings) == sorted(
        f"warning: step 3: expert 5 of {name} layer {layer} has not moved for 3 steps: its "
        "gradient was 0 (no token reached it, or its gradient is cut)"
        for name in grads for layer in (0, 1))


def test_frozen_update_with_a_gradient():
    """An optimizer that leaves an expert alone (Muon skipping 3-D weights) though it has a
    gradient; a zero learning rate (warm-up's first step) is no evidence."""
    frozen = health.FrozenExperts(patience=2)
    g, u = {"w": np.ones((1, 4))}, {"w": np.array([[1.0, 0.0, 1.0, 1.0]])}
    assert frozen.update(1, g, u, lr=0.0) == []
    assert frozen.update(2, g, u, lr=1e-3) == []
    assert frozen.update(3, g, u, lr=1e-3) == [
        "warning: step 3: expert 1 of w layer 0 has not moved for 2 steps: its update was 0 "
        "(the optimizer leaves it)"]
    assert frozen.update(4, g, u, lr=1e-3) == []  # once, until it moves


def test_nan_in_one_expert_is_named(stepping):
    setup, s, step_fn, batches = stepping
    before = jax.device_get(s["params"])
    poisoned = set_leaf(jax.tree.map(lambda x: x.copy(), s["params"]), W_OUT,
                        lambda v: v.at[1, 3, 7, 0].set(np.nan))
    after, m = step_fn({**s, "params": poisoned}, batches[0], np.int32(1))
    m = jax.device_get(m)
    assert m["skipped"]
    assert health.first_nonfinite(m["health"]["finite"]) == f"{W_OUT} layer 1 expert 3 (parameter)"
    # The step left the state as it was (the NaN included), every other tensor untouched.
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(jax.device_get(
            after["params"]))[0], jax.tree.leaves(before), strict=True):
        if path_name(path) != W_OUT:
            np.testing.assert_array_equal(a, b)
    flags = {"gradient": {"a": np.array(True), "b": np.array([[True, False]])},
             "update": {"a": np.array(False)}}
    assert health.first_nonfinite(flags) == "b layer 0 expert 1 (gradient)"


def test_poisoned_save_is_refused(tmp_path, monkeypatch):
    """A state that turns non-finite (here: one expert's second moment, set to NaN after step 2)
    is never saved: the run stops non-zero naming it and the last good checkpoint."""
    name = "opt_state.1.0.nu.stacks.0.blocks.0.ffn.w_out"
    real = state.train_step_fn

    def poisoned_fn(setup):
        step_fn = real(setup)

        def step(s, batch, i):
            s, m = step_fn(s, batch, i)
            if int(i) == 3:
                s = set_leaf(s, name, lambda v: v.at[0, 6].set(np.nan))
            return s, m

        return step

    monkeypatch.setattr(state, "train_step_fn", poisoned_fn)
    config = smoke(**{"mesh.data": 1, "train.eval_every": 100, "train.eval_batches": 1,
                      "train.keep_best": False, "train.ckpt_every": 2})
    with pytest.raises(train.NonFiniteError) as e:
        train.train_and_evaluate(config, str(tmp_path))
    assert str(e.value) == (
        f"step 4: the state to be saved is not finite (first non-finite: {name} layer 0 expert "
        f"6 (state)): not saved; the last good state is checkpoint 2 in {tmp_path}")
    ckpt = Checkpoints(str(tmp_path), 2, False)
    assert ckpt.latest.all_steps() == [2]
    saved = ckpt.latest.restore(2).state
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved))


def test_watchdog_names_the_wait_then_ends_the_run():
    out, codes = [], []
    dog = health.Watchdog(factor=5, timeout_s=1.0, print_fn=out.append, poll_s=0.01,
                          exit_fn=codes.append)
    try:
        for step in range(1, 5):  # four steps of ~20 ms: the median
            dog.begin(step)
            time.sleep(0.02)
            dog.beat(step)
        dog.begin(5)
        dog.waiting("batch 4 from the data loader")
        time.sleep(0.5)
        assert len(out) == 1 and out[0].startswith("warning: watchdog: step 5 has taken ")
        assert out[0].endswith("waiting for batch 4 from the data loader")
        time.sleep(0.7)
    finally:
        dog.close()
    assert codes == [3] and out[1].startswith(
        "error: watchdog: step 5 has waited 1 s for batch 4 from the data loader "
        "(train.watchdog_timeout_s=1); ending the run")


@pytest.mark.slow
def test_stalled_step_ends_the_run(tmp_path):
    """A real run whose data loader hangs at step 5: exit status 3, naming what it waited for."""
    script = (
        "import time\n"
        "from moejax import cli, train\n"
        "from moejax.data import loader\n"
        "real = loader.Loader.__next__\n"
        "def stall(self):\n"
        "    batch = real(self)\n"
        "    self.calls = getattr(self, 'calls', 0) + 1\n"
        "    if self.calls == 5:\n"
        "        time.sleep(600)\n"
        "    return batch\n"
        "loader.Loader.__next__ = stall\n"
        "cli.run(train.main)\n")
    args = ["--config", "configs/tiny.py:smoke", "--workdir", str(tmp_path),
            "--config.train.steps=8", "--config.train.eval_every=100",
            "--config.train.watchdog_factor=5", "--config.train.watchdog_timeout_s=20"]
    started = time.monotonic()
    p = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 3, p.stdout + p.stderr
    assert time.monotonic() - started < 200
    assert "warning: watchdog: step 5 has taken" in p.stdout
    assert ("error: watchdog: step 5 has waited 20 s for batch 4 from the data loader "
            "(train.watchdog_timeout_s=20); ending the run") in p.stdout


def test_imbalance_tax():
    """Hand-computed: 2 layers, 4 experts on 2 expert-parallel ranks, 2 micro-batches."""
    load = np.array([[3.0, 1.0, 2.0, 2.0], [4.0, 4.0, 0.0, 0.0]])  # per micro-batch
    tax = Imbalance(ep=2, micro_batches=2, expert_share=0.5, dropless=True)
    got = tax(load, np.array([0.0, 0.25]), step_ms=100.0)
    # Ranks per step: layer 0: (8, 8); layer 1: (16, 0). Max mean 12, mean mean 8.
    assert got["moe/ep_rank_max_tokens"] == 12.0 and got["moe/ep_rank_mean_tokens"] == 8.0
    assert got["moe/ep_imbalance"] == pytest.approx((1.0 + 2.0) / 2)
    assert got["moe/dropped_assignments"] == 0.25 * 16  # layer 1's 16 assignments
    # Layer 0 waits for nothing, layer 1 half its expert time: 100 ms x 0.5 x (0 + 0.5) / 2.
    assert got["perf/imbalance_tax_ms"] == pytest.approx(12.5)
    capacity = Imbalance(ep=2, micro_batches=2, expert_share=0.5, dropless=False)
    assert capacity(load, np.zeros(2), 100.0)["perf/imbalance_tax_ms"] == 0.0


def test_run_ending_on_skipped_steps_exits_nonzero(tmp_path, monkeypatch):
    """Fewer non-finite steps than train.max_nonfinite_steps, but the run ends on them: it did
    not train to its end, so it must not exit 0 as if it had."""
    from tests.test_reliability import poison

    poison(monkeypatch, {5, 6})
    config = smoke(**{"mesh.data": 1, "train.eval_every": 100, "train.eval_batches": 1,
                      "train.keep_best": False, "train.ckpt_every": 2})
    with pytest.raises(train.NonFiniteError) as e:
        train.train_and_evaluate(config, str(tmp_path))
    assert str(e.value) == (
        "the run ended on 2 skipped step(s) (5..6) with a non-finite loss or gradients (first "
        "non-finite: the loss, with every parameter finite); the last good state is checkpoint "
        f"6 in {tmp_path}")
