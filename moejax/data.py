"""Text -> tokens -> fixed-length sequences -> this host's rows of each global batch.

Sources (config.data.source): `stdlib` (the Python standard library's own .py files: on every
machine with Python, nothing to download), `files` (local text / json / parquet through
Hugging Face `datasets`) and `hub` (a Hugging Face dataset by name, optionally streamed).
Documents are joined with an end-of-document token and cut into sequences of seq_len + 1.

Batch order is a function of (seed, step) alone: step s takes sequences s*B .. s*B+B-1 of a
seeded permutation of the epoch, so a resumed run reads exactly the batches it would have
read, and every host, whatever the number of hosts, agrees on the global batch. Each host
reads only its own rows of it.
"""

import glob
import os
import sysconfig
import zlib

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes plus one end-of-document token: no vocabulary file, nothing to download."""

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
    return ByteTokenizer() if name == "byte" else HFTokenizer(name)


def stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "test", "tests", "idle_test"}
    files = [f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
             if not skip.intersection(os.path.relpath(f, root).split(os.sep))]
    return sorted(files, key=lambda f: os.path.relpath(f, root))


def is_eval_doc(key: str, eval_fraction: float) -> bool:
    """Whole documents are held out, chosen by a hash of their name or index: stable."""
    return zlib.crc32(key.encode()) / 2**32 < eval_fraction


def load_documents(cfg, split: str) -> list[str]:
    """All documents of `split` ('train' or 'eval') as strings (non-streaming sources)."""
    import datasets

    if cfg.source == "stdlib":
        root = sysconfig.get_paths()["stdlib"]
        names = [f for f in stdlib_files()
                 if is_eval_doc(os.path.relpath(f, root), cfg.eval_fraction) == (split == "eval")]
        texts = []
        for name in names:
            with open(name, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
        return texts
    if cfg.source == "files":
        files = sorted(glob.glob(cfg.path, recursive=True))
        kwargs = {"sample_by": "document"} if cfg.format == "text" else {}
        ds = datasets.load_dataset(cfg.format, data_files=files, split="train", **kwargs)
    else:  # hub
        ds = datasets.load_dataset(cfg.path, cfg.hub_config or None, split=cfg.split)
    texts = ds[cfg.text_key]
    return [t for i, t in enumerate(texts)
            if is_eval_doc(str(i), cfg.eval_fraction) == (split == "eval")]


def pack(texts, tokenizer, seq_len: int) -> np.ndarray:
    """Documents joined by EOS and cut into rows of seq_len + 1 tokens (inputs and targets)."""
    eos = np.array([tokenizer.eos_id], np.int32)
    parts = [p for t in texts for p in (tokenizer.encode(t), eos)]
    tokens = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
    rows = len(tokens) // (seq_len + 1)
    return tokens[: rows * (seq_len + 1)].reshape(rows, seq_len + 1)


class Batches:
    """Global batch `step` is a fixed function of (seed, step); each host reads its rows."""

    def __init__(self, sequences: np.ndarray, batch_size: int, seed: int, shuffle: bool):
        if len(sequences) < batch_size:
            raise ValueError(f"data: {len(sequences)} sequences, fewer than data.batch_size="
                             f"{batch_size}; use more text or a smaller batch / seq_len")
        self.sequences, self.batch_size, self.seed, self.shuffle = (
            sequences, batch_size, seed, shuffle)

    def indices(self, step: int) -> np.ndarray:
        """Sequence ids of global batch `step`, [batch_size]."""
        n = len(self.sequences)
        batches_per_epoch = n // self.batch_size  # the last partial batch of an epoch is skipped
        epoch, k = divmod(step, batches_per_epoch)
        order = np.arange(n)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        return order[k * self.batch_size: (k + 1) * self.batch_size]

    def host_rows(self, step: int, rows: slice) -> np.ndarray:
        """This host's rows `rows` of global batch `step`: [rows, seq_len + 1]."""
        return self.sequences[self.indices(step)[rows]]
