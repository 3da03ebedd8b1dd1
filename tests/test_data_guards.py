"""Issue #20: one long file gives both splits; bad data inputs fail with one line naming the key."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs import tiny
from moejax import config_lib
from moejax.data import text
from moejax.data.batches import make_batches
from moejax.data.loader import read_first

LINE = "def f(x):\n    return x + 1\n"


@pytest.fixture
def files(tmp_path):
    """One long text file, a folder of text files, JSON lines without `text`, a real parquet."""
    (tmp_path / "book.txt").write_text(LINE * 2000)  # 54,000 characters: 27 chunks
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text(LINE * 100)
    (tmp_path / "short.txt").write_text(LINE * 70)  # 1,890 characters: one chunk, for training
    (tmp_path / "nest" / "only_a_folder").mkdir(parents=True)
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i in range(50):
            f.write(json.dumps({"id": i, "body": LINE * 20}) + "\n")
    pq.write_table(pa.table({"text": [LINE * 100] * 20}), tmp_path / "good.parquet")
    return tmp_path


def files_cfg(**overrides):
    cfg = tiny.get_config().data
    cfg.update(source="files", format="text", seq_len=32, batch_size=16, eval_fraction=0.05)
    cfg.update(**overrides)
    return cfg


def test_one_long_file_gives_both_splits(files):
    cfg = files_cfg(path=str(files / "book.txt"))
    tok = text.ByteTokenizer()
    train = make_batches(cfg, tok, "train", seed=0)
    held_out = make_batches(cfg, tok, "eval", seed=0)
    assert len(held_out.rows) >= cfg.batch_size
    assert 0.02 < len(held_out.rows) / len(train.rows) < 0.15
    # Every character is in exactly one split, in order, and the choice does not change.
    parts = text.load_documents(cfg, "train"), text.load_documents(cfg, "eval")
    assert sum(len(p) for split in parts for p in split) == len(LINE) * 2000
    assert all(p and p in LINE * 2000 for split in parts for p in split)
    assert parts == (text.load_documents(cfg, "train"), text.load_documents(cfg, "eval"))


def test_short_documents_are_still_held_out_whole():
    doc = "x" * text.CHUNK_CHARS
    for i in range(200):
        held_out = text.is_eval_doc(str(i), 0.2)
        assert text.split_parts(str(i), doc, 0.2, "eval") == ([doc] if held_out else [])
        assert text.split_parts(str(i), doc, 0.2, "train") == ([] if held_out else [doc])


def test_streaming_splits_long_documents_too(files):
    cfg = files_cfg(path=str(files / "book.txt"), streaming=True)
    tok = text.ByteTokenizer()
    packed = text.pack(text.load_documents(files_cfg(path=cfg.path), "eval"), tok, 32)
    stream = make_batches(cfg, tok, "eval", seed=0)
    np.testing.assert_array_equal(read_first(stream, slice(0, 16), 1)[0], packed[:16])


def test_parquet_files_beside_others_are_read_and_others_skipped(files, caplog):
    (files / "notes.txt").write_text("not parquet")
    cfg = files_cfg(path=str(files / "*"), format="parquet", eval_fraction=0.0)
    with caplog.at_level("WARNING"):
        assert text.load_documents(cfg, "train") == [LINE * 100] * 20
    assert (f"data: skipped 4 of 5 files: {files}/book.txt (not parquet); {files}/docs.jsonl "
            f"(not parquet); {files}/notes.txt (not parquet)") in caplog.text


INVALID = [  # data overrides, then the whole one-line error
    ({"path": "{tmp}/docs"},
     "data.path='{tmp}/docs': a directory; allowed: a glob of the files in it, e.g. "
     "'{tmp}/docs/*.txt'"),
    ({"path": "{tmp}/docs/", "format": "json"},
     "data.path='{tmp}/docs/': a directory; allowed: a glob of the files in it, e.g. "
     "'{tmp}/docs/*.jsonl'"),
    ({"path": "{tmp}/nest/*"},
     "data.path='{tmp}/nest/*': no file matches; allowed: a glob of local files"),
    ({"path": "{tmp}/docs.jsonl", "format": "json"},
     "data.text_key='text': not a key of {tmp}/docs.jsonl (its keys: id, body); allowed: one "
     "of its keys"),
    ({"path": "{tmp}/docs.jsonl", "format": "json", "streaming": True},
     "data.text_key='text': not a key of {tmp}/docs.jsonl (its keys: id, body); allowed: one "
     "of its keys"),
    ({"path": "{tmp}/*.parquet", "format": "parquet", "text_key": "body"},
     "data.text_key='body': not a key of {tmp}/good.parquet (its keys: text); allowed: one of "
     "its keys"),
    ({"path": "{tmp}/book.txt", "format": "parquet"},
     "data.format='parquet': {tmp}/book.txt is not a parquet file (no PAR1 header); allowed: "
     "parquet files, or data.format='text' or 'json' for text"),
    ({"path": "{tmp}/*", "format": "parquet", "on_error": "fail"},
     "data.format='parquet': {tmp}/book.txt is not a parquet file (no PAR1 header); allowed: "
     "parquet files, or data.format='text' or 'json' for text"),
    ({"path": "{tmp}/short.txt"},
     "data.path='{tmp}/short.txt': the eval split holds 0 sequences of data.seq_len + 1 = 33 "
     "tokens; allowed: at least data.batch_size=16 (more text, a larger data.eval_fraction, or "
     "a smaller batch or seq_len)"),
]


@pytest.mark.parametrize("overrides,error", INVALID,
                         ids=["+".join(f"{k}={v}" for k, v in o.items()) for o, _ in INVALID])
def test_bad_data_is_one_line_naming_the_key(files, overrides, error):
    overrides = {k: v.format(tmp=files) if isinstance(v, str) else v
                 for k, v in overrides.items()}
    with pytest.raises(config_lib.ConfigError) as e:
        for split in ("train", "eval"):
            make_batches(files_cfg(**overrides), text.ByteTokenizer(), split, seed=0)
    assert str(e.value) == error.format(tmp=files)


def test_vocab_smaller_than_the_tokenizer_is_one_line():
    tok = text.ByteTokenizer()
    text.check_vocab(0, tok)
    text.check_vocab(257, tok)
    text.check_vocab(512, tok)
    with pytest.raises(config_lib.ConfigError) as e:
        text.check_vocab(100, tok)
    assert str(e.value) == ("model.vocab_size=100: smaller than tokenizer 'byte''s 257 tokens; "
                            "allowed: 0 (the tokenizer's) or >= 257")
