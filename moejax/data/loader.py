"""This host's part of each global batch as a jax.Array, read ahead of the step by grain, and
where the reading stands saved with every checkpoint.

The loader is grain's: the split's per-host dataset (batches.py, stream.py) mapped to the
global jax.Array of each batch (`jax.make_array_from_process_local_data`) and run `depth`
batches ahead in grain's prefetch thread, so the step waits on the loader (reading, a
stream's tokenizing, the host -> device copy) only when the loader is slower than the step.
Threads, not grain's worker processes: a row of a store or of packed documents is a slice of
an array (no decoding to spread over processes), and a stream's position is one host's.

The iterator's state (grain's `get_state()`: {"next_index": s} of a random-access source, the
stream's position of a streamed one) is an orbax item of each checkpoint (`DataState`), one
file per process. A resumed run sets it and reads on; a checkpoint of another number of
processes has none for this one, and the state is computed from the step instead
(batches.position: exact for random access; a stream re-reads and skips).
"""

import contextlib
import dataclasses
import json
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from moejax.data.stream import StreamEnded

PREFETCH = 2  # train batches built ahead, while the steps before them run; 0: in the step


def host_rows(sharding, shape: tuple[int, int]) -> slice:
    """The rows of a global [batch, seq_len + 1] array that this host's devices hold."""
    spans = [idx[0] for idx in sharding.addressable_devices_indices_map(shape).values()]
    return slice(min(s.start or 0 for s in spans), max(s.stop or shape[0] for s in spans))


def global_batch(batches, sharding, rows, shape: tuple[int, int]) -> dict:
    """This host's `rows` of a batch -> the global batch: {"tokens", "segments", "loss_mask"}
    (and "routing"; text.batch_arrays), each a jax.Array of `shape` (and its trailing dims)
    laid out by `sharding`."""
    return {name: jax.make_array_from_process_local_data(sharding, a, (*shape, *a.shape[2:]))
            for name, a in batches.arrays(rows).items()}


def global_arrays(batches, sharding, shape: tuple[int, int]) -> grain.IterDataset:
    """Global batch 0, 1, ... of `batches` as dicts of jax.Arrays laid out by `sharding`."""
    return batches.host(host_rows(sharding, shape)).map(
        lambda rows: global_batch(batches, sharding, rows, shape))


class Loader:
    """Global batch `step`, `step` + 1, ... of `batches`, from `state` (a checkpoint's) or,
    where there is none, from the state the step implies."""

    def __init__(self, batches, sharding, shape: tuple[int, int], step: int,
                 state: dict | None = None, depth: int | None = None):
        ds = global_arrays(batches, sharding, shape)
        if depth := PREFETCH if depth is None else depth:
            ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=depth)
        self.iterator = iter(ds)
        if state is None:
            state = batches.position(step, host_rows(sharding, shape))
        if state is not None:
            self.iterator.set_state(state)
        self.iterator.start_prefetch()  # now, not at the first batch: it reads meanwhile
        self.waited_s, self.taken = 0.0, 0  # since the last waited_ms()

    def __next__(self) -> dict:
        started = time.perf_counter()
        try:
            batch = next(self.iterator)  # an error in reading it is raised here
        except StreamEnded as e:  # an empty train split: one line
            raise e.one_line() from None
        self.waited_s += time.perf_counter() - started
        self.taken += 1
        return batch

    def waited_ms(self) -> float:
        """Mean milliseconds a batch was waited for since the last call (0 if none)."""
        mean = 1e3 * self.waited_s / max(self.taken, 1)
        self.waited_s, self.taken = 0.0, 0
        return mean

    def state(self) -> dict:
        """Where the reading stands: before the batch after the last one taken."""
        return self.iterator.get_state()

    def close(self):
        self.iterator.close()
        # grain's prefetch iterator closes itself again when collected: let that be now, not
        # at interpreter exit, when the modules its close() needs are gone.
        self.iterator = None


def read_first(batches, mine: slice, count: int) -> list[np.ndarray]:
    """Rows `mine` of global batches 0 .. count - 1 of `batches`, read once. A stream with
    fewer rows (an empty or short held-out split) is one ConfigError line."""
    with contextlib.closing(iter(batches.host(mine))) as reader:
        try:
            return [next(reader) for _ in range(count)]
        except StreamEnded as e:
            raise e.one_line() from None


def first_batches(batches, sharding, shape: tuple[int, int], count: int) -> list[dict]:
    """Global batches 0 .. count - 1 (the held-out ones: read once and kept)."""
    return [global_batch(batches, sharding, rows, shape)
            for rows in read_first(batches, host_rows(sharding, shape), count)]


class DataState(ocp.CheckpointHandler):
    """Orbax item of every process's data iterator state: process_I-of-N.npz each (its arrays,
    a stream's tokens, as they are; the rest as JSON), in the checkpoint's directory, so it is
    written, renamed into place and deleted with it."""

    @staticmethod
    def _path(directory):
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.npz"

    def save(self, directory, args: "DataStateSave"):
        arrays = {k: v for k, v in args.state.items() if isinstance(v, np.ndarray)}
        rest = {k: v for k, v in args.state.items() if k not in arrays}
        with self._path(directory).open("wb") as f:
            np.savez(f, **arrays, _json=np.frombuffer(json.dumps(rest).encode(), np.uint8))

    def restore(self, directory, args: "DataStateRestore | None" = None) -> dict | None:
        """This process's state; None if the checkpoint was saved by another number of
        processes (each one read its own part of every batch)."""
        path = self._path(directory)
        if not path.exists():
            return None
        with path.open("rb") as f, np.load(f) as saved:
            return {**json.loads(saved["_json"].tobytes()),
                    **{k: saved[k] for k in saved.files if k != "_json"}}


@ocp.args.register_with_handler(DataState, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: dict


@ocp.args.register_with_handler(DataState, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass
