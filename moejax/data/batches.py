"""One split's global batches, the top of the data path: `make_batches` picks the source.

Global batch s is a function of (seed, s) alone, whatever the number of hosts: rows
s * batch_size ... (s + 1) * batch_size - 1 of the split's rows, in grain's index-shuffled
order for training (a new order each epoch, each row once per epoch, any row found without
reading the ones before it), in order for the held-out split. The rows are a grain MapDataset
over the packed documents (in memory), over a prepared store's memory map (store.py), or over
a weighted mixture of stores (mixture.py). Each host reads only its own rows of each batch
(which ones, loader.py learns from the batch's sharding). A streamed source is read in order
by each host through a shuffle buffer instead (stream.py).
"""

import sys

import grain
import numpy as np

from moejax.config_lib import ConfigError
from moejax.data import mixture as mixture_lib, store, text
from moejax.data.stream import StreamBatches


class Batches:
    """Global batch s is rows s * batch_size ... of `rows`, a grain MapDataset that runs on
    past its end (epoch after epoch). `mixture`: where its rows come from, if a mixture.
    `eos_id` ends a document in token rows (None: a row is one document); `documents`:
    data.documents (text.batch_arrays)."""

    def __init__(self, rows: grain.MapDataset, batch_size: int,
                 mixture: mixture_lib.Mixture | None = None, eos_id: int | None = None,
                 documents: bool = True):
        self.rows, self.batch_size, self.mixture = rows, batch_size, mixture
        self.eos_id, self.documents = eos_id, documents

    def arrays(self, rows) -> dict:
        """A host's rows as the train step's arrays (text.batch_arrays)."""
        return text.batch_arrays(rows, self.eos_id, self.documents)

    def host_batches(self, mine: slice) -> grain.MapDataset:
        """Element s: this host's rows `mine` of global batch s, [rows, seq_len + 1] int32
        (chat rows: [rows, 3, seq_len + 1]); no other row is read."""
        local = mine.stop - mine.start

        def row(i):  # the host's i-th row: row mine.start + i % local of batch i // local
            return self.rows[i // local * self.batch_size + mine.start + i % local]

        return (grain.MapDataset.range(sys.maxsize).map(row)
                .batch(local, batch_fn=lambda rows: np.stack(rows).astype(np.int32)))

    def host(self, mine: slice) -> grain.IterDataset:
        """host_batches in order, from batch 0; the iterator's state is grain's,
        {"next_index": the next batch}."""
        return self.host_batches(mine).to_iter_dataset(
            grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))

    def position(self, step: int, mine: slice) -> dict:
        """The host iterator's state before batch `step`: computed, nothing read."""
        return {"next_index": step}


def make_batches(cfg, tokenizer, split: str, seed: int, model=None) -> Batches | StreamBatches:
    """Training batches are shuffled; eval batches are the first ones of the held-out split.
    A data.mixture gives weighted batches of several prepared stores (mixture.py). `model`:
    the model group, which data.format=replay's records must fit."""
    if cfg.get("mixture", ""):
        mixture = mixture_lib.make(cfg, tokenizer, split, seed)
        return Batches(mixture.rows, cfg.batch_size, mixture, tokenizer.eos_id, cfg.documents)
    if cfg.source == "prepared":
        sequences = store.open_split(cfg, tokenizer, split)
    else:
        if cfg.source == "files":
            text.check_path(cfg)
        if cfg.streaming:
            text.hf_dataset(cfg, streaming=True)  # its checks (files, text_key) before compiling
            return StreamBatches(cfg, tokenizer, split, seed)
        if cfg.format == "chat":  # [n, 3, S + 1] rows: tokens, segments, loss_mask
            from moejax.data import chat

            sequences = chat.rows(cfg, tokenizer, split)
        elif cfg.format == "replay":  # [n, 3 + L * k, S + 1]: and each token's experts
            from moejax.data import replay

            sequences = replay.rows(cfg, split, model)
        else:
            sequences = text.pack(text.load_documents(cfg, split), tokenizer, cfg.seq_len)
    if len(sequences) < cfg.batch_size:
        key = "data.source='stdlib'" if cfg.source == "stdlib" else f"data.path={cfg.path!r}"
        more = "more text, a larger data.eval_fraction" if split == "eval" else "more text"
        raise ConfigError(f"{key}: the {split} split holds {len(sequences)} sequences "
                          f"of data.seq_len + 1 = {cfg.seq_len + 1} tokens; allowed: at least "
                          f"data.batch_size={cfg.batch_size} ({more}, or a smaller batch "
                          "or seq_len)")
    return array_batches(sequences, cfg.batch_size, seed, shuffle=split == "train",
                         eos_id=tokenizer.eos_id, documents=cfg.documents)


def array_batches(sequences, batch_size: int, seed: int, shuffle: bool,
                  eos_id: int | None = None, documents: bool = True) -> Batches:
    """Batches of the rows of `sequences` ([n, seq_len + 1], an array or a memory map, or
    chat.py's [n, 3, seq_len + 1]): shuffled by grain's index shuffle (a new order each
    epoch), or in order."""
    rows = grain.MapDataset.source(sequences)
    return Batches(rows.shuffle(seed) if shuffle else rows, batch_size, eos_id=eos_id,
                   documents=documents)
