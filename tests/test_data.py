"""Data: tokenizers, packing, deterministic order, local-file sources."""

import json

import numpy as np
import pytest

from configs import tiny
from moejax import data


def test_byte_tokenizer_round_trip():
    tok = data.ByteTokenizer()
    ids = tok.encode("héllo")
    assert list(ids) == list("héllo".encode())
    assert tok.decode(list(ids) + [tok.eos_id]) == "héllo"


def test_pack_joins_documents_with_eos():
    tok = data.ByteTokenizer()
    rows = data.pack(["ab", "cde", "f"], tok, seq_len=3)
    # a b EOS c | d e EOS f ; the trailing EOS is dropped (incomplete row)
    np.testing.assert_array_equal(rows, [[97, 98, 256, 99], [100, 101, 256, 102]])


def test_batch_order_is_a_function_of_seed_and_step():
    seqs = np.arange(40)[:, None] * np.ones((1, 5), int)
    a, b = data.Batches(seqs, 8, seed=1, shuffle=True), data.Batches(seqs, 8, seed=1, shuffle=True)
    # Reading out of order (as a resumed run does) gives the same batches.
    for step in [7, 0, 3, 12]:
        rows = slice(0, 8)
        np.testing.assert_array_equal(a.host_rows(step, rows), b.host_rows(step, rows))
    epoch0 = np.concatenate([a.indices(s) for s in range(5)])
    assert sorted(epoch0) == list(range(40))  # one epoch visits every sequence once
    assert not np.array_equal(a.indices(0), a.indices(5))  # the next epoch is reshuffled
    # A host reading rows 4:8 gets exactly those rows of the global batch.
    np.testing.assert_array_equal(a.host_rows(2, slice(4, 8)), a.host_rows(2, slice(0, 8))[4:])


def test_in_memory_order_is_the_seeded_permutation():
    """The embedded default's order (issue #22 moved it into Batches.order): unchanged."""
    seqs = np.arange(43)[:, None] * np.ones((1, 3), np.int32)
    batches = data.Batches(seqs, 8, seed=5, shuffle=True)
    for step in [0, 4, 5, 11]:
        epoch, k = divmod(step, 5)
        want = np.random.default_rng([5, epoch]).permutation(43)[k * 8: (k + 1) * 8]
        np.testing.assert_array_equal(batches.indices(step), want)
        np.testing.assert_array_equal(batches.host_rows(step, slice(0, 8)), seqs[want])
    np.testing.assert_array_equal(data.Batches(seqs, 8, 5, shuffle=False).indices(2),
                                  np.arange(16, 24))


def test_stdlib_split_holds_out_whole_files():
    cfg = tiny.get_config().data
    train, held_out = data.load_documents(cfg, "train"), data.load_documents(cfg, "eval")
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
    docs = data.load_documents(cfg, "train") + data.load_documents(cfg, "eval")
    assert len(docs) == 60 and any(d.startswith("document 7 word") for d in docs)


def test_local_text_files_are_whole_documents(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.txt").write_text(f"line one of {i}\nline two\n")
    cfg = tiny.get_config().data
    cfg.update(source="files", path=str(tmp_path / "*.txt"), format="text", eval_fraction=0.0)
    docs = data.load_documents(cfg, "train")
    assert sorted(docs) == sorted(f"line one of {i}\nline two\n" for i in range(5))


def test_streaming_matches_packing_and_resumes(tmp_path):
    """In order (no shuffle buffer) a stream gives pack's rows; without a saved position
    (tests/test_stream.py has those) a new reader re-reads and skips to the step."""
    cfg = files_cfg(write_json_docs(tmp_path), streaming=True, shuffle_buffer=0)
    tok = data.ByteTokenizer()
    packed = data.pack(data.load_documents(files_cfg(cfg.path), "train"), tok, 16)
    stream = data.make_batches(cfg, tok, "train", seed=0)
    first = [stream.host_rows(s, slice(0, 4)) for s in range(3)]
    np.testing.assert_array_equal(np.concatenate(first), packed[:12])
    resumed = data.make_batches(cfg, tok, "train", seed=0).host_rows(2, slice(0, 4))
    np.testing.assert_array_equal(resumed, first[2])


def test_hf_tokenizer_from_local_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["def f(x): return x"] * 20,
                            trainers.BpeTrainer(special_tokens=["<unk>", "</s>"], vocab_size=60))
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = data.make_tokenizer(str(tmp_path))
    assert hf.eos_id == tok.token_to_id("</s>")
    assert hf.decode(hf.encode("return x")) == "return x"
