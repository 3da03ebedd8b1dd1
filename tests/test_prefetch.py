"""The train loader runs ahead of the step in a background thread (moejax/prefetch.py)."""

import json
import threading
import time

import numpy as np
import pytest

from configs import tiny
from moejax import data, train
from moejax.prefetch import Prefetcher


def wait_until(condition, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def test_batches_come_in_order():
    with Prefetcher(lambda i: 10 * i, 3, 9) as batches:
        assert [batches.get(i) for i in range(3, 9)] == [30, 40, 50, 60, 70, 80]


def test_never_more_than_depth_batches_ahead():
    made = []
    with Prefetcher(made.append, 0, 100, depth=2) as batches:
        assert wait_until(lambda: len(made) == 2)
        time.sleep(0.1)
        assert made == [0, 1]  # the thread waits for a slot
        batches.get(0)
        assert wait_until(lambda: len(made) == 3)
        time.sleep(0.1)
        assert made == [0, 1, 2]


def test_an_error_is_raised_at_the_batch_that_needed_it():
    def make(i):
        if i == 2:
            raise ValueError("data: the train stream ran out at step 2")
        return i

    batches = Prefetcher(make, 0, 10)
    assert batches.get(0) == 0 and batches.get(1) == 1
    with pytest.raises(ValueError, match="ran out at step 2"):
        batches.get(2)
    batches.close()
    assert not batches.thread.is_alive()


@pytest.mark.parametrize("busy", [False, True])
def test_close_stops_the_thread(busy):
    # busy: the thread is inside a slow make(i); else it waits for a slot.
    batches = Prefetcher(lambda i: time.sleep(0.2 if busy else 0), 0, 10**6, depth=1)
    assert batches.thread.daemon  # a read that never returns cannot hold the process
    time.sleep(0.05)
    batches.close()
    assert not batches.thread.is_alive()


def test_waited_ms_is_the_time_get_blocked():
    def slow(i):
        time.sleep(0.02)
        return i

    sync = Prefetcher(slow, 0, 3, depth=0)  # no thread: get() builds the batch itself
    assert [sync.get(i) for i in range(3)] == [0, 1, 2]
    assert sync.waited_ms() >= 20 and sync.waited_ms() == 0  # mean, then reset
    with Prefetcher(slow, 0, 3, depth=2) as ahead:
        time.sleep(0.1)  # both slots filled meanwhile
        ahead.get(0), ahead.get(1)
        assert ahead.waited_ms() < 5


class SlowStream:
    """Batches-like: rows a fixed function of the step, each batch SLEEP_S to read, and no
    batch `ends_at` (like a finite stream, with data.py's message)."""

    def __init__(self, seq_len, sleep_s, ends_at=None):
        self.seq_len, self.sleep_s, self.ends_at = seq_len, sleep_s, ends_at
        self.threads = set()

    def host_rows(self, step, rows):
        self.threads.add(threading.current_thread().name)
        time.sleep(self.sleep_s)
        if step == self.ends_at:
            raise ValueError(f"data: the train stream ran out at step {step}")
        rng = np.random.default_rng(step)
        return rng.integers(0, 256, (rows.stop - rows.start, self.seq_len + 1), np.int32)


def test_step_does_not_wait_on_a_slow_loader(tmp_path, monkeypatch):
    # tiny:smoke with a 4096-token batch (its step: 100+ ms on 2 CPU cores); a loader taking
    # 30 ms a batch, in the loop, would add 30 ms to every step.
    sleep_s, config = 0.03, tiny.get_config("smoke")
    config.data.update(batch_size=64, seq_len=64)
    config.train.update(steps=12, log_every=5, eval_every=100, eval_batches=1, ckpt_every=100)
    stream = SlowStream(64, sleep_s, ends_at=10)
    monkeypatch.setattr(data, "make_batches", lambda cfg, tok, split, seed: (
        stream if split == "train" else SlowStream(64, 0.0)))
    with pytest.raises(ValueError, match="the train stream ran out at step 10"):
        train.train_and_evaluate(config, str(tmp_path))  # step 11 needs batch 10
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    perf = {r["step"]: r for r in rows if "perf/data_wait_ms" in r}
    assert sorted(perf) == [5, 10]
    for r in perf.values():  # the mean wait over steps 2-5 and 6-10
        assert r["perf/data_wait_ms"] < 1e3 * sleep_s / 4, r
    assert stream.threads == {"moejax-prefetch"}  # never read by the loop itself
    assert not [t for t in threading.enumerate() if t.name == "moejax-prefetch"]
