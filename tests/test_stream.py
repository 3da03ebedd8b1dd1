"""Issue #22, item 3: a streamed dataset resumes where it stopped, reading nothing twice,
through a shuffle buffer, over epochs (moejax/stream.py)."""

import json
import logging

import numpy as np
import pytest
from etils import epath

from configs import tiny
from moejax import data, stream


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
    handler, folder = stream.PositionHandler(), epath.Path(tmp_path / "item")
    folder.mkdir()
    handler.save(folder, stream.PositionSave(position))
    assert [p.name for p in folder.iterdir()] == ["process_0-of-1.npz"]
    return handler.restore(folder)


@pytest.mark.parametrize("docs,buffer", [(60, 8), (60, 0), (5, 8)])
def test_a_resumed_stream_reads_on_and_nothing_twice(tmp_path, reads, docs, buffer):
    """2N batches straight == N, saved, restored in a new reader, N more; the two readers
    together read exactly the documents the straight one read, in its order. 5 short documents:
    the 2N batches take about three passes (epochs), the resume falls in the second."""
    cfg, tok, rows, n = stream_cfg(write_shards(tmp_path / "d", docs), shuffle_buffer=buffer), \
        data.ByteTokenizer(), slice(0, 4), 3
    straight = stream.StreamBatches(cfg, tok, "train", seed=0)
    want = [straight.host_rows(s, rows) for s in range(2 * n)]
    read_straight, reads[:] = list(reads), []
    first = stream.StreamBatches(cfg, tok, "train", seed=0)
    got = [first.host_rows(s, rows) for s in range(n)]
    position = saved_and_loaded(first.position(n), tmp_path)
    second = stream.StreamBatches(cfg, tok, "train", seed=0)
    second.restore(position, n)
    got += [second.host_rows(s, rows) for s in range(n, 2 * n)]
    np.testing.assert_array_equal(np.stack(got), np.stack(want))
    assert reads == read_straight
    if docs == 5:
        assert straight.epoch >= 2 and second.epoch == straight.epoch
        assert len(read_straight) > 2 * 5
    else:
        assert len(set(read_straight)) == len(read_straight)  # one pass: each document once
    assert position["pending"].size or position["buffer"]  # mid-document / a full buffer


def test_the_shuffle_buffer_draws_each_row_once_from_the_next_ones(tmp_path):
    folder, tok, rows = write_shards(tmp_path / "d"), data.ByteTokenizer(), slice(0, 4)
    plain = stream.StreamBatches(stream_cfg(folder, shuffle_buffer=0), tok, "train", seed=0)
    in_order = np.concatenate([plain.host_rows(s, rows) for s in range(12)])  # 48 rows

    def shuffled(seed):
        reader = stream.StreamBatches(stream_cfg(folder, shuffle_buffer=8), tok, "train", seed)
        return np.concatenate([reader.host_rows(s, rows) for s in range(10)])  # 40 rows

    # Row k out is one of the first k + 8 in: each one once, and not in their order.
    index = {r.tobytes(): i for i, r in enumerate(in_order)}
    taken = [index[r.tobytes()] for r in shuffled(0)]
    assert len(set(taken)) == len(taken)
    assert all(t < k + 8 for k, t in enumerate(taken))
    assert taken != sorted(taken)
    assert not np.array_equal(shuffled(1), shuffled(0))


def test_eval_batches_are_read_once_and_a_short_stream_says_so(tmp_path, reads):
    cfg = stream_cfg(write_shards(tmp_path / "d"))
    tok = data.ByteTokenizer()
    held_out = stream.StreamBatches(cfg, tok, "eval", seed=0)
    first = [held_out.host_rows(s, slice(0, 4)) for s in range(2)]
    count = len(reads)
    again = [held_out.host_rows(s, slice(0, 4)) for s in range(2)]  # the next eval pass
    assert len(reads) == count and all(map(np.array_equal, first, again))
    with pytest.raises(ValueError, match=r"^data: the eval stream ran out \(it holds \d+ eval "
                                         r"tokens per pass\) at step \d+$"):
        for s in range(2, 1000):
            held_out.host_rows(s, slice(0, 4))
    empty = stream_cfg(write_shards(tmp_path / "e", docs=1), eval_fraction=0.99)  # held out
    with pytest.raises(ValueError, match=r"the train stream ran out \(it holds 0 train"):
        stream.StreamBatches(empty, tok, "train", seed=0).host_rows(0, slice(0, 4))


def test_resume_of_a_streamed_run_is_exact(tmp_path, compile_cache, caplog):
    from moejax.train import train_and_evaluate

    folder = write_shards(tmp_path / "d", docs=120)

    def smoke(**train):
        config = tiny.get_config("smoke")
        config.data.update(source="files", path=str(folder / "*.jsonl"), format="json",
                           text_key="body", streaming=True, shuffle_buffer=16,
                           eval_fraction=0.2)
        config.train.update(steps=4, warmup_steps=1, eval_every=4, eval_batches=1, ckpt_every=2,
                            **train)
        return config

    straight = train_and_evaluate(smoke(), str(tmp_path / "a"))
    first = train_and_evaluate(smoke(stop_at=2), str(tmp_path / "b"))["train_loss"]
    saved = tmp_path / "b" / "checkpoints" / "2" / "stream" / "process_0-of-1.npz"
    assert saved.exists()
    with caplog.at_level(logging.WARNING):
        second = train_and_evaluate(smoke(), str(tmp_path / "b"))["train_loss"]
    assert "skipping" not in caplog.text  # it read on from the saved position
    assert sorted(first) == [1, 2] and sorted(second) == [3, 4]
    assert {**first, **second} == straight["train_loss"]  # to the bit
