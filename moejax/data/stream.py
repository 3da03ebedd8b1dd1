"""A streamed dataset as a grain IterDataset: read once, shuffled in a buffer, resumed where
it stopped.

Grain has no Hugging Face streaming source, so this is one, written as grain's own sources
are (an IterDataset whose iterator has get_state / set_state): the loader runs it through
the same prefetching and checkpointing as every other source (loader.py). Each host streams
its own 1/P of the documents (`split_dataset_by_node`), tokenizes them and packs rows of
seq_len + 1 tokens; training rows then pass through a shuffle buffer of data.shuffle_buffer
rows (a random one out, the next row in). Its state, the *position* (Hugging Face's
`IterableDataset.state_dict()`, the tokens not yet in a full row, the buffer's rows and its
random state), is saved with every checkpoint, so a resumed run reads on from there: no
document is read twice. A train stream that ends starts over from its first document (the
next epoch); the buffer carries across, so no two epochs give the same order.
"""

import contextlib
import logging

import grain
import jax
import numpy as np

from moejax.config_lib import ConfigError
from moejax.data.text import batch_arrays, hf_dataset, split_parts

log = logging.getLogger(__name__)


class StreamEnded(ValueError):
    """A split's stream ran out where it cannot start over: a held-out split shorter than the
    batches read from it, or an empty split."""

    def __init__(self, message: str, cfg, split: str):
        super().__init__(message)
        self.cfg, self.split = cfg, split

    def one_line(self) -> ConfigError:
        """What the user can change, for the one-line error of a run that needs the rows."""
        more = ("a larger data.eval_fraction, more documents, or fewer held-out batches "
                "(train.eval_batches)" if self.split == "eval" else
                "a smaller data.eval_fraction, or more documents")
        return ConfigError(f"data.eval_fraction={self.cfg.eval_fraction!r}: "
                           f"{str(self).removeprefix('data: ')}; allowed: {more}")


class StreamDataset(grain.IterDataset):
    """This host's `rows` rows of each global batch, [rows, seq_len + 1] int32, in order."""

    def __init__(self, cfg, tokenizer, split: str, seed: int, rows: int):
        super().__init__()
        self.cfg, self.tokenizer, self.split, self.seed, self.rows = (
            cfg, tokenizer, split, seed, rows)

    def __iter__(self) -> "StreamIterator":
        return StreamIterator(self)


class StreamIterator(grain.DatasetIterator):
    def __init__(self, ds: StreamDataset):
        super().__init__()
        self.cfg, self.tokenizer, self.split, self.rows = ds.cfg, ds.tokenizer, ds.split, ds.rows
        self.buffer_rows = self.cfg.shuffle_buffer if self.split == "train" else 0
        rng = np.random.default_rng([ds.seed, jax.process_index()])
        self.set_state({"batches": 0, "epoch": 0, "documents": 0, "epoch_tokens": 0,
                        "dataset": None, "pending": np.zeros((0,), np.int32),
                        "rng": rng.bit_generator.state,
                        "buffer": np.zeros((0, self.cfg.seq_len + 1), np.int32)})

    def _read(self, dataset_state: dict | None):
        """Iterate this host's part of the documents from `dataset_state` (None: the first)."""
        from datasets.distributed import split_dataset_by_node

        self.ds = split_dataset_by_node(hf_dataset(self.cfg, streaming=True),
                                        rank=jax.process_index(), world_size=jax.process_count())
        if dataset_state is not None:
            self.ds.load_state_dict(dataset_state)
        self.docs = iter(self.ds)

    def set_state(self, state: dict):
        self.batches, self.epoch, self.documents = (
            state["batches"], state["epoch"], state["documents"])
        self.epoch_tokens, self.pending = state["epoch_tokens"], state["pending"]
        self.buffer = list(state["buffer"])
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]
        self._read(state["dataset"])

    def get_state(self) -> dict:
        width = self.cfg.seq_len + 1
        return {"batches": self.batches, "epoch": self.epoch, "documents": self.documents,
                "epoch_tokens": self.epoch_tokens, "dataset": self.ds.state_dict(),
                "pending": self.pending, "rng": self.rng.bit_generator.state,
                "buffer": np.stack(self.buffer) if self.buffer else np.zeros((0, width),
                                                                             np.int32)}

    def _packed(self) -> np.ndarray:
        """The stream's next row of seq_len + 1 tokens, reading documents as it needs them."""
        width = self.cfg.seq_len + 1
        while len(self.pending) < width:
            doc = next(self.docs, None)
            if doc is None:
                if self.split == "eval" or not self.epoch_tokens:
                    raise StreamEnded(f"data: the {self.split} stream ran out (it holds "
                                      f"{self.epoch_tokens} {self.split} tokens per pass) at "
                                      f"batch {self.batches}", self.cfg, self.split)
                self._read(None)  # epoch + 1, from the first document
                self.epoch, self.documents, self.epoch_tokens = self.epoch + 1, 0, 0
                continue
            # Membership in a split goes by the document's index in this host's stream.
            parts = split_parts(str(self.documents), doc[self.cfg.text_key],
                                self.cfg.eval_fraction, self.split)
            self.documents += 1
            new = [t for p in parts for t in (self.tokenizer.encode(p), [self.tokenizer.eos_id])]
            self.epoch_tokens += sum(len(t) for t in new)
            self.pending = np.concatenate([self.pending, *new]).astype(np.int32)
        row, self.pending = self.pending[:width], self.pending[width:]
        return row

    def _row(self) -> np.ndarray:
        if not self.buffer_rows:
            return self._packed()
        while len(self.buffer) < self.buffer_rows:
            self.buffer.append(self._packed())
        i = int(self.rng.integers(len(self.buffer)))
        row, self.buffer[i] = self.buffer[i], self.buffer[-1]
        self.buffer.pop()
        return row

    def __next__(self) -> np.ndarray:
        out = np.stack([self._row() for _ in range(self.rows)])
        self.batches += 1
        return out

    def skip(self, batches: int):
        """Read and drop `batches` batches: where no saved position says where to go on."""
        for _ in range(batches * self.rows):
            self._row()
        self.batches += batches


class StreamBatches:
    """A streamed split's batches, read in order by each host (see the module docstring)."""

    mixture = None

    def __init__(self, cfg, tokenizer, split: str, seed: int):
        self.cfg, self.tokenizer, self.split, self.seed = cfg, tokenizer, split, seed

    def arrays(self, rows) -> dict:
        """A host's rows as the train step's arrays (text.batch_arrays)."""
        return batch_arrays(rows, self.tokenizer.eos_id, self.cfg.documents)

    def host(self, mine: slice) -> StreamDataset:
        """This host's rows `mine` of global batch 0, 1, ...; its state is the position."""
        return StreamDataset(self.cfg, self.tokenizer, self.split, self.seed,
                             mine.stop - mine.start)

    def position(self, step: int, mine: slice) -> dict | None:
        """The position before batch `step` where no checkpoint saved it (one of another
        number of processes): re-read and skip to it."""
        if not step:
            return None
        log.warning(f"data: no saved position of the {self.split} stream for step {step}: "
                    f"reading and skipping the {step * (mine.stop - mine.start)} rows before it")
        with contextlib.closing(iter(self.host(mine))) as reader:
            reader.skip(step)
            return reader.get_state()
