"""Several processes on loopback (gloo collectives) behave like one process with all devices.

Each process gets 4 CPU devices; the mesh is data=1 x expert=8, so the expert all-to-all
crosses processes. num_groups = 8 fixes the capacity groups on both sides.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config", "configs/tiny.py:smoke", "--config.mesh.data=1", "--config.mesh.expert=8",
        "--config.model.num_groups=8", "--config.train.log_every=1"]

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir, processes: int, *extra):
    """Processes write to files, not pipes: an unread pipe would stall a process mid-run."""
    devices = 8 // processes
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ["XLA_FLAGS"].replace("device_count=8",
                                                        f"device_count={devices}")}
    cmd = [sys.executable, "-m", "moejax.train", *ARGS, "--workdir", str(workdir), *extra]
    if processes > 1:
        port = free_port()
    procs = []
    for i in range(processes):
        flags = [] if processes == 1 else [
            "--coordinator", f"127.0.0.1:{port}", "--num_processes", str(processes),
            "--process_id", str(i)]
        log = open(f"{workdir}.{processes}.{i}.log", "w+")
        procs.append((subprocess.Popen(cmd + flags, cwd=REPO, env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    return procs


def wait(proc, timeout) -> str:
    p, log = proc
    p.wait(timeout=timeout)
    log.seek(0)
    return log.read()


def run(workdir, processes: int, *extra):
    procs = start(workdir, processes, *extra)
    outs = [wait(p, 600) for p in procs]
    for (p, _), out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outs


def losses(workdir) -> dict:
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "train/loss" in row:
                out[row["step"]] = row["train/loss"]
    return out


def test_two_processes_equal_one(tmp_path):
    run(tmp_path / "one", 1)
    outs = run(tmp_path / "two", 2)
    assert "2 host(s), 8 devices" in outs[0]
    assert "step 6/6" not in outs[1]  # only process 0 prints progress
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([two[s] for s in one], list(one.values()), rtol=2e-5)


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_checkpoint_moves_between_process_counts(tmp_path, first, second):
    run(tmp_path / "straight", 1)
    run(tmp_path / "moved", first, "--config.train.stop_at=3")
    run(tmp_path / "moved", second)
    straight, moved = losses(tmp_path / "straight"), losses(tmp_path / "moved")
    assert sorted(moved) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([moved[s] for s in range(4, 7)],
                               [straight[s] for s in range(4, 7)], rtol=2e-5)


def test_killed_process_stops_the_others_and_relaunch_resumes(tmp_path):
    """... from a streamed dataset: each process reads on from its own saved position."""
    from tests.test_stream import write_shards

    docs = write_shards(tmp_path.parent / f"{tmp_path.name}-docs", docs=200)
    streamed = ["--config.data.source=files", f"--config.data.path={docs}/*.jsonl",
                "--config.data.format=json", "--config.data.text_key=body",
                "--config.data.streaming=True", "--config.data.eval_fraction=0.2"]
    long = ["--config.train.steps=100000", "--config.train.ckpt_every=20",
            "--config.train.eval_every=100000", "--config.train.log_every=10", *streamed]
    # A dead peer is found when its heartbeats have been missing for this long.
    procs = start(tmp_path, 2, *long, "--heartbeat_timeout_s=20")
    ckpts = tmp_path / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts.exists() and any(d.name.isdigit() for d in ckpts.iterdir())):
        assert time.time() < deadline, "no checkpoint was written"
        time.sleep(1)
    time.sleep(3)
    procs[1][0].send_signal(signal.SIGKILL)
    killed_at = time.time()
    out = wait(procs[0], 240)  # the coordination service's heartbeat timeout bounds this
    assert procs[0][0].returncode != 0
    # Usually the coordination service reports the dead peer at its heartbeat timeout. Once
    # (1 run in 3) gloo failed first, on a message of the dead peer's with the wrong size; the
    # survivor still stopped, which is what this test is about.
    assert any(m in out for m in ("another task died", "unhealthy", "gloo::")), out[-2000:]
    assert time.time() - killed_at < 20 + 60
    wait(procs[1], 60)

    saved = sorted(int(d.name) for d in ckpts.iterdir() if d.name.isdigit())
    assert saved
    assert sorted(n for n in os.listdir(ckpts / str(saved[-1]) / "data") if
                  n.endswith(".npz")) == ["process_0-of-2.npz", "process_1-of-2.npz"]
    outs = run(tmp_path, 2, "--config.train.steps=100000",
               f"--config.train.stop_at={saved[-1] + 2}", "--config.train.log_every=1", *streamed)
    assert f"resumed from {tmp_path} at step {saved[-1]}" in outs[0]
    assert not any("skipping" in out for out in outs)  # both read on from their positions


def test_a_held_workdir_refuses_every_process_and_ctrl_c_saves_on_all(tmp_path):
    from tests.test_run_guards import holders

    (holder,) = holders(tmp_path, tmp_path / "go", 1, 300.0)
    (tmp_path / "go").touch()
    assert holder.stdout.readline() == "won\n"
    procs = start(tmp_path, 2)
    outs = [wait(p, 300) for p in procs]
    holder.kill()
    holder.wait()
    assert [p.returncode for p, _ in procs] == [1, 1], outs
    assert f"error: --workdir='{tmp_path}': in use by process {holder.pid} on " in outs[0]
    assert "error: --workdir=" in outs[1] and "process 0 was refused its lock" in outs[1]
    assert not (tmp_path / "checkpoints").exists()

    # Ctrl-C reaches one process (a terminal sends it to the whole job; a scheduler may not):
    # both stop at the same step with a checkpoint of it, and the same command resumes.
    long = ["--config.train.steps=100000", "--config.train.ckpt_every=100000",
            "--config.train.eval_every=100000", "--config.train.log_every=1"]
    procs = start(tmp_path, 2, *long)
    deadline = time.time() + 300
    while "step 3/" not in open(f"{tmp_path}.2.0.log").read():
        assert time.time() < deadline and procs[0][0].poll() is None, "no step 3"
        time.sleep(0.5)
    procs[1][0].send_signal(signal.SIGINT)
    outs = [wait(p, 240) for p in procs]
    assert [p.returncode for p, _ in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    saved = sorted(int(d.name) for d in (tmp_path / "checkpoints").iterdir() if d.name.isdigit())
    assert len(saved) == 1 and f"preempted: saved step {saved[0]} in {tmp_path}" in outs[0]
    assert not (tmp_path / "lock").exists()
    outs = run(tmp_path, 2, *long[:-1], f"--config.train.stop_at={saved[0] + 1}")
    assert f"resumed from {tmp_path} at step {saved[0]}" in outs[0]
