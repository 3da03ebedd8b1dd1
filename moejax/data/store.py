"""The prepared token store: tokenize a source once, then read any sequence of it in O(1).

  DIR/manifest.json      format version, tokenizer, dtype, counts per split, source fingerprint
  DIR/train/tokens.bin   the train split's documents' tokens, each document followed by EOS
  DIR/eval/tokens.bin    the same for the held-out split

`python -m moejax.data prepare` writes it (prepare, below): the documents and the train / eval
split that text.load_documents gives, tokenized in parallel by `datasets.Dataset.map` one shard
of documents at a time, each shard appended to the flat files (uint16 ids for vocabularies of
at most 65,536 tokens, else uint32), so memory holds one shard, never the corpus. A hub
dataset is read whole (data.streaming does not apply: `datasets` downloads and caches it).
`data.source='prepared'` with `data.path=DIR` trains from it (open_split): the files are
memory-mapped, sequence i is tokens i*(seq_len+1) .. (i+1)*(seq_len+1)-1 of its split, exactly
text.pack's row i of the same documents, and grain's index shuffle (batches.py) computes each
position's sequence on its own: nothing the size of the corpus is ever held in memory.
"""

import datetime
import glob
import hashlib
import json
import os
import shutil
import sysconfig
import time

import numpy as np

from moejax.config_lib import ConfigError, check_data, first_line
from moejax.data import text

FORMAT, VERSION = "moejax token store", 1
SPLITS = ("train", "eval")
INCOMPLETE = ".incomplete"  # present while prepare writes; a store with it is not finished
PREPARE = "python -m moejax.data prepare"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenizer_record(tokenizer) -> dict:
    """The tokenizer's name, size, EOS and a sha256 of its serialization (its identity: the
    same tokenizer.json under another path or hub name is the same tokenizer)."""
    hf = getattr(tokenizer, "tok", None)
    text = hf.to_str() if hf is not None else tokenizer.name
    return {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id, "sha256": hashlib.sha256(text.encode()).hexdigest()}


# --- reading --------------------------------------------------------------------------------

def read_manifest(path: str, key: str = "data.path", where: str | None = None) -> dict:
    """DIR/manifest.json of a finished store, or one ConfigError line saying what is wrong
    (naming it `where`, by default key=path)."""
    where = where or f"{key}={path!r}"
    if not os.path.isdir(path):
        raise ConfigError(f"{where}: no such folder; allowed: a folder written by {PREPARE}")
    if os.path.exists(os.path.join(path, INCOMPLETE)):
        raise ConfigError(f"{where}: an unfinished prepare (interrupted, or still running); "
                          f"allowed: a finished store (run {PREPARE} again)")
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ValueError(f"format {manifest.get('format')!r} version "
                             f"{manifest.get('version')!r}")
        for split in SPLITS:
            int(manifest["splits"][split]["tokens"])
        manifest["tokenizer"]["name"], int(manifest["tokenizer"]["vocab_size"])
        np.dtype(manifest["dtype"]), float(manifest["eval_fraction"])
    except FileNotFoundError:
        raise ConfigError(f"{where}: no manifest.json in it; allowed: a folder written by "
                          f"{PREPARE}") from None
    except Exception as e:  # not JSON, or JSON of another shape: a file we cannot trust
        raise ConfigError(f"{where}: cannot read manifest.json ({type(e).__name__}: "
                          f"{first_line(e)}); allowed: a store written by {PREPARE} (format "
                          f"version {VERSION})") from None
    return manifest


