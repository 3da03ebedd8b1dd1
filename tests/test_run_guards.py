"""Issue #20: guards around a run's workdir: one run per workdir (the lock), Ctrl-C saves,
a resumed run says what changed and refuses to do nothing, metrics.jsonl holds each step once,
and the first rate excludes compilation.

One scenario (`resumed`) runs the real trainer twice on one workdir, the tests read it.
"""

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from moejax import config_lib, train
from moejax.data import loader
from moejax.data.batches import make_batches
from moejax.run import state, workdir as workdir_lib
from moejax.run.checkpoint import Checkpoints
from moejax.run.metrics import Progress
from tests.test_train import smoke

FAST = {"mesh.data": 1, "train.eval_batches": 1, "train.keep_best": False, "train.log_every": 1}


def snapshot(root):
    """Every path under root with its size and mtime: what a refused run must leave alone."""
    return {os.path.join(d, n): (os.stat(os.path.join(d, n)).st_size,
                                 os.stat(os.path.join(d, n)).st_mtime_ns)
            for d, dirs, files in os.walk(root) for n in dirs + files}


def write_lock(workdir, pid, host=None):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "lock"), "w") as f:
        json.dump({"pid": pid, "host": host or socket.gethostname(),
                   "since": "2025-01-02 03:04:05"}, f)


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------------------------
# The lock: a second trainer on a workdir is refused before anything is built or written.

def test_a_workdir_in_use_is_refused_before_anything_is_built(tmp_path, live_pid, monkeypatch):
    def built(*args):
        raise AssertionError("the model was built for a refused run")

    monkeypatch.setattr(state, "setup", built)
    monkeypatch.setattr(train, "make_batches", built)
    workdir = tmp_path / "run"
    write_lock(workdir, live_pid)
    (workdir / "metrics.jsonl").write_text('{"step": 0}\n')
    before = snapshot(workdir)
    with pytest.raises(config_lib.ConfigError) as e:
        train.train_and_evaluate(smoke(), str(workdir))
    assert str(e.value) == (
        f"--workdir='{workdir}': in use by process {live_pid} on {socket.gethostname()} since "
        "2025-01-02 03:04:05; allowed: a workdir no other run uses")
    assert snapshot(workdir) == before


def test_a_lock_from_another_host_is_refused_with_how_to_clear_it(tmp_path, dead_pid):
    write_lock(tmp_path, dead_pid, host="elsewhere")  # no way to check its pid from here
    with pytest.raises(config_lib.ConfigError) as e, workdir_lib.lock(str(tmp_path)):
        pass
    assert str(e.value) == (
        f"--workdir='{tmp_path}': in use by process {dead_pid} on elsewhere since 2025-01-02 "
        f"03:04:05; allowed: a workdir no other run uses, or remove {tmp_path}/lock if that run "
        "has ended (another host: its process cannot be checked from here)")


@pytest.mark.parametrize("content", ["dead", "torn"])
def test_a_stale_lock_is_taken_over_and_released_on_exit(tmp_path, dead_pid, capsys, content):
    if content == "dead":
        write_lock(tmp_path, dead_pid)
    else:  # killed between creating the file and writing it
        (tmp_path / "lock").write_text('{"pid": ')
    with pytest.raises(RuntimeError), workdir_lib.lock(str(tmp_path)):
        held = json.loads((tmp_path / "lock").read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        raise RuntimeError("the run failed")
    assert not (tmp_path / "lock").exists()  # released on the exception too
    what = (f"process {dead_pid} on {socket.gethostname()} since 2025-01-02 03:04:05, no longer "
            "running" if content == "dead" else "unreadable")
    assert capsys.readouterr().out == (
        f"workdir: taking over the stale lock {tmp_path}/lock ({what})\n")


def test_the_lock_is_only_removed_by_its_holder(tmp_path, live_pid):
    with workdir_lib.lock(str(tmp_path)):
        write_lock(tmp_path, live_pid)  # someone removed ours and took it: not ours to remove
    assert json.loads((tmp_path / "lock").read_text())["pid"] == live_pid


HOLDER = """
import os, sys, time
from moejax.run import workdir
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
try:
    with workdir.lock(sys.argv[1]):
        print("won", flush=True)
        time.sleep(float(sys.argv[3]))
except workdir.ConfigError as e:
    print("refused", e, flush=True)
"""


def holders(workdir, go, n, hold_s):
    """n processes that take workdir's lock at once when `go` appears, each holding it hold_s."""
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir), str(go), str(hold_s)],
                              stdout=subprocess.PIPE, text=True) for _ in range(n)]
    for p in procs:
        assert p.stdout.readline() == "ready\n"
    return procs


