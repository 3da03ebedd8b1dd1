"""Training-time router features: sparse upcycling from a dense run, the auxiliary-loss-free
bias update inside the train step, and the router collapse alarm."""

import json
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from moejax.config_lib import ConfigError
from moejax.run import upcycle
from moejax.run.metrics import CollapseAlarm
from moejax.train import train_and_evaluate
from tests.test_train import smoke

# On one device: what these tests assert (upcycled weights, the bias step, the alarm) is the
# same on any mesh, and the steps, evaluations and saves of a run on the 8 simulated devices
# take longer. The layer's load and losses on every mesh: tests/test_layer.py.
ONE = {"mesh.data": 1}


@pytest.mark.slow  # two trainings: 13 s
def test_upcycled_moe_starts_at_the_dense_loss(tmp_path, capsys, monkeypatch):
    restored = []
    restore = ocp.CheckpointManager.restore
    monkeypatch.setattr(ocp.CheckpointManager, "restore",
                        lambda *a, **k: restored.append(restore(*a, **k)) or restored[-1])
    # Dense source: top_k=1, so its FFN is exactly one expert wide (d_ff = 64); evaluated and
    # saved at its first and last steps only (the losses and the checkpoint used below).
    dense = train_and_evaluate(smoke(**ONE, **{"model.num_experts": 0, "model.top_k": 1,
                                               "train.eval_every": 100, "train.ckpt_every": 100}),
                               str(tmp_path / "dense"))
    dense_loss = dense["eval_loss"][6]
    # Gates that sum to 1 and nothing dropped: every token gets k copies of the same FFN.
    moe = train_and_evaluate(smoke(**ONE, **{"train.init_from": str(tmp_path / "dense"),
                                      "model.renormalize": True, "model.dispatch": "dropless",
                                      "train.steps": 3, "train.stop_at": 2}),
                             str(tmp_path / "moe"))
    assert "upcycled from" in capsys.readouterr().out
    # Only the dense weights are read, not its optimizer state.
    assert [list(r.state) for r in restored] == [["params"]]
    np.testing.assert_allclose(moe["eval_loss"][0], dense_loss, rtol=1e-5)
    # A fresh model starts near log(vocab), far from the trained dense one: the MoE's step-0
    # loss is the trained weights', not an init's (the dense run's own step 0 is that init's).
    assert dense["eval_loss"][0] > dense_loss + 0.5
    # Resuming the upcycled run reads its own checkpoint, not the dense one again: it runs
    # with the dense run gone.
    shutil.rmtree(tmp_path / "dense")
    again = train_and_evaluate(smoke(**ONE, **{"train.init_from": str(tmp_path / "dense"),
                                        "model.renormalize": True, "model.dispatch": "dropless",
                                        "train.steps": 3}), str(tmp_path / "moe"))
    assert list(again["train_loss"]) == [3]


def test_upcycle_plan_names_the_mismatched_param():
    # A stack of 2 layers: dense FFN weights [L, ...], expert weights [L, E, ...].
    ffn = "stacks.0.blocks.0.ffn"
    dense = {"embed": (64, 32), f"{ffn}.w_in": (2, 32, 2, 128), f"{ffn}.w_out": (2, 128, 32)}
    moe = {"embed": (64, 32), f"{ffn}.router": (2, 32, 8),
           f"{ffn}.w_in": (2, 8, 32, 2, 128), f"{ffn}.w_out": (2, 8, 128, 32)}
    assert upcycle.plan(dense, moe) == {"embed": "copy", f"{ffn}.router": "fresh",
                                        f"{ffn}.w_in": "experts", f"{ffn}.w_out": "experts"}
    wide = {**dense, f"{ffn}.w_out": (2, 256, 32)}
    with pytest.raises(ConfigError, match=rf"train.init_from: {ffn}.w_out is \(2, 256, 32\)"):
        upcycle.plan(wide, moe)
    # The expert axis follows the layer axis: 8 dense layers are no source for 2 layers of
    # 8 experts.
    deep = {**dense, f"{ffn}.w_out": (8, 128, 32)}
    with pytest.raises(ConfigError, match=rf"{ffn}.w_out is \(8, 128, 32\)"):
        upcycle.plan(deep, moe)
    with pytest.raises(ConfigError, match="the dense checkpoint has no embed"):
        upcycle.plan({k: v for k, v in dense.items() if k != "embed"}, moe)
    with pytest.raises(ConfigError, match="the dense checkpoint has unembed, this model has not"):
        upcycle.plan({**dense, "unembed": (32, 64)}, moe)


