"""Batches of a streamed dataset: read once, shuffled in a buffer, resumed where they stopped.

Each host streams its own 1/P of the documents (`split_dataset_by_node`), tokenizes them and
packs rows of seq_len + 1 tokens; training rows then pass through a shuffle buffer of
data.shuffle_buffer rows (a random one out, the next row in). Where the stream stands, its
*position* (Hugging Face's `IterableDataset.state_dict()`, the tokens not yet in a full row,
the buffer's rows and its random state), is saved with every checkpoint, one file per
process (PositionHandler), so a resumed run reads on from there: no document is read twice.
A train stream that ends starts over from its first document (the next epoch); the buffer
carries across, so no two epochs give the same order.
"""

import dataclasses
import json
import logging

import numpy as np
import orbax.checkpoint as ocp

from moejax.data import hf_dataset, split_parts

log = logging.getLogger(__name__)

KEEP = 8  # positions kept: the loader runs at most train.PREFETCH batches ahead of the saves


class StreamBatches:
    """This host's rows of global batch `step`, asked for in order (eval: from step 0 each
    pass, read once and kept). position(s) is where the stream stood before batch s; a new
    reader continues from it with restore(position, s)."""

    def __init__(self, cfg, tokenizer, split: str, seed: int):
        self.cfg, self.tokenizer, self.split, self.seed = cfg, tokenizer, split, seed
        self.buffer_rows = cfg.shuffle_buffer if split == "train" else 0
        self.next_step = None  # the batch the open stream gives next; None: not open
        self.positions = {}  # step -> the position before it: the last KEEP of them
        self.kept = {}  # eval: step -> rows, every pass asks for the same ones

    def _read(self, dataset_state: dict | None):
        """Iterate this host's part of the documents from `dataset_state` (None: the first)."""
        import jax
        from datasets.distributed import split_dataset_by_node

        self.ds = split_dataset_by_node(hf_dataset(self.cfg, streaming=True),
                                        rank=jax.process_index(), world_size=jax.process_count())
        if dataset_state is not None:
            self.ds.load_state_dict(dataset_state)
        self.docs = iter(self.ds)

    def _open(self, position: dict | None, step: int):
        """Open the stream at `position` (None: its start) as the one before batch `step`."""
        import jax

        if position is None:
            rng = np.random.default_rng([self.seed, jax.process_index()])
            position = {"epoch": 0, "documents": 0, "epoch_tokens": 0, "dataset": None,
                        "pending": np.zeros((0,), np.int32), "rng": rng.bit_generator.state,
                        "buffer": []}
        self.epoch, self.documents = position["epoch"], position["documents"]
        self.epoch_tokens, self.pending = position["epoch_tokens"], position["pending"]
        self.buffer = list(position["buffer"])
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = position["rng"]
        self._read(position["dataset"])
        self.next_step, self.positions = step, {step: position}

    def _position(self) -> dict:
        # Rows and token arrays are never written to once made, so a list of them is a copy.
        return {"epoch": self.epoch, "documents": self.documents,
                "epoch_tokens": self.epoch_tokens, "dataset": self.ds.state_dict(),
                "pending": self.pending, "rng": self.rng.bit_generator.state,
                "buffer": list(self.buffer)}

    def _packed(self) -> np.ndarray:
        """The stream's next row of seq_len + 1 tokens, reading documents as it needs them."""
        width = self.cfg.seq_len + 1
        while len(self.pending) < width:
            doc = next(self.docs, None)
            if doc is None:
                if self.split == "eval" or not self.epoch_tokens:
                    raise ValueError(f"data: the {self.split} stream ran out (it holds "
                                     f"{self.epoch_tokens} {self.split} tokens per pass)")
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

    def host_rows(self, step: int, rows: slice) -> np.ndarray:
        if step in self.kept:
            return self.kept[step]
        count = rows.stop - rows.start
        if step != self.next_step:  # a first call without a position, or a new eval pass
            self._open(None, 0)
            if step:
                log.warning(f"data: no saved position of the {self.split} stream for step "
                            f"{step}: reading and skipping the {step * count} rows before it")
            for _ in range(step * count):
                self._row()
        try:
            out = np.stack([self._row() for _ in range(count)])
        except ValueError as e:
            raise ValueError(f"{e} at step {step}") from None
        self.next_step = step + 1
        if self.split == "eval":
            self.kept[step] = out
        else:
            self.positions[step + 1] = self._position()
            self.positions.pop(step + 1 - KEEP, None)
        return out

    def position(self, step: int) -> dict:
        """Where the stream stood before batch `step` (one of the last KEEP it gave)."""
        return self.positions[step]

    def restore(self, position: dict | None, step: int):
        """Continue before batch `step` from `position` (a saved position(step)); None: no
        position was saved (another number of processes): re-read and skip to it."""
        if position is not None:
            self._open(position, step)


def encode(position: dict) -> dict:
    """A position as arrays for np.savez: its small values as JSON, its tokens as int32."""
    meta = {k: position[k] for k in ("epoch", "documents", "epoch_tokens", "dataset", "rng")}
    rows = position["buffer"]
    return {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8),
            "pending": position["pending"],
            "buffer": np.asarray(rows, np.int32).reshape(len(rows), len(rows[0]) if rows else 0)}


def decode(arrays) -> dict:
    return {**json.loads(arrays["meta"].tobytes()), "pending": arrays["pending"],
            "buffer": list(arrays["buffer"])}


class PositionHandler(ocp.CheckpointHandler):
    """Orbax item of every process's stream position: one process_I-of-N.npz each, in the
    checkpoint's directory, so it is written, renamed into place and deleted with it."""

    @staticmethod
    def _path(directory):
        import jax

        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.npz"

    def save(self, directory, args: "PositionSave"):
        with self._path(directory).open("wb") as f:
            np.savez(f, **encode(args.position))

    def restore(self, directory, args: "PositionRestore | None" = None) -> dict | None:
        """This process's position; None if the checkpoint was saved by another number of
        processes (each one's stream was another part of the documents)."""
        path = self._path(directory)
        if not path.exists():
            return None
        with path.open("rb") as f, np.load(f) as arrays:
            return decode(arrays)


@ocp.args.register_with_handler(PositionHandler, for_save=True)
@dataclasses.dataclass
class PositionSave(ocp.args.CheckpointArgs):
    position: dict


@ocp.args.register_with_handler(PositionHandler, for_restore=True)
@dataclasses.dataclass
class PositionRestore(ocp.args.CheckpointArgs):
    pass
