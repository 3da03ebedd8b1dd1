"""Issue #22, items 1-2: the prepared token store (moejax/data/store.py) and training from it."""

import json
import os
import subprocess
import sys
import time

import grain
import numpy as np
import pytest

from configs import tiny
from moejax import config_lib
from moejax.data import store, text
from moejax.data.__main__ import main as prepare_main
from moejax.data.batches import array_batches, make_batches

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stdlib_cfg(**kw):
    cfg = tiny.get_config().data
    cfg.update(**kw)
    return cfg


def prepared_cfg(path, **kw):
    return stdlib_cfg(source="prepared", path=str(path), **kw)


@pytest.fixture(scope="module")
def stdlib_store(tmp_path_factory):
    """The embedded corpus (the README's default run's), prepared once for this module."""
    out = tmp_path_factory.mktemp("stdlib") / "store"
    lines = []
    manifest = store.prepare(stdlib_cfg(), str(out), num_proc=2, print_fn=lines.append)
    return out, manifest, lines


def write_json_docs(path, n=60):
    """Short documents and one long one (document 5: many chunks, so both splits)."""
    with open(path, "w") as f:
        for i in range(n):
            words = "word " * (i % 7 + 5) * (300 if i == 5 else 1)
            f.write(json.dumps({"body": f"document {i} {words}"}) + "\n")
    return path


def files_cfg(path, **kw):
    return stdlib_cfg(source="files", path=str(path), format="json", text_key="body",
                      seq_len=16, batch_size=4, eval_fraction=0.2, **kw)


def hf_tokenizer_file(tmp_path):
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["document word 1 2 3 4 5 6 7 8 9 0"] * 20,
                            trainers.BpeTrainer(special_tokens=["<unk>", "</s>"], vocab_size=60))
    tok.save(str(tmp_path / "tokenizer.json"))
    return str(tmp_path / "tokenizer.json")


# --- prepare: the same tokens as today's path ----------------------------------------------

def test_stdlib_store_holds_what_pack_gives(stdlib_store):
    out, manifest, lines = stdlib_store
    cfg, tok = stdlib_cfg(), text.ByteTokenizer()
    assert manifest["tokenizer"]["name"] == "byte" and manifest["dtype"] == "uint16"
    assert lines[-1].startswith(f"prepared {out}: train ") and " MB (uint16)" in lines[-1]
    for split in store.SPLITS:
        docs = text.load_documents(cfg, split)
        # By hand: each document's bytes and one EOS, in load_documents' order.
        assert manifest["splits"][split] == {
            "tokens": sum(len(d.encode()) + 1 for d in docs), "documents": len(docs)}
        flat = np.fromfile(out / split / "tokens.bin", np.uint16)
        np.testing.assert_array_equal(flat[:1000], np.concatenate(
            [tok.encode(docs[0]), [tok.eos_id]])[:1000])
        started = time.perf_counter()
        make_batches(prepared_cfg(out), tok, split, seed=0)
        assert time.perf_counter() - started < 1.0
        sequences = store.open_split(prepared_cfg(out), tok, split)
        assert isinstance(sequences, np.memmap)  # nothing read yet
        # To the token: the sequences of today's path (text.pack of the same documents).
        np.testing.assert_array_equal(sequences, text.pack(docs, tok, cfg.seq_len))


def test_batches_equal_todays_where_they_must(stdlib_store):
    """The same rows as the in-memory path, in the same order: both are grain's index
    shuffle (train) or the split in order (eval) of the same sequences."""
    out, _, _ = stdlib_store
    tok = text.ByteTokenizer()
    for split, steps in (("eval", range(3)), ("train", (0, 5, 10**5))):
        today = make_batches(stdlib_cfg(), tok, split, seed=0).host_batches(slice(0, 32))
        prepared = make_batches(prepared_cfg(out), tok, split, seed=0).host_batches(slice(0, 32))
        for step in steps:
            rows = prepared[step]
            assert rows.dtype == np.int32 and rows.shape == (32, 129)
            np.testing.assert_array_equal(rows, today[step])