def test_init_from_without_checkpoints_fails_before_compiling(tmp_path):
    with pytest.raises(ConfigError, match="train.init_from=.*: no checkpoints/ in it; allowed"):
        train_and_evaluate(smoke(**{"train.init_from": str(tmp_path)}), str(tmp_path / "w"))
    assert not (tmp_path / "checkpoints").exists()  # nothing written into the other run


def test_bias_update_is_applied_in_the_train_step(tmp_path):
    rate = 0.05
    train_and_evaluate(smoke(**ONE, **{"model.bias_rate": rate, "train.stop_at": 1,
                                "train.log_every": 1}), str(tmp_path))
    import orbax.checkpoint as ocp

    from moejax.run.checkpoint import handlers

    mgr = ocp.CheckpointManager(str(tmp_path / "checkpoints"), item_handlers=handlers())
    state = mgr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    logged = next(r for r in rows if r["step"] == 1 and "moe/layer_00/load/expert_00" in r)
    # The smoke model's two MoE layers are one scanned stack: one [layers, E] bias.
    biases = np.asarray(state["params"]["stacks"]["0"]["blocks"]["0"]["ffn"]["router_bias"]
                        ["value"])
    assert biases.shape == (2, 8)
    for layer, bias in enumerate(biases):
        load = np.array([logged[f"moe/layer_{layer:02d}/load/expert_{e:02d}"] for e in range(8)])
        # Started at zero; one step of bias += rate * sign(mean load - load).
        np.testing.assert_allclose(bias, rate * np.sign(load.mean() - load), atol=1e-7)
        assert np.abs(bias).sum() > 0


def test_collapse_alarm_counts_checks_in_a_row():
    alarm = CollapseAlarm([1, 3], num_experts=4, threshold=0.1, patience=2)
    healthy = np.full((2, 4), 0.25)
    starved = healthy.copy()
    starved[1] = [0.5, 0.49, 0.01, 0.0]  # layer 3: experts 2 and 3 below 0.1 x 1/4
    assert alarm.update(10, starved) == []
    assert alarm.update(20, healthy) == []  # recovered: the count starts again
    assert alarm.update(30, starved) == []
    warnings = alarm.update(40, starved)
    assert len(warnings) == 2 and "layer 3 expert 2" in warnings[0] and "step 40" in warnings[0]
    assert "layer 3 expert 3" in warnings[1]
    assert alarm.update(50, starved) == []  # once, not at every check


def test_collapse_alarm_fires_on_a_collapsed_router(tmp_path, capsys):
    # Router weights at zero (lr 0, so they stay there) give every expert the same score; top_k
    # breaks ties by the lower index, so experts 0 and 1 take every token and 2..7 starve.
    config = smoke(**ONE, **{"train.lr": 0.0, "train.log_every": 1, "train.collapse_checks": 3,
                      "model.capacity_factor": 8.0, "train.stop_at": 3})
    from moejax.moe.layer import MoE

    real = MoE.__init__

    def zero_router(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.router[...] = self.router[...] * 0

    try:
        MoE.__init__ = zero_router
        train_and_evaluate(config, str(tmp_path))
    finally:
        MoE.__init__ = real
    out = capsys.readouterr().out
    for layer in (0, 1):
        for e in range(2, 8):
            assert f"step 3: router collapse? layer {layer} expert {e} got 0.0%" in out
        for e in (0, 1):
            assert f"layer {layer} expert {e} " not in out
