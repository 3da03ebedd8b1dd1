"""Text to tokens to rows: tokenizers, the documents of each source, the held-out split, and
packing into rows of seq_len + 1 tokens. The bottom of the data path: nothing here knows
about batches, hosts or checkpoints.

Sources (data.source): `stdlib` (the Python standard library's own .py files: on every
machine with Python, nothing to download), `files` (local text / json / parquet through
Hugging Face `datasets`) and `hub` (a Hugging Face dataset by name, optionally streamed:
stream.py); `prepared` is a token store made from one of them (store.py). Documents are
joined with an end-of-document token and cut into rows of seq_len + 1 tokens. The held-out
split takes whole stdlib files; of `files` and `hub` documents it takes chunks of CHUNK_CHARS
characters, so that even one long file gives both splits.
"""

import glob
import itertools
import logging
import math
import os
import sysconfig
import zlib

import numpy as np

from moejax.config_lib import ConfigError, first_line

log = logging.getLogger(__name__)

CHUNK_CHARS = 2048  # files / hub: the held-out split takes whole chunks of documents
EXTENSIONS = {"text": "txt", "json": "jsonl", "parquet": "parquet"}  # for error messages


class ByteTokenizer:
    """UTF-8 bytes plus one end-of-document token: no vocabulary file, nothing to download."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer: a tokenizer.json path or a hub name."""

    def __init__(self, name_or_path: str):
        from tokenizers import Tokenizer

        self.name = name_or_path
        if os.path.exists(name_or_path):
            path = name_or_path
            if os.path.isdir(path):
                path = os.path.join(path, "tokenizer.json")
            self.tok = Tokenizer.from_file(path)
        else:
            self.tok = Tokenizer.from_pretrained(name_or_path)
        self.vocab_size = self.tok.get_vocab_size()
        eos = next((t for t in ("</s>", "<|endoftext|>", "<eos>", "[SEP]")
                    if self.tok.token_to_id(t) is not None), None)
        self.eos_id = self.tok.token_to_id(eos) if eos else self.vocab_size - 1

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def make_tokenizer(name: str):
    if name == "byte":
        return ByteTokenizer()
    try:
        return HFTokenizer(name)
    except Exception as e:  # a missing package, file or hub name: all mean this value is wrong
        raise ConfigError(f"data.tokenizer={name!r}: cannot load ({first_line(e)}); allowed: "
                          "byte, a tokenizer.json file or its folder, or a Hugging Face "
                          "tokenizer name") from None


def check_vocab(vocab_size: int, tokenizer) -> None:
    """model.vocab_size must hold every id the tokenizer makes (0: take the tokenizer's)."""
    if vocab_size and vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size}: smaller than tokenizer "
                          f"{tokenizer.name!r}'s {tokenizer.vocab_size} tokens; allowed: 0 (the "
                          f"tokenizer's) or >= {tokenizer.vocab_size}")


def stdlib_files() -> list[str]:
    """The standard library's .py files, tests and installed packages left out, in the order
    of their paths under its root. The walk never enters the folders it leaves out (a glob
    would read all of site-packages first)."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "test", "tests", "idle_test"}
    files = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        files += [os.path.join(folder, n) for n in names
                  if n.endswith(".py") and not n.startswith(".")]
    return sorted(files, key=lambda f: os.path.relpath(f, root))


def _unit_hash(key: str) -> float:
    """A stable hash of a document's name or index, in [0, 1)."""
    return zlib.crc32(key.encode()) / 2**32


def is_eval_doc(key: str, eval_fraction: float) -> bool:
    """Whether the whole document `key` is held out."""
    return _unit_hash(key) < eval_fraction


def split_parts(key: str, text: str, eval_fraction: float, split: str) -> list[str]:
    """The parts of document `key` that belong to `split` ('train' or 'eval').

    The document is cut into chunks of CHUNK_CHARS characters. With u the hash of `key` in
    [0, 1), chunk c is held out when (u + c * eval_fraction) mod 1 < eval_fraction: chunk 0
    exactly when the whole document was before (is_eval_doc), then one chunk in every
    1 / eval_fraction, so a document of that many chunks always gives both splits. Consecutive
    chunks of one split are joined back: only a change of split cuts the text.
    """
    u = _unit_hash(key)
    chunks = max(1, math.ceil(len(text) / CHUNK_CHARS))
    mine = [((u + c * eval_fraction) % 1.0 < eval_fraction) == (split == "eval")
            for c in range(chunks)]
    parts = []
    for member, run in itertools.groupby(range(chunks), key=mine.__getitem__):
        if member:
            run = list(run)
            parts.append(text[run[0] * CHUNK_CHARS: (run[-1] + 1) * CHUNK_CHARS])
    return parts


def check_path(cfg) -> None:
    """data.path (source `files`) is a glob matching at least one file."""
    if os.path.isdir(cfg.path):
        example = os.path.join(cfg.path, "*." + EXTENSIONS.get(cfg.format, "txt"))
        raise ConfigError(f"data.path={cfg.path!r}: a directory; allowed: a glob of the files "
                          f"in it, e.g. {example!r}")
    if all(os.path.isdir(f) for f in glob.glob(cfg.path, recursive=True)):
        raise ConfigError(f"data.path={cfg.path!r}: no file matches; allowed: a glob of local "
                          "files")


def not_parquet(f: str) -> ConfigError:
    return ConfigError(f"data.format='parquet': {f} is not a parquet file (no PAR1 header); "
                       "allowed: parquet files, or data.format='text' or 'json' for text")