@pytest.mark.slow  # four processes: 11 s
def test_of_several_starts_on_a_dead_runs_lock_exactly_one_wins(tmp_path, dead_pid):
    write_lock(tmp_path, dead_pid)
    procs = holders(tmp_path, tmp_path / "go", 4, 3.0)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert sum("won" in out for out in outs) == 1, outs
    assert sum("refused" in out for out in outs) == 3, outs
    assert not (tmp_path / "lock").exists()


def test_a_live_holder_refuses_and_its_kill_frees_the_lock(tmp_path):
    (holder,) = holders(tmp_path, tmp_path / "go", 1, 120.0)
    (tmp_path / "go").touch()
    assert holder.stdout.readline() == "won\n"
    with pytest.raises(config_lib.ConfigError, match=f"in use by process {holder.pid} on "), \
            workdir_lib.lock(str(tmp_path)):
        pass
    holder.kill()  # no cleanup: the file stays, naming a dead process, but the flock is gone
    holder.wait()
    with workdir_lib.lock(str(tmp_path)):
        assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()


# ---------------------------------------------------------------------------------------------
# Signals: Ctrl-C is a preemption; a second one stops at once.

def test_ctrl_c_and_sigterm_ask_to_stop_a_second_ctrl_c_stops_now():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    for sig, reason in ((signal.SIGINT, "interrupted"), (signal.SIGTERM, "preempted")):
        with train.preemption_notice() as stop:
            assert stop(1) is None
            os.kill(os.getpid(), sig)
            assert stop(1) == reason
            if sig == signal.SIGINT:
                with pytest.raises(KeyboardInterrupt):
                    os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_progress_has_no_rate_until_a_step_after_the_compiling_one():
    progress = Progress(total_steps=10, tokens_per_step=100)
    assert progress.tick(1) is None  # not started: the first step compiles
    progress.start(1)
    assert progress.tick(1) is None
    time.sleep(0.01)
    perf = progress.tick(3)
    assert 0 < perf["perf/step_ms"] < 1e3 and perf["eta_s"] == pytest.approx(
        7 * perf["perf/step_ms"] / 1e3)


# ---------------------------------------------------------------------------------------------
# The scenario: Ctrl-C at step 2; a relaunch with another lr (after a launch that logged step 5
# but never saved it); relaunches with nothing left to train.

def run(config, workdir):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            return train.train_and_evaluate(config, str(workdir)), out.getvalue()
        except config_lib.ConfigError as e:
            return e, out.getvalue()


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("resumed")
    def interrupting(cfg, tokenizer, split, seed, model=None):
        batches = make_batches(cfg, tokenizer, split, seed, model)
        if split == "train":  # Ctrl-C while step 2's batch (its first row) is read
            batches.rows = batches.rows.map_with_index(lambda p, row: (
                p == cfg.batch_size and os.kill(os.getpid(), signal.SIGINT), row)[1])
        return batches

    train.make_batches = interrupting
    prefetch, loader.PREFETCH = loader.PREFETCH, 0  # the loop itself reads step 2's batch
    try:
        first = run(smoke(**FAST), workdir)
    finally:
        train.make_batches, loader.PREFETCH = make_batches, prefetch
    saved = Checkpoints(str(workdir), 2, False).latest.all_steps()
    metrics = workdir / "metrics.jsonl"
    logged = metrics.read_text()
    # What a launch killed after logging step 5, before saving it, leaves: rows past the
    # checkpoint, and a row cut off mid-write.
    with open(metrics, "a") as f:
        f.write('{"step": 5, "train/loss": 1.0}\n{"step": 5, "train/lo')
    second = run(smoke(**FAST, **{"train.lr": 1e-3, "train.stop_at": 3}), workdir)
    rows = metrics.read_text()
    before = snapshot(workdir)
    again = [run(smoke(**FAST, **overrides), workdir) for overrides in
             ({"train.lr": 1e-3, "train.stop_at": 3}, {"train.steps": 3, "train.warmup_steps": 1})]
    return {"workdir": workdir, "first": first, "saved": saved, "second": second, "logged": logged,
            "rows": rows, "again": again, "unchanged": snapshot(workdir) == before}


