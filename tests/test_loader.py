"""The train loader: grain reads ahead of the step in a background thread and its state goes
with every checkpoint (moejax/data/loader.py)."""

import json
import threading
import time

import grain
import numpy as np
import pytest

from configs import tiny
from moejax import parallel, train
from moejax.data import loader
from moejax.data.batches import Batches

MESH_DEVICES = 8


def wait_until(condition, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


class Rows:
    """Row p is [p, p, ...] (seq_len + 1 = 3 tokens), read in `sleep_s`; reading row `fails_at`
    raises the stream's message; `read` records each row read and the thread that read it."""

    def __init__(self, sleep_s=0.0, fails_at=None):
        self.sleep_s, self.fails_at, self.read = sleep_s, fails_at, []

    def __len__(self):
        return 10**12

    def __getitem__(self, p):
        self.read.append((p, threading.current_thread().name))
        time.sleep(self.sleep_s)
        if p == self.fails_at:
            raise ValueError(f"data: the train stream ran out at row {p}")
        return np.full(3, p, np.int32)


def make_loader(rows, step=0, depth=2, batch=8):
    mesh = parallel.make_mesh({"data": MESH_DEVICES})
    batches = Batches(grain.MapDataset.source(rows), batch)
    return loader.Loader(batches, parallel.token_sharding(mesh), (batch, 3), step, depth=depth)


def test_batches_come_in_order_from_the_step():
    ahead = make_loader(Rows(), step=3)
    try:
        for step in range(3, 9):
            np.testing.assert_array_equal(np.asarray(next(ahead)["tokens"])[:, 0],
                                          np.arange(8 * step, 8 * step + 8))
        assert ahead.state() == {"next_index": 9}  # before the next batch
    finally:
        ahead.close()


def test_never_more_than_depth_batches_ahead():
    rows = Rows()
    ahead = make_loader(rows, depth=2)
    try:
        # depth batches wait in grain's queue, one more waits to enter it; then it stops.
        assert wait_until(lambda: len(rows.read) == 3 * 8)
        time.sleep(0.1)
        assert len(rows.read) == 3 * 8
        next(ahead)
        assert wait_until(lambda: len(rows.read) == 4 * 8)
        time.sleep(0.1)
        assert len(rows.read) == 4 * 8
    finally:
        ahead.close()


def test_an_error_is_raised_at_the_batch_that_needed_it():
    ahead = make_loader(Rows(fails_at=2 * 8 + 5))
    try:
        next(ahead), next(ahead)
        with pytest.raises(ValueError, match="ran out at row 21"):
            next(ahead)
    finally:
        ahead.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("grain-thread-prefetch")]


@pytest.mark.parametrize("busy", [False, True])
def test_close_stops_the_thread(busy):
    # busy: the thread is inside a slow read; else it waits for room in the queue.
    ahead = make_loader(Rows(sleep_s=0.05 if busy else 0), depth=1)
    threads = [t for t in threading.enumerate() if t.name.startswith("grain-thread-prefetch")]
    assert threads and all(t.daemon for t in threads)  # a read that never returns cannot
    time.sleep(0.05)                                   # hold the process
    ahead.close()
    assert wait_until(lambda: not any(t.is_alive() for t in threads))


def test_waited_ms_is_the_time_next_blocked():
    in_step = make_loader(Rows(sleep_s=0.0025), depth=0)  # no thread: next() reads itself
    try:
        [next(in_step) for _ in range(3)]
        assert in_step.waited_ms() >= 20 and in_step.waited_ms() == 0  # mean, then reset
    finally:
        in_step.close()
    ahead = make_loader(Rows(sleep_s=0.0025), depth=2)
    try:
        time.sleep(0.2)  # both slots filled meanwhile
        next(ahead), next(ahead)
        assert ahead.waited_ms() < 5
    finally:
        ahead.close()


def test_step_does_not_wait_on_a_slow_loader(tmp_path, monkeypatch):
    # tiny:smoke with a 4096-token batch (its step: 100+ ms on 2 CPU cores); a loader taking
    # 30 ms a batch, in the loop, would add 30 ms to every step.
    config = tiny.get_config("smoke")
    config.data.update(batch_size=64, seq_len=64)
    config.train.update(steps=12, log_every=5, eval_every=100, eval_batches=1, ckpt_every=100)
    sleep_s = 0.03

    class Slow(Rows):  # random tokens, 30 ms a batch; batch 10 cannot be read
        def __getitem__(self, p):
            super().__getitem__(p)
            return np.random.default_rng(p).integers(0, 256, 65, np.int32)

    rows = Slow(sleep_s=sleep_s / 64, fails_at=10 * 64)
    monkeypatch.setattr(train, "make_batches", lambda cfg, tok, split, seed, model: Batches(
        grain.MapDataset.source(rows if split == "train" else Slow()), 64))
    with pytest.raises(ValueError, match="the train stream ran out at row 640"):
        train.train_and_evaluate(config, str(tmp_path))  # step 11 needs batch 10
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    perf = {r["step"]: r for r in logged if "perf/data_wait_ms" in r}
    assert sorted(perf) == [5, 10]
    for r in perf.values():  # the mean wait over steps 2-5 and 6-10
        assert r["perf/data_wait_ms"] < 1e3 * sleep_s / 4, r
    # Never read by the loop itself; the thread gone once the run stopped.
    assert {name.split("-")[:3] == ["grain", "thread", "prefetch"] for _, name in rows.read} \
        == {True}
    assert not [t for t in threading.enumerate() if t.name.startswith("grain-thread-prefetch")]