def readable_files(cfg) -> list[str]:
    """The files matching data.path that read to the end (text and json: as UTF-8). Any other
    is skipped and counted (data.on_error = skip) or stops the run (fail)."""
    files = [f for f in sorted(glob.glob(cfg.path, recursive=True)) if not os.path.isdir(f)]
    good, bad, wrong_format = [], [], []
    binary = cfg.format == "parquet"
    for f in files:
        try:
            with open(f, "rb" if binary else "r", encoding=None if binary else "utf-8") as fh:
                if binary and fh.read(4) != b"PAR1":
                    if cfg.on_error == "fail":
                        raise not_parquet(f)
                    wrong_format.append(f)
                    bad.append(f"{f} (not parquet)")
                    continue
                while fh.read(1 << 24):  # in pieces: a file may be larger than memory
                    pass
            good.append(f)
        except (OSError, UnicodeDecodeError) as e:
            reason = (f"not UTF-8: {e.reason}" if isinstance(e, UnicodeDecodeError)
                      else e.strerror or str(e))
            if cfg.on_error == "fail":
                raise ConfigError(f"data.on_error='fail': {f}: {reason}; allowed: readable "
                                  "UTF-8 files, or data.on_error='skip'") from None
            bad.append(f"{f} ({reason})")
    if bad:
        summary = f"{len(bad)} of {len(files)} files: {'; '.join(bad[:3])}"
        if not good and wrong_format:
            raise not_parquet(wrong_format[0])
        if not good:
            raise ConfigError(f"data.path={cfg.path!r}: no readable file ({summary}); allowed: "
                              "a glob matching readable UTF-8 files")
        log.warning(f"data: skipped {summary}{'; ...' if len(bad) > 3 else ''}")
    return good


def hf_dataset(cfg, streaming: bool):
    """The `files` or `hub` source as a Hugging Face dataset (iterable when streaming)."""
    import datasets

    if cfg.source == "files":
        files = readable_files(cfg)
        kwargs = {"sample_by": "document"} if cfg.format == "text" else {}
        ds = datasets.load_dataset(cfg.format, data_files=files, split="train",
                                   streaming=streaming, **kwargs)
        where = files[0] + (f" (and {len(files) - 1} more files)" if len(files) > 1 else "")
        columns = ["text"] if cfg.format == "text" else ds.column_names
    else:
        try:
            ds = datasets.load_dataset(cfg.path, cfg.hub_config or None, split=cfg.split,
                                       streaming=streaming)
        except Exception as e:  # offline, gated, misspelled: this dataset cannot be had
            raise ConfigError(f"data.path={cfg.path!r}: cannot load from the hub "
                              f"({first_line(e)}); allowed: a hub dataset you can reach, "
                              "or data.source='files'") from None
        where, columns = f"data.path={cfg.path!r}", ds.column_names
    if columns is not None and cfg.text_key not in columns:  # None: a stream of unknown keys
        raise ConfigError(f"data.text_key={cfg.text_key!r}: not a key of {where} (its keys: "
                          f"{', '.join(columns)}); allowed: one of its keys")
    return ds


def load_documents(cfg, split: str) -> list[str]:
    """All documents of `split` ('train' or 'eval') as strings (non-streaming sources)."""
    if cfg.source == "stdlib":
        root = sysconfig.get_paths()["stdlib"]
        names = [f for f in stdlib_files()
                 if is_eval_doc(os.path.relpath(f, root), cfg.eval_fraction) == (split == "eval")]
        texts = []
        for name in names:
            with open(name, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
        return texts
    texts = hf_dataset(cfg, streaming=False)[cfg.text_key]
    return [p for i, t in enumerate(texts)
            for p in split_parts(str(i), t, cfg.eval_fraction, split)]


def batch_arrays(rows: np.ndarray, eos_id: int | None, documents: bool) -> dict:
    """A batch's rows as the train step takes them: {"tokens", "segments", "loss_mask"}, each
    int32 [rows, seq_len + 1]. `rows`: token rows [n, seq_len + 1] of documents joined by EOS
    (a token after an EOS starts the next document: segments 1, 2, ... along the row, every
    token scored), or [n, 3, seq_len + 1] rows that say so themselves (chat.py: tokens,
    segments with 0 for padding, loss_mask; replay.py's add "routing", [n, seq_len + 1,
    layers x top_k] recorded experts). documents=False: one document per row, as
    before data.documents existed (attention and positions run across documents)."""
    rows = np.asarray(rows, np.int32)
    routing = {}
    if rows.ndim == 3:
        tokens, segments, loss_mask = rows[:, 0], rows[:, 1], rows[:, 2]
        if rows.shape[1] > 3:  # replay.py's: each token's recorded experts, [n, S + 1, L * k]
            routing = {"routing": np.ascontiguousarray(rows[:, 3:].transpose(0, 2, 1))}
    else:
        tokens, loss_mask = rows, np.ones_like(rows)
        ends = np.zeros_like(rows) if eos_id is None else (rows == eos_id).astype(np.int32)
        segments = 1 + np.cumsum(ends, axis=1) - ends  # the EOS ends its own document
    if not documents:
        segments = (segments != 0).astype(np.int32)
    return {"tokens": tokens, "segments": segments, "loss_mask": loss_mask, **routing}


def pack(texts, tokenizer, seq_len: int) -> np.ndarray:
    """Documents joined by EOS and cut into rows of seq_len + 1 tokens (inputs and targets)."""
    eos = np.array([tokenizer.eos_id], np.int32)
    parts = [p for t in texts for p in (tokenizer.encode(t), eos)]
    tokens = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
    rows = len(tokens) // (seq_len + 1)
    return tokens[: rows * (seq_len + 1)].reshape(rows, seq_len + 1)
