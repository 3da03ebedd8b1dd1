"""Issue #20: every checkpoint damaged never starts a run over silently, and `generate` falls
back past damaged checkpoints without writing into the workdir it reads."""

import hashlib
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from moejax import config_lib, generate as gen, parallel, train
from moejax.run import state
from moejax.run.checkpoint import Checkpoints
from tests.test_reliability import REPO, damage, largest_file, run_cli, toy_state
from tests.test_train import smoke


def config():
    return smoke(**{"model.vocab_size": 257})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A smoke run's workdir: checkpoints/3 and /6, best/3, config.json. Every array of step
    N holds N, so a test can tell which one was read. Nothing compiled: a second or two."""
    workdir = tmp_path_factory.mktemp("saved")
    abstract = state.setup(config(), parallel.make_mesh({})).abstract
    ckpt = Checkpoints(str(workdir), 2, True)
    for step, eval_loss in ((3, 2.0), (6, None)):
        filled = jax.tree.map(lambda a, n=step: np.full(a.shape, n, a.dtype), abstract)
        ckpt.save(step, filled, {"step": step, "tokens_seen": 0}, eval_loss)
    ckpt.close()
    (workdir / "config.json").write_text(config().to_json_best_effort())
    return workdir


@pytest.fixture
def run(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "run")
    return tmp_path / "run"


def hashes(root):
    """relative path -> sha256 of every file under root."""
    return {os.path.relpath(os.path.join(d, f), root):
            hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, fs in os.walk(root) for f in fs}


def contents(root):
    """The multiset of file hashes: what a rename keeps and a delete or overwrite does not."""
    return sorted(hashes(root).values())


def break_steps(run, *dirs):
    for d in dirs:
        damage(largest_file(run / d), "truncate")  # the array data


# ---------------------------------------------------------------------------------------------
# train: every checkpoint in checkpoints/ damaged.

def test_every_checkpoint_damaged_resumes_from_best(run, caplog):
    break_steps(run, "checkpoints/3", "checkpoints/6")
    best = hashes(run / "best")
    abstract = state.setup(config(), parallel.make_mesh({})).abstract
    ckpt = Checkpoints(str(run), 2, True)  # what train_and_evaluate opens and restores
    with caplog.at_level(logging.WARNING):
        restored, meta = ckpt.restore_latest(abstract)
    assert meta["step"] == 3 and all((x == 3).all() for x in jax.tree.leaves(restored))
    for step in (6, 3):
        assert f"checkpoint {run}/checkpoints/{step} does not restore (" in caplog.text
    assert (f"no checkpoint in {run}/checkpoints restores: resuming from the best one, "
            f"{run}/best/3") in caplog.text
    ckpt.save(4, restored, {"step": 4, "tokens_seen": 0})  # the resumed run goes on
    ckpt.close()
    assert hashes(run / "best") == best  # the good one: untouched
    assert Checkpoints(str(run), 2, True).latest.all_steps() == [4]


def test_nothing_intact_refuses_to_start_over(run):
    break_steps(run, "checkpoints/3", "checkpoints/6", "best/3")
    before = contents(run)
    with pytest.raises(config_lib.ConfigError) as e:
        train.train_and_evaluate(smoke(), str(run))
    message = str(e.value)
    assert message.startswith(
        f"train.restart_if_damaged=False: no checkpoint in {run}/checkpoints or {run}/best "
        "restores, and damaged ones were there (set aside: checkpoints/3.broken-")
    assert message.endswith("; allowed: repair one, or --config.train.restart_if_damaged=True "
                            "to start over at step 0") and "\n" not in message
    assert contents(run) == before  # set aside (renamed), nothing deleted or written
    assert not (run / "checkpoints" / "3").exists() and not (run / "best" / "3").exists()
    # The next launch finds only set-aside ones: it refuses again, as one line, exit status 1.
    out = run_cli(run)
    assert out.returncode == 1, out.stderr[-3000:]
    assert out.stderr.splitlines()[-1] == f"error: {message}", out.stderr[-3000:]
    assert contents(run) == before


def test_restart_if_damaged_starts_over_and_says_so(tmp_path, caplog):
    ckpt = Checkpoints(str(tmp_path), 2, True)
    ckpt.save(3, toy_state(3), {"step": 3}, eval_loss=1.0)
    ckpt.close()
    break_steps(tmp_path, "checkpoints/3", "best/3")
    with caplog.at_level(logging.WARNING):
        assert Checkpoints(str(tmp_path), 2, True).restore_latest(
            toy_state(0), restart_if_damaged=True) is None
    assert (f"no checkpoint in {tmp_path}/checkpoints or {tmp_path}/best restores: starting "
            "over at step 0 (train.restart_if_damaged=True)") in caplog.text
    with pytest.raises(config_lib.ConfigError, match="train.restart_if_damaged=False"):
        Checkpoints(str(tmp_path), 2, True).restore_latest(toy_state(0))
    assert tiny.get_config().train.restart_if_damaged is False  # the default: refuse


def test_no_checkpoint_or_only_half_written_starts_at_zero(tmp_path):
    # Killed during its first save: nothing intact was ever there, so nothing is lost.
    assert Checkpoints(str(tmp_path), 2, True).restore_latest(toy_state(0)) is None
    os.makedirs(tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp")
    assert Checkpoints(str(tmp_path), 2, True).restore_latest(toy_state(0)) is None


# ---------------------------------------------------------------------------------------------
# generate: falls back like train, reads only.

def first_param(model):
    return float(jax.tree.leaves(model)[0].ravel()[0])


@pytest.mark.parametrize("broken,step,where", [
    (("checkpoints/6",), 3, "checkpoints"),
    (("checkpoints/3", "checkpoints/6"), 3, "best"),
], ids=["newest damaged", "all of checkpoints/ damaged"])
def test_generate_skips_damaged_checkpoints(run, caplog, broken, step, where):
    break_steps(run, *broken)
    before = hashes(run)
    with caplog.at_level(logging.WARNING):
        _, model, got = gen.load(str(run))
    assert got == step and first_param(model) == step
    for d in broken:
        assert f"checkpoint {run}/{d} does not restore (" in caplog.text
    if where == "best":
        assert (f"no checkpoint in {run}/checkpoints restores: using the best one, "
                f"{run}/best/3") in caplog.text
    assert hashes(run) == before  # nothing moved, written or created


def test_generate_nothing_intact_is_one_line(run):
    break_steps(run, "checkpoints/3", "checkpoints/6", "best/3")
    before = hashes(run)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "moejax.generate", "--workdir", str(run)],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 1
    lines = [ln for ln in out.stderr.splitlines() if "does not restore" not in ln]
    assert lines == [f"error: --workdir={str(run)!r}: no checkpoint in {run}/checkpoints or "
                     f"{run}/best restores (all damaged); allowed: the --workdir of a run with "
                     "an intact checkpoint"], out.stderr[-3000:]
    assert hashes(run) == before


NO_CONFIG = ("no config.json in it; allowed: the workdir of a run (train) or of a conversion "
             "(convert from-hf)")


@pytest.mark.parametrize("case,error", [
    ("missing", NO_CONFIG),
    ("empty", NO_CONFIG),
    ("config only", "no checkpoints/ in it; allowed: the --workdir of a run that saved a "
     "checkpoint"),
    ("empty checkpoints/", "no checkpoint in {run}/checkpoints; allowed: the --workdir of a run "
     "that saved one"),
], ids=["missing", "empty", "config only", "empty checkpoints"])
def test_generate_without_checkpoints_is_one_line_and_creates_nothing(run, case, error):
    if case in ("missing", "empty"):
        shutil.rmtree(run)
        if case == "empty":
            run.mkdir()
    else:
        shutil.rmtree(run / "checkpoints")
        shutil.rmtree(run / "best")
        if case == "empty checkpoints/":
            (run / "checkpoints").mkdir()
    before = hashes(run) if run.exists() else None
    with pytest.raises(SystemExit) as e:
        gen.load(str(run))
    assert e.value.code == f"error: --workdir={str(run)!r}: {error.format(run=run)}"
    assert (hashes(run) if run.exists() else None) == before
    assert (run / "checkpoints").exists() == (case == "empty checkpoints/")
    assert not (run / "best").exists()