def test_files_store_in_parallel_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "shard_size", lambda documents: 25)  # 3 shards of 60 documents
    cfg = files_cfg(write_json_docs(tmp_path / "docs.jsonl"))
    lines = []
    manifest = store.prepare(cfg, str(tmp_path / "s"), num_proc=2, print_fn=lines.append)
    assert [line.split(" documents")[0] for line in lines[:2]] == [
        "prepare: 25 of 60", "prepare: 50 of 60"]
    assert "tokens, " in lines[0] and "/s of text, ETA " in lines[0]
    tok = text.ByteTokenizer()
    for split in store.SPLITS:
        docs = text.load_documents(cfg, split)  # document 5 gives parts to both splits
        assert manifest["splits"][split]["documents"] == len(docs)
        np.testing.assert_array_equal(
            store.open_split(prepared_cfg(tmp_path / "s", seq_len=16, eval_fraction=0.2), tok,
                             split), text.pack(docs, tok, 16))
    assert manifest["source"]["documents"] == 60
    assert sorted(os.listdir(tmp_path / "s")) == ["eval", "manifest.json", "train"]


def test_hf_tokenizer_store(tmp_path):
    pytest.importorskip("tokenizers")
    path = hf_tokenizer_file(tmp_path)
    cfg = files_cfg(write_json_docs(tmp_path / "docs.jsonl"), tokenizer=path)
    store.prepare(cfg, str(tmp_path / "s"), num_proc=1, print_fn=lambda line: None)
    tok = text.make_tokenizer(path)
    for split in store.SPLITS:
        got = store.open_split(prepared_cfg(tmp_path / "s", seq_len=16, eval_fraction=0.2,
                                            tokenizer=path), tok, split)
        np.testing.assert_array_equal(got, text.pack(text.load_documents(cfg, split), tok, 16))


# --- order: (seed, step), epochs, hosts ----------------------------------------------------

class Reads:
    """Rows that record which of them are read: a sequence's id is its index here."""

    def __init__(self, rows):
        self.rows, self.asked = rows, []

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        self.asked.append(int(index))
        return self.rows[index]


