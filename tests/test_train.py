"""End-to-end: the real trainer on the smoke variant of the tiny config."""

import glob
import os
import shutil
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from moejax.train import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke(**overrides):
    config = tiny.get_config("smoke")
    for key, value in overrides.items():
        group, name = key.split(".")
        config[group][name] = value
    return config


# A peak FLOP/s makes the run log perf/mfu (test_tensorboard_holds_every_metric); the logs
# are all it changes.
PEAK = {"train.peak_tflops": 1.0}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted smoke run: its workdir and what it returned."""
    workdir = tmp_path_factory.mktemp("straight")
    return workdir, train_and_evaluate(smoke(**PEAK), str(workdir))


def test_resume_is_exact(straight, tmp_path):
    workdir, straight = straight[0], straight[1]["train_loss"]
    # The uninterrupted run's workdir with its step-6 checkpoint gone: what a run stopped after
    # step 3 leaves (train.stop_at saves as the periodic checkpoint did).
    shutil.copytree(workdir, tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")
    second = train_and_evaluate(smoke(**PEAK), str(tmp_path / "b"))["train_loss"]
    assert sorted(second) == [4, 5, 6]
    resumed = {**{step: straight[step] for step in (1, 2, 3)}, **second}
    assert resumed == straight  # to the bit


# Evaluated at the first and last step, saved at the last: the runs below compare losses (the
# periodic evaluations and saves: the runs above).
ENDS = {"train.eval_every": 100, "train.ckpt_every": 100}


def test_same_losses_on_8_devices_and_on_1(tmp_path):
    # num_groups = 8 fixes the capacity groups, so both runs drop the same tokens.
    one = train_and_evaluate(smoke(**ENDS, **{"mesh.data": 1, "mesh.expert": 1,
                                              "model.num_groups": 8}), str(tmp_path / "one"))
    eight = train_and_evaluate(smoke(**ENDS, **{"mesh.data": 2, "mesh.expert": 4,
                                                "model.num_groups": 8}), str(tmp_path / "eight"))
    assert jax.device_count() == 8
    steps = sorted(one["train_loss"])
    np.testing.assert_allclose([eight["train_loss"][s] for s in steps],
                               [one["train_loss"][s] for s in steps], rtol=2e-5)
    np.testing.assert_allclose(eight["eval_loss"][6], one["eval_loss"][6], rtol=2e-5)


def test_dense_variant_has_no_experts(tmp_path):
    # One device: that a model without experts trains does not depend on the layout (data
    # parallelism: the other tests here).
    out = train_and_evaluate(smoke(**ENDS, **{"model.num_experts": 0, "mesh.data": 1}),
                             str(tmp_path))
    assert out["eval_loss"][6] < out["eval_loss"][0]


def read_events(path):
    """Tag -> number of values, from a TensorBoard event file (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    tags = {}
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            event = event_pb2.Event.FromString(f.read(length))
            f.read(4)
            for value in event.summary.value:
                tags[value.tag] = tags.get(value.tag, 0) + 1
    return tags


def test_tensorboard_holds_every_metric(straight):
    tmp_path = straight[0]
    (events,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    tags = read_events(events)
    for name in ["train/loss", "train/ce_loss", "train/balance_loss", "train/z_loss", "eval/loss",
                 "eval/ppl", "opt/lr", "opt/grad_norm", "perf/tokens_per_s", "perf/step_ms",
                 "perf/mfu", "moe/layer_00/dropped_frac", "moe/layer_01/load/expert_07",
                 "moe/expert_load"]:
        assert name in tags, name
    assert os.path.exists(tmp_path / "config.json")
    assert os.path.exists(tmp_path / "metrics.jsonl")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "moejax.train", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": os.environ[
                              "XLA_FLAGS"].replace("--xla_force_host_platform_device_count=8",
                                                   "")})  # one device


def test_misspelled_override_fails_with_one_line(tmp_path):
    out = run_cli("--config", "configs/tiny.py:smoke", "--workdir", str(tmp_path),
                  "--config.train.stepz=3")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "stepz" in lines[0], out.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.slow
def test_cli_override_and_generate(tmp_path):
    out = run_cli("--config", "configs/tiny.py:smoke", "--workdir", str(tmp_path),
                  "--config.train.steps=4", "--config.model.num_experts=4")
    assert out.returncode == 0, out.stderr
    assert "step 4/4" in out.stdout and "4 experts" in out.stdout
    gen = subprocess.run([sys.executable, "-m", "moejax.generate", "--workdir", str(tmp_path),
                          "--prompt", "def ", "--tokens", "8"], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert gen.returncode == 0, gen.stderr
    assert "# step 4" in gen.stdout and "def " in gen.stdout