def test_ctrl_c_saves_the_step_and_returns_cleanly(resumed):
    history, out = resumed["first"]
    workdir = resumed["workdir"]
    assert sorted(history["train_loss"]) == [1, 2]
    assert (f"interrupted: saved step 2 in {workdir}; run the same command again to resume"
            in out.splitlines())
    assert resumed["saved"] == [2]


def test_compile_time_is_its_own_line_and_the_rate_starts_after_it(resumed):
    lines = resumed["first"][1].splitlines()
    (compiled,) = [i for i, ln in enumerate(lines) if ln.startswith("compiled train step in ")]
    assert lines[compiled].endswith(" s")
    step1, step2 = (next(ln for ln in lines if ln.startswith(f"step {s}/6 ")) for s in (1, 2))
    assert compiled < lines.index(step1)
    assert "tok/s" not in step1 and "ETA" not in step1  # step 1 compiled: no rate yet
    assert " tok/s " in step2 and " ETA " in step2
    rows = [json.loads(ln) for ln in resumed["logged"].splitlines()]
    assert [r["step"] for r in rows if "perf/tokens_per_s" in r] == [2]


def test_a_resumed_run_prints_each_changed_key_and_keeps_each_launch_config(resumed):
    history, out = resumed["second"]
    workdir = resumed["workdir"]
    assert sorted(history["train_loss"]) == [3]
    assert [ln for ln in out.splitlines() if ln.startswith("config: ")] == [
        "config: train.lr 0.003 -> 0.001 (resumed run)",
        "config: train.stop_at 0 -> 3 (resumed run)"]
    launches = {p.name: json.loads(p.read_text())["train"]
                for p in (workdir / "configs").iterdir()}
    assert {n: t["lr"] for n, t in launches.items()} == {"launch-0.json": 3e-3,
                                                          "launch-2.json": 1e-3}
    assert json.loads((workdir / "config.json").read_text())["train"]["lr"] == 1e-3
    assert not (workdir / "lock").exists()


def test_metrics_hold_each_step_once_after_a_resume(resumed):
    rows = [json.loads(ln) for ln in resumed["rows"].splitlines()]  # the torn row is gone too
    assert sorted({r["step"] for r in rows}) == [0, 1, 2, 3]
    losses = [r["step"] for r in rows if "train/loss" in r]
    assert losses == [1, 2, 3]  # step 5 of the launch that never saved it is gone
    first = [json.loads(ln) for ln in resumed["logged"].splitlines()]
    assert rows[:len(first)] == first  # what the checkpointed steps logged is kept as it was


@pytest.mark.parametrize("index,error", [
    (0, "train.stop_at=3: the checkpoint is at step 3; nothing to train; allowed: > 3 or 0 "
        "(never)"),
    (1, "train.steps=3: the checkpoint is at step 3; nothing to train; allowed: > 3")])
def test_resuming_with_nothing_to_train_says_so_and_writes_nothing(resumed, index, error):
    e, _ = resumed["again"][index]
    assert isinstance(e, config_lib.ConfigError) and str(e) == error
    assert resumed["unchanged"]