def open_split(cfg, tokenizer, split: str, path: str | None = None,
               where: str | None = None) -> np.ndarray:
    """The `split` sequences of the store data.path (or `path`, an entry of data.mixture,
    named `where` in errors) as a read-only memory map, [sequences, seq_len + 1]; a store of
    another tokenizer or held-out fraction is refused."""
    path = cfg.path if path is None else path
    where = where or f"data.path={path!r}"
    manifest = read_manifest(path, where=where)
    tok = manifest["tokenizer"]
    if tok.get("sha256") != tokenizer_record(tokenizer)["sha256"]:
        other = " (another version of it)" if tok["name"] == tokenizer.name else ""
        raise ConfigError(f"{where}: prepared with tokenizer {tok['name']!r}{other} "
                          f"({tok['vocab_size']} tokens); allowed: a store prepared with "
                          f"data.tokenizer={tokenizer.name!r} ({tokenizer.vocab_size} tokens)")
    if manifest["eval_fraction"] != cfg.eval_fraction:
        raise ConfigError(f"data.eval_fraction={cfg.eval_fraction!r}: the store {where} holds "
                          f"out {manifest['eval_fraction']!r}; allowed: "
                          f"{manifest['eval_fraction']!r} (or prepare a store with "
                          f"{cfg.eval_fraction!r})")
    dtype, count = np.dtype(manifest["dtype"]), manifest["splits"][split]["tokens"]
    file = os.path.join(path, split, "tokens.bin")
    size = os.path.getsize(file) if os.path.exists(file) else None
    if size != count * dtype.itemsize:
        raise ConfigError(f"{where}: {split}/tokens.bin holds {size} bytes, its manifest says "
                          f"{count * dtype.itemsize}; allowed: a complete store (run "
                          f"{PREPARE} again)")
    tokens = (np.memmap(file, dtype, mode="r", shape=(count,)) if count
              else np.zeros((0,), dtype))  # an empty file cannot be mapped
    width = cfg.seq_len + 1
    return tokens[: count // width * width].reshape(-1, width)  # a view: nothing is read


# --- writing --------------------------------------------------------------------------------

def documents(cfg):
    """The source's documents as a `datasets.Dataset` (stdlib: one row per file name, read when
    tokenized), the stdlib's root (else None) and what the store is made from, with a
    fingerprint of it: sha256 over the files' names, sizes and modification times (stdlib,
    files), or over the hub dataset's name, config, split and the fingerprint `datasets` gives
    its download."""
    import datasets

    record = {"source": cfg.source, "path": cfg.path, "text_key": cfg.text_key}
    digest, root = hashlib.sha256(), None
    if cfg.source == "hub":  # prepare tokenizes the whole set: a streamed one is downloaded
        docs = text.hf_dataset(cfg, streaming=False)
        record.update(hub_config=cfg.hub_config, split=cfg.split)
        digest.update(json.dumps([cfg.path, cfg.hub_config, cfg.split, docs._fingerprint])
                      .encode())
    else:
        if cfg.source == "stdlib":
            root = sysconfig.get_paths()["stdlib"]
            files = text.stdlib_files()
            names = [os.path.relpath(f, root) for f in files]
            docs = datasets.Dataset.from_dict({"name": names})
        else:
            record["format"] = cfg.format
            files = names = [f for f in sorted(glob.glob(cfg.path, recursive=True))
                             if not os.path.isdir(f)]
            docs = text.hf_dataset(cfg, streaming=False)
        for name, f in zip(names, files, strict=True):
            st = os.stat(f)
            digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    record["fingerprint"] = "sha256:" + digest.hexdigest()
    return docs, root, record


class Tokenize:
    """The Dataset.map function: a batch of documents -> one row per part of a split (in
    order), with its ids and EOS as `dtype`, its split and its text's size in UTF-8 bytes."""

    def __init__(self, cfg, tokenizer, dtype, root):
        self.source, self.text_key = cfg.source, cfg.text_key
        self.eval_fraction = cfg.eval_fraction
        self.tokenizer, self.dtype, self.root = tokenizer, dtype, root

    def __call__(self, batch, indices, offset):
        parts = []  # (held out, text)
        if self.source == "stdlib":
            for name in batch["name"]:
                with open(os.path.join(self.root, name), encoding="utf-8", errors="replace") as f:
                    parts.append((text.is_eval_doc(name, self.eval_fraction), f.read()))
        else:
            for i, doc in zip(indices, batch[self.text_key], strict=True):
                for split in SPLITS:
                    parts += [(split == "eval", p) for p in
                              text.split_parts(str(offset + i), doc or "", self.eval_fraction,
                                               split)]
        texts = [t for _, t in parts]
        hf = getattr(self.tokenizer, "tok", None)
        encoded = ([e.ids for e in hf.encode_batch(texts, add_special_tokens=False)] if hf
                   else [self.tokenizer.encode(t) for t in texts])
        eos, limit = self.tokenizer.eos_id, np.iinfo(self.dtype).max
        ids = []
        for e in encoded:
            e = np.append(np.asarray(e, np.int64), eos)
            if e.size and e.max() > limit:
                raise ValueError(f"token id {e.max()} does not fit {self.dtype.name}")
            ids.append(e.astype(self.dtype))
        return {"eval": [held_out for held_out, _ in parts], "ids": ids,
                "bytes": [len(t.encode("utf-8", "replace")) for t in texts]}


def check_out(out: str, manifest: dict | None = None) -> bool:
    """Whether --out already holds the store `manifest` describes (True: nothing to do). A new
    or empty folder, or one left by an unfinished prepare, is written; one holding anything
    else is refused (with manifest None: only what is not a store, before reading the source),
    and so is a path that cannot be made a folder this user writes.
    """
    where = f"--out={out!r}"
    if not out:
        raise ConfigError(f"{where}: empty; allowed: a new or empty folder")
    if not os.path.exists(out):
        parent = os.path.dirname(os.path.abspath(out))
        while not os.path.exists(parent):  # the folder makedirs would create first
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise ConfigError(f"{where}: cannot be created ({parent} is "
                              f"{'not a folder' if not os.path.isdir(parent) else 'not writable'}"
                              "); allowed: a new or empty folder this user can write")
        return False
    if not os.path.isdir(out):
        raise ConfigError(f"{where}: not a folder; allowed: a new or empty folder")
    entries = os.listdir(out)
    if not entries or INCOMPLETE in entries:
        return False
    if "manifest.json" not in entries:
        raise ConfigError(f"{where}: not empty and not a token store; allowed: a new or empty "
                          "folder")
    old = read_manifest(out, "--out")
    if manifest is None:
        return False
    if all(old.get(k) == manifest[k] for k in ("tokenizer", "dtype", "eval_fraction")) and {
            k: v for k, v in old["source"].items() if k != "documents"} == manifest["source"]:
        return True
    raise ConfigError(f"{where}: holds a store of another source, tokenizer or eval_fraction "
                      "(see its manifest.json); allowed: a new or empty folder, or delete it "
                      "to prepare it again")


def _size(n: float) -> str:
    """Bytes in kB / MB / GB, one decimal."""
    scale, unit = next(((v, u) for v, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")) if n >= v),
                       (1, "B"))
    return f"{n / scale:,.1f} {unit}"


def _eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


BATCH = 128  # documents per tokenizer call, per write and per read-back


def shard_size(documents: int) -> int:
    """Documents per shard: about 20 shards (20 progress lines), 5,000 to 100,000 each."""
    return max(1, min(100_000, max(5_000, -(-documents // 20))))


def prepare(cfg, out: str, num_proc: int, print_fn=print) -> dict:
    """Tokenize the data source of `cfg` (a config's data group) into a store in `out`;
    returns its manifest. Long runs print progress after each shard of documents."""
    if cfg.source == "prepared":
        raise ConfigError("data.source='prepared': already a store; allowed for prepare: "
                          "stdlib, files, hub")
    check_data(cfg)
    if cfg.format in ("chat", "replay"):
        what = ("conversations are rendered" if cfg.format == "chat" else "routing records are"
                " read")
        raise ConfigError(f"data.format={cfg.format!r}: {what} and packed as a run opens them, "
                          "not stored; allowed for prepare: text, json, parquet")
    if cfg.source == "files":
        text.check_path(cfg)
    tokenizer = text.make_tokenizer(cfg.tokenizer)
    check_out(out)  # a folder that is no store: refused before the source is read
    dtype = token_dtype(tokenizer.vocab_size)
    docs, root, source = documents(cfg)
    manifest = {"format": FORMAT, "version": VERSION, "tokenizer": tokenizer_record(tokenizer),
                "dtype": dtype.name, "eval_fraction": cfg.eval_fraction, "source": source}
    if check_out(out, manifest):
        print_fn(f"{out}: already holds this store (the same source fingerprint, tokenizer "
                 "and eval_fraction); nothing to do")
        return read_manifest(out, "--out")
    if num_proc > 1:  # a process per batch of documents: no tokenizer threads within them
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return write(out, docs, Tokenize(cfg, tokenizer, dtype, root), manifest, num_proc,
                     print_fn)
    except OSError as e:  # a full disk, above all: nothing is presented as a finished store
        reason = e.strerror or first_line(e)
        raise ConfigError(
            f"--out={out!r}: cannot write the store ({reason}"
            + (f": {e.filename}" if e.filename else "") + "); "
            + (f"left unfinished (its {INCOMPLETE} marker says so: nothing trains from it)"
               if os.path.exists(os.path.join(out, INCOMPLETE)) else "nothing written")
            + "; allowed: free space there (or another --out), then the same command again"
        ) from None


def write(out: str, docs, function: Tokenize, manifest: dict, num_proc: int, print_fn) -> dict:
    """prepare's writing, once everything is checked: the splits, then the manifest."""
    import datasets
    import pyarrow as pa

    dtype = function.dtype
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, INCOMPLETE), "w").close()  # removed once manifest.json is written
    for name in ("manifest.json", *SPLITS, ".cache"):  # an unfinished prepare's
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    for split in SPLITS:
        os.makedirs(os.path.join(out, split))
    cache = os.path.join(out, ".cache")
    sequence = getattr(datasets, "List", None) or datasets.Sequence  # List: datasets >= 4
    features = datasets.Features({"eval": datasets.Value("bool"),
                                  "ids": sequence(datasets.Value(dtype.name)),
                                  "bytes": datasets.Value("int64")})
    counts = {split: {"tokens": 0, "documents": 0} for split in SPLITS}
    total, step, text_bytes = len(docs), shard_size(len(docs)), 0
    started = time.perf_counter()
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one line per shard instead
    files = {split: open(os.path.join(out, split, "tokens.bin"), "wb") for split in SPLITS}
    try:
        for start in range(0, total, step):
            stop = min(total, start + step)
            shard = docs.select(range(start, stop))
            procs = min(num_proc, stop - start)
            os.makedirs(cache, exist_ok=True)
            # Rows in flight are bounded in documents, not bytes: BATCH of them per process in
            # map's writer and in the read-back below, so a corpus of 1 MB files holds
            # ~BATCH MB of text (and 4x that in int32 ids) per process, not a shard's worth.
            tokens = shard.map(function, batched=True, batch_size=BATCH, with_indices=True,
                               writer_batch_size=BATCH,
                               fn_kwargs={"offset": start}, remove_columns=shard.column_names,
                               features=features, num_proc=procs if procs > 1 else None,
                               cache_file_name=os.path.join(cache, "shard.arrow"),
                               new_fingerprint=f"prepare-{start}", load_from_cache_file=False)
            for table in tokens.with_format("arrow").iter(batch_size=BATCH):
                held_out = table.column("eval").to_numpy(zero_copy_only=False)
                ids = table.column("ids")
                text_bytes += int(np.sum(table.column("bytes").to_numpy()))
                for split, rows in (("train", ~held_out), ("eval", held_out)):
                    if not rows.any():
                        continue
                    chosen = ids.filter(pa.array(rows)).combine_chunks()
                    values = chosen.flatten().to_numpy(zero_copy_only=False)
                    files[split].write(np.ascontiguousarray(values, dtype).tobytes())
                    counts[split]["tokens"] += len(values)
                    counts[split]["documents"] += len(chosen)
            del tokens, shard
            shutil.rmtree(cache, ignore_errors=True)
            if stop < total:
                elapsed = time.perf_counter() - started
                print_fn(f"prepare: {stop:,} of {total:,} documents ({stop / total:.0%}), "
                         f"{sum(c['tokens'] for c in counts.values()):,} tokens, "
                         f"{_size(text_bytes / elapsed)}/s of text, "
                         f"ETA {_eta(elapsed * (total - stop) / stop)}")
    finally:
        for f in files.values():
            f.close()
        if bars:
            datasets.enable_progress_bars()
    seconds = time.perf_counter() - started
    manifest["source"]["documents"] = total
    manifest["splits"] = counts
    manifest["created"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    manifest["seconds"] = round(seconds, 2)
    tmp = os.path.join(out, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, os.path.join(out, "manifest.json"))
    os.remove(os.path.join(out, INCOMPLETE))
    size = sum(counts[s]["tokens"] for s in SPLITS) * dtype.itemsize
    splits = ", ".join(f"{s} {counts[s]['tokens']:,} tokens in {counts[s]['documents']:,} "
                       "documents" for s in SPLITS)
    print_fn(f"prepared {out}: {splits}; {_size(size)} ({dtype.name}) from {_size(text_bytes)} "
             f"of text in {seconds:.1f} s ({_size(text_bytes / max(seconds, 1e-9))}/s, "
             f"{num_proc} processes)")
    return manifest
