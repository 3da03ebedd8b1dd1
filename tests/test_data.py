"""Data: tokenizers, packing, grain's deterministic order, local-file sources."""

import json

import grain
import numpy as np
import pytest

from configs import tiny
from moejax.data import text
from moejax.data.batches import array_batches, make_batches
from moejax.data.loader import read_first


def test_byte_tokenizer_round_trip():
    tok = text.ByteTokenizer()
    ids = tok.encode("héllo")
    assert list(ids) == list("héllo".encode())
    assert tok.decode(list(ids) + [tok.eos_id]) == "héllo"


def test_pack_joins_documents_with_eos():
    tok = text.ByteTokenizer()
    rows = text.pack(["ab", "cde", "f"], tok, seq_len=3)
    # a b EOS c | d e EOS f ; the trailing EOS is dropped (incomplete row)
    np.testing.assert_array_equal(rows, [[97, 98, 256, 99], [100, 101, 256, 102]])


def test_batch_order_is_a_function_of_seed_and_step():
    seqs = np.arange(40)[:, None] * np.ones((1, 5), int)  # row i holds i
    a, b = (array_batches(seqs, 8, seed=1, shuffle=True).host_batches(slice(0, 8))
            for _ in range(2))
    # Reading out of order (as a resumed run does) gives the same batches.
    for step in [7, 0, 3, 12]:
        np.testing.assert_array_equal(a[step], b[step])
    epoch0 = np.concatenate([a[s][:, 0] for s in range(5)])
    assert sorted(epoch0) == list(range(40))  # one epoch visits every sequence once
    assert not np.array_equal(a[0], a[5])  # the next epoch is reshuffled
    assert a[0].dtype == np.int32 and a[0].shape == (8, 5)
    # A host reading rows 4:8 gets exactly those rows of the global batch.
    host = array_batches(seqs, 8, seed=1, shuffle=True).host_batches(slice(4, 8))
    np.testing.assert_array_equal(host[2], a[2][4:])
    # In order (held-out batches): rows 8s .. 8s + 7, again from the start after the end.
    held_out = array_batches(seqs, 8, seed=1, shuffle=False).host_batches(slice(0, 8))
    np.testing.assert_array_equal(held_out[2][:, 0], np.arange(16, 24))
    np.testing.assert_array_equal(held_out[5][:, 0], np.arange(0, 8))
    # The iterator the loader runs gives the same batches, from any saved state.
    batches = array_batches(seqs, 8, seed=1, shuffle=True)
    assert all(map(np.array_equal, read_first(batches, slice(0, 8), 3), [a[0], a[1], a[2]]))
    reader = iter(batches.host(slice(0, 8)))
    reader.set_state(batches.position(6, slice(0, 8)))
    np.testing.assert_array_equal(next(reader), a[6])
    assert reader.get_state() == {"next_index": 7}
    reader.close()


def test_in_memory_order_is_grains_index_shuffle_per_epoch():
    """Epoch e of a shuffled split is grain's index_shuffle of its rows with seed + e."""
    seqs = np.arange(43)[:, None] * np.ones((1, 3), np.int32)
    batches = array_batches(seqs, 8, seed=5, shuffle=True).host_batches(slice(0, 8))
    for step in [0, 4, 5, 11]:
        positions = np.arange(step * 8, step * 8 + 8)
        want = [grain.experimental.index_shuffle(p % 43, max_index=42, seed=5 + p // 43,
                                                 rounds=4) for p in positions]
        np.testing.assert_array_equal(batches[step][:, 0], want)


def test_stdlib_split_holds_out_whole_files():
    cfg = tiny.get_config().data
    train, held_out = text.load_documents(cfg, "train"), text.load_documents(cfg, "eval")
    assert len(train) > 500 and 10 < len(held_out) < 0.1 * len(train)
    assert not set(train) & set(held_out)


def write_json_docs(tmp_path, n=60):
    path = tmp_path / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"body": f"document {i} " + "word " * (i % 7 + 5)}) + "\n")
    return path


def files_cfg(path, **kw):
    cfg = tiny.get_config().data
    cfg.update(source="files", path=str(path), format="json", text_key="body", seq_len=16,
               batch_size=4, eval_fraction=0.2, **kw)
    return cfg


def test_local_json_files(tmp_path):
    cfg = files_cfg(write_json_docs(tmp_path))
    docs = text.load_documents(cfg, "train") + text.load_documents(cfg, "eval")
    assert len(docs) == 60 and any(d.startswith("document 7 word") for d in docs)


def test_local_text_files_are_whole_documents(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.txt").write_text(f"line one of {i}\nline two\n")
    cfg = tiny.get_config().data
    cfg.update(source="files", path=str(tmp_path / "*.txt"), format="text", eval_fraction=0.0)
    docs = text.load_documents(cfg, "train")
    assert sorted(docs) == sorted(f"line one of {i}\nline two\n" for i in range(5))


def test_streaming_matches_packing_and_resumes(tmp_path):
    """In order (no shuffle buffer) a stream gives pack's rows; without a saved position
    (tests/test_stream.py has those) the state before a step is found by re-reading."""
    cfg = files_cfg(write_json_docs(tmp_path), streaming=True, shuffle_buffer=0)
    tok, mine = text.ByteTokenizer(), slice(0, 4)
    packed = text.pack(text.load_documents(files_cfg(cfg.path), "train"), tok, 16)
    stream = make_batches(cfg, tok, "train", seed=0)
    first = read_first(stream, mine, 3)
    np.testing.assert_array_equal(np.concatenate(first), packed[:12])
    resumed = iter(make_batches(cfg, tok, "train", seed=0).host(mine))
    resumed.set_state(stream.position(2, mine))
    np.testing.assert_array_equal(next(resumed), first[2])
    resumed.close()


def test_hf_tokenizer_from_local_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["def f(x): return x"] * 20,
                            trainers.BpeTrainer(special_tokens=["<unk>", "</s>"], vocab_size=60))
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = text.make_tokenizer(str(tmp_path))
    assert hf.eos_id == tok.token_to_id("</s>")
    assert hf.decode(hf.encode("return x")) == "return x"
