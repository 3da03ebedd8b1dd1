"""Issue #22, item 3: a streamed dataset resumes where it stopped, reading nothing twice,
through a shuffle buffer, over epochs (moejax/data/stream.py, a grain IterDataset)."""

import contextlib
import json
import logging
import re
import shutil

import numpy as np
import pytest
from etils import epath

from configs import tiny
from moejax.data import stream, text
from moejax.data.loader import DataState, DataStateSave


def write_shards(folder, docs=60, shards=4):
    """`docs` JSON documents over `shards` files; document 5 is long (it spans many rows)."""
    folder.mkdir(exist_ok=True)
    for s in range(shards):
        with open(folder / f"part-{s}.jsonl", "w") as f:
            for i in range(s, docs, shards):
                n = (i % 7 + 5) * (60 if i == 5 else 1)
                words = " ".join(f"{i}.{j}" for j in range(n))  # no two rows alike
                f.write(json.dumps({"body": f"document {i} {words}"}) + "\n")
    return folder


def stream_cfg(folder, **kw):
    cfg = tiny.get_config().data
    cfg.update(source="files", path=str(folder / "*.jsonl"), format="json", text_key="body",
               streaming=True, seq_len=16, batch_size=4, eval_fraction=0.2)
    cfg.update(**kw)
    return cfg


@pytest.fixture
def reads(monkeypatch):
    """Every document the streams read, in order (counted as Hugging Face hands it over)."""
    seen = []
    real = stream.hf_dataset

    def counting(cfg, streaming):
        return real(cfg, streaming).map(lambda doc: (seen.append(doc["body"]), doc)[1])

    monkeypatch.setattr(stream, "hf_dataset", counting)
    return seen


def saved_and_loaded(position, tmp_path):
    """The position as a checkpoint holds it: through the orbax item's own files."""
    handler, folder = DataState(), epath.Path(tmp_path / "item")
    folder.mkdir()
    handler.save(folder, DataStateSave(position))
    assert [p.name for p in folder.iterdir()] == ["process_0-of-1.npz"]
    return handler.restore(folder)


def reader(cfg, split="train", seed=0, rows=4):
    return iter(stream.StreamDataset(cfg, text.ByteTokenizer(), split, seed, rows))


@pytest.mark.parametrize("docs,buffer", [(60, 8), (60, 0), (5, 8)])
def test_a_resumed_stream_reads_on_and_nothing_twice(tmp_path, reads, docs, buffer):
    """2N batches straight == N, saved, restored in a new reader, N more; the two readers
    together read exactly the documents the straight one read, in its order. 5 short documents:
    the 2N batches take about three passes (epochs), the resume falls in the second."""
    cfg, n = stream_cfg(write_shards(tmp_path / "d", docs), shuffle_buffer=buffer), 3
    with contextlib.closing(reader(cfg)) as straight:
        want = [next(straight) for _ in range(2 * n)]
    read_straight, reads[:] = list(reads), []
    with contextlib.closing(reader(cfg)) as first:
        got = [next(first) for _ in range(n)]
        position = saved_and_loaded(first.get_state(), tmp_path)
    with contextlib.closing(reader(cfg)) as second:
        second.set_state(position)
        got += [next(second) for _ in range(n)]
    np.testing.assert_array_equal(np.stack(got), np.stack(want))
    assert reads == read_straight
    if docs == 5:
        assert straight.epoch >= 2 and second.epoch == straight.epoch
        assert len(read_straight) > 2 * 5
    else:
        assert len(set(read_straight)) == len(read_straight)  # one pass: each document once
    assert position["pending"].size or position["buffer"].size  # mid-document / a full buffer


def test_the_shuffle_buffer_draws_each_row_once_from_the_next_ones(tmp_path):
    folder = write_shards(tmp_path / "d")
    with contextlib.closing(reader(stream_cfg(folder, shuffle_buffer=0))) as plain:
        in_order = np.concatenate([next(plain) for _ in range(12)])  # 48 rows

    def shuffled(seed):
        with contextlib.closing(reader(stream_cfg(folder, shuffle_buffer=8), seed=seed)) as r:
            return np.concatenate([next(r) for _ in range(10)])  # 40 rows

    # Row k out is one of the first k + 8 in: each one once, and not in their order.
    index = {r.tobytes(): i for i, r in enumerate(in_order)}
    taken = [index[r.tobytes()] for r in shuffled(0)]
    assert len(set(taken)) == len(taken)
    assert all(t < k + 8 for k, t in enumerate(taken))
    assert taken != sorted(taken)
    assert not np.array_equal(shuffled(1), shuffled(0))


def test_a_short_stream_says_so(tmp_path):
    cfg = stream_cfg(write_shards(tmp_path / "d"))
    with contextlib.closing(reader(cfg, "eval")) as held_out, pytest.raises(ValueError) as e:
        for _ in range(1000):
            next(held_out)
    # The message as raised (grain adds a note on its traceback, not to the message).
    assert re.fullmatch(r"data: the eval stream ran out \(it holds \d+ eval tokens per pass\) "
                        r"at batch \d+", str(e.value))
    empty = stream_cfg(write_shards(tmp_path / "e", docs=1), eval_fraction=0.99)  # held out
    with contextlib.closing(reader(empty)) as train, pytest.raises(ValueError) as e:
        next(train)
    assert str(e.value).startswith("data: the train stream ran out (it holds 0 train")


def test_resume_of_a_streamed_run_is_exact(tmp_path, caplog, monkeypatch):
    """... and its held-out batches are read once, however many evaluations use them."""
    from moejax.train import train_and_evaluate

    folder = write_shards(tmp_path / "d", docs=120)
    opened = []  # the split of every reader opened
    real = stream.StreamIterator.__init__
    monkeypatch.setattr(stream.StreamIterator, "__init__",
                        lambda self, ds: (opened.append(ds.split), real(self, ds))[1])

    def smoke(**train):
        config = tiny.get_config("smoke")
        config.data.update(source="files", path=str(folder / "*.jsonl"), format="json",
                           text_key="body", streaming=True, shuffle_buffer=16,
                           eval_fraction=0.2)
        config.mesh.data = 1  # the stream's position, not the layout, is under test
        config.train.update(steps=4, warmup_steps=1, eval_every=2, eval_batches=1, ckpt_every=2,
                            **train)
        return config

    straight = train_and_evaluate(smoke(), str(tmp_path / "a"))
    assert sorted(straight["eval_loss"]) == [0, 2, 4] and opened.count("eval") == 1
    # The resumed run starts from the straight run's step-2 checkpoint, its newest once the
    # later one is gone: what a run stopped at step 2 leaves.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "4")
    saved = tmp_path / "b" / "checkpoints" / "2" / "data" / "process_0-of-1.npz"
    assert saved.exists()
    first = {step: straight["train_loss"][step] for step in (1, 2)}
    with caplog.at_level(logging.WARNING):
        second = train_and_evaluate(smoke(), str(tmp_path / "b"))["train_loss"]
    assert "skipping" not in caplog.text  # it read on from the saved position
    assert sorted(second) == [3, 4]
    assert {**first, **second} == straight["train_loss"]  # to the bit