def test_store_batches_epochs_random_access_and_host_rows(tmp_path):
    cfg = files_cfg(write_json_docs(tmp_path / "docs.jsonl"))
    store.prepare(cfg, str(tmp_path / "s"), num_proc=1, print_fn=lambda line: None)
    tok, pcfg = text.ByteTokenizer(), prepared_cfg(tmp_path / "s", seq_len=16, eval_fraction=0.2,
                                                   batch_size=8)
    sequences = store.open_split(pcfg, tok, "train")
    n, reads = len(sequences), Reads(sequences)
    a = make_batches(pcfg, tok, "train", seed=3).host_batches(slice(0, 8))
    mine = array_batches(reads, 8, seed=3, shuffle=True).host_batches(slice(0, 8))
    for step in range(2 * n // 8 + 1):  # the store's batches, and which sequences they are
        np.testing.assert_array_equal(mine[step], a[step])
    for epoch in range(2):  # every sequence exactly once per epoch
        assert sorted(reads.asked[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert reads.asked[:n] != reads.asked[n:2 * n]  # epoch 1: reshuffled
    other = make_batches(pcfg, tok, "train", 4).host_batches(slice(0, 8))
    assert not np.array_equal(a[0], other[0])
    # A resumed run (a fresh reader, any step first) reads the very same rows, 10^9 steps
    # in as soon as at the start.
    b = make_batches(pcfg, tok, "train", seed=3).host_batches(slice(0, 8))
    for step in [n // 8 + 2, 0, 7, 3 * n // 8, 10**9]:
        np.testing.assert_array_equal(b[step], a[step])
    # A host reads its own rows of the global batch, and nothing else: positions 34..37 of
    # grain's index shuffle.
    reads.asked = []
    rows = array_batches(reads, 8, seed=3, shuffle=True).host_batches(slice(2, 6))[4]
    np.testing.assert_array_equal(rows, a[4][2:6])
    assert reads.asked == [grain.experimental.index_shuffle(p, max_index=n - 1, seed=3, rounds=4)
                           for p in range(4 * 8 + 2, 4 * 8 + 6)]


# --- refusals, in one line, before anything compiles ---------------------------------------

def one_line(match):
    return pytest.raises(config_lib.ConfigError, match=match)


def test_a_store_of_another_tokenizer_is_refused(tmp_path, stdlib_store):
    pytest.importorskip("tokenizers")
    out, _, _ = stdlib_store
    path = hf_tokenizer_file(tmp_path)
    hf = text.make_tokenizer(path)
    with one_line(rf"^data.path='{out}': prepared with tokenizer 'byte' \(257 tokens\); allowed: "
                  rf"a store prepared with data.tokenizer='{path}' \({hf.vocab_size} tokens\)$"):
        make_batches(prepared_cfg(out, tokenizer=path), hf, "train", seed=0)
    # The same name, another tokenizer behind it (retrained, another vocabulary).
    manifest = json.loads((out / "manifest.json").read_text())
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "manifest.json").write_text(json.dumps(
        {**manifest, "tokenizer": {**manifest["tokenizer"], "name": path, "sha256": "0" * 64}}))
    with one_line(f"prepared with tokenizer '{path}' \\(another version of it\\)"):
        store.open_split(prepared_cfg(fake, tokenizer=path), hf, "train")


def test_bad_stores_are_refused_in_one_line(tmp_path, stdlib_store):
    out, manifest, _ = stdlib_store
    tok = text.ByteTokenizer()
    with one_line(f"^data.path='{tmp_path}/nope': no such folder; allowed: a folder written "
                  "by python -m moejax.data prepare$"):
        store.open_split(prepared_cfg(tmp_path / "nope"), tok, "train")
    with one_line("no manifest.json in it"):
        store.open_split(prepared_cfg(tmp_path), tok, "train")
    bad = tmp_path / "bad"
    bad.mkdir()
    for written, why in [("{not json", "JSONDecodeError"),
                         ('{"format": "other"}', "format 'other'"),
                         (json.dumps({**manifest, "splits": {}}), "KeyError")]:
        (bad / "manifest.json").write_text(written)
        with one_line(rf"^data.path='{bad}': cannot read manifest.json \(.*{why}.*\); allowed: "
                      r"a store written by python -m moejax.data prepare \(format version 1\)$"):
            store.open_split(prepared_cfg(bad), tok, "train")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    (bad / "train").mkdir()
    (bad / "train" / "tokens.bin").write_bytes(b"\0" * 10)  # truncated
    with one_line(f"train/tokens.bin holds 10 bytes, its manifest says "
                  f"{manifest['splits']['train']['tokens'] * 2}"):
        store.open_split(prepared_cfg(bad), tok, "train")
    (bad / store.INCOMPLETE).touch()
    with one_line("an unfinished prepare"):
        store.open_split(prepared_cfg(bad), tok, "train")
    with one_line(rf"^data.eval_fraction=0.1: the store data.path='{out}' holds out 0.05; "
                  r"allowed: 0.05 \(or prepare a store with 0.1\)$"):
        store.open_split(prepared_cfg(out, eval_fraction=0.1), tok, "eval")
    with one_line("the train split holds 91256 sequences of data.seq_len \\+ 1 = 129 tokens; "
                  "allowed: at least data.batch_size=100000"):
        make_batches(prepared_cfg(out, batch_size=100_000), tok, "train", seed=0)
    config = tiny.get_config()
    config.data.update(source="prepared")
    with one_line("^data.path='': empty; allowed: a folder written by python -m moejax.data "
                  "prepare$"):
        config_lib.validate(config, 8)


def test_prepare_refuses_a_folder_it_would_overwrite(tmp_path, stdlib_store):
    out, manifest, _ = stdlib_store
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with one_line(f"^--out='{tmp_path}/other': not empty and not a token store; allowed: a "
                  "new or empty folder$"):
        store.prepare(stdlib_cfg(), str(tmp_path / "other"), 1)
    with one_line(f"^--out='{out}': holds a store of another source, tokenizer or "
                  "eval_fraction"):
        store.prepare(stdlib_cfg(eval_fraction=0.1), str(out), 1)
    lines = []  # the same source, tokenizer and split again: nothing to do
    assert store.prepare(stdlib_cfg(), str(out), 1, lines.append) == manifest
    assert lines == [f"{out}: already holds this store (the same source fingerprint, "
                     "tokenizer and eval_fraction); nothing to do"]
    with one_line("^data.source='prepared': already a store; allowed for prepare: stdlib, "
                  "files, hub$"):
        store.prepare(prepared_cfg(out), str(tmp_path / "new"), 1)


def test_an_interrupted_prepare_is_redone(tmp_path):
    cfg = files_cfg(write_json_docs(tmp_path / "docs.jsonl"))
    out = tmp_path / "s"
    (out / "train").mkdir(parents=True)
    (out / "train" / "tokens.bin").write_bytes(b"\1" * 7)  # what an interrupted one left
    (out / store.INCOMPLETE).touch()
    manifest = store.prepare(cfg, str(out), 1, print_fn=lambda line: None)
    assert os.path.getsize(out / "train" / "tokens.bin") == 2 * manifest["splits"]["train"][
        "tokens"]
    assert not (out / store.INCOMPLETE).exists()


# --- the command line ----------------------------------------------------------------------

def test_prepare_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    docs = write_json_docs(tmp_path / "docs.jsonl")
    out = tmp_path / "s"
    prepare_main(["data", "prepare", "--config=configs/tiny.py", f"--out={out}", "--num_proc=1",
               "--config.data.source=files", f"--config.data.path={docs}",
               "--config.data.format=json", "--config.data.text_key=body"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["source"] == "files" and manifest["splits"]["train"]["tokens"]
    for args, error in [
            ([], "missing --config; allowed: configs/<name>.py[:variant]: its data.* keys name "
             "the source, the tokenizer and the held-out fraction"),
            (["--config=configs/tiny.py", "--out=x"], "missing COMMAND; allowed: prepare"),
            (["tokenize", "--config=configs/tiny.py", "--out=x"],
             "COMMAND='tokenize': unknown; allowed: prepare"),
            (["prepare", "--config=configs/tiny.py", "--out=x", "--num_proc=0"],
             "flag --num_proc=0: 0 is not a positive integer"),
            (["prepare", "--config=configs/tiny.py", "--out=x", "--config.data.sourc=hub"],
             "unknown key data.sourc; did you mean data.source?"),
            (["prepare", "--config=configs/tiny.py", "--out=x", "--config.data.source=web"],
             "data.source='web': unknown; allowed: stdlib, files, hub, prepared")]:
        with pytest.raises(SystemExit) as e:
            prepare_main(["data", *args])
        assert e.value.code == f"error: {error}"


def test_prepare_as_a_process_prints_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "moejax.data", "prepare",
                          "--config=configs/tiny.py", f"--out={tmp_path}", "--bogus"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [
        "error: unknown flag --bogus; allowed: --config, --out, --num_proc, --config.KEY=VALUE"]


# --- resume: exact, to the bit -------------------------------------------------------------

def test_resume_on_a_prepared_store_is_exact(tmp_path, stdlib_store):
    from moejax.train import train_and_evaluate

    out, _, _ = stdlib_store

    def smoke(**train):
        config = tiny.get_config("smoke")
        config.data.update(source="prepared", path=str(out))
        config.mesh.data = 1  # the store's position, not the layout, is under test
        config.train.update(steps=4, warmup_steps=1, eval_every=4, eval_batches=1, ckpt_every=2,
                            **train)
        return config

    straight = train_and_evaluate(smoke(), str(tmp_path / "a"))
    first = train_and_evaluate(smoke(stop_at=2), str(tmp_path / "b"))["train_loss"]
    second = train_and_evaluate(smoke(), str(tmp_path / "b"))["train_loss"]
    assert sorted(first) == [1, 2] and sorted(second) == [3, 4]
    assert {**first, **second} == straight["train_loss"]  # to the bit
    assert straight["eval_loss"][4] < straight["eval_loss"][0]
