"""Weighted mixtures of prepared stores: data.mixture = 'stores/code:0.3,stores/web:0.7'.

With data.source='prepared' and data.path='', each entry DIR:WEIGHT is a token store that
`python -m moejax.data prepare` wrote with this config's tokenizer and eval_fraction (opened and
checked as data.path would be); weights are exact fractions, normalised to sum 1. A source is
named by its folder's name (its path where two folders share a name).

Global batch `step` is a function of (seed, step) alone, computed in O(batch_size) without
replaying earlier steps:

* How many rows each source gives: C_i(s), the rows source i gave in steps 0..s-1, is closed
  form. Source 0 takes C_0(s) = floor(N_0 * r_0 + phi_0) of the N_0 = s * batch_size rows,
  with r_0 = w_0 and phi_0 in [0, 1) drawn from (seed, 0); source 1 takes floor(N_1 * r_1 +
  phi_1) of the N_1 = N_0 - C_0(s) rows left, r_1 = w_1 / (w_1 + ... + w_{K-1}); and so on,
  the last taking the rest. Each C_i is non-decreasing in s, they sum to s * batch_size, and
  C_i(s) is within K rows of s * batch_size * w_i at every s (exact integer arithmetic), so the
  proportions over 1,000 steps equal the weights to within K / (1,000 * batch_size), and each
  step's count is within a row or two of batch_size * w_i.
* Which rows: the step's rows of all sources are interleaved by a permutation of the batch
  keyed by (seed, step), so every host and micro-batch sees the mixture, not one source.
* Which sequences: source i's rows of step s are positions C_i(s) .. C_i(s+1) - 1 of its own
  stream, epoch after epoch: position p is sequence store.feistel(p mod n_i, n_i, seed,
  p // n_i) of its split (n_i sequences), the order that store has alone, each sequence once
  per epoch.

Held-out batches: the same weights and schedule over each store's eval split, in each
split's own order (no shuffle), so eval batch k is the same rows in every run.
"""

import math
import os
from fractions import Fraction

import numpy as np

from moejax.config_lib import ConfigError, parse_mixture


def source_names(paths: list[str]) -> list[str]:
    """Each store's folder name; its path where two folders share a name."""
    base = [os.path.basename(os.path.normpath(p)) or p for p in paths]
    return [b if base.count(b) == 1 else p for b, p in zip(base, paths, strict=True)]


class MixtureBatches:
    """Global batch `step` of K sources with weights; each host reads its rows (host_rows)."""

    def __init__(self, names, weights, sequences, batch_size: int, seed: int, shuffle: bool):
        self.names, self.sequences = list(names), list(sequences)
        self.weights = [Fraction(w) for w in weights]
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        rest = [sum(self.weights[i:]) for i in range(len(self.weights))]
        self.ratios = [w / r for w, r in zip(self.weights, rest, strict=True)]
        self.phases = [Fraction(int(np.random.SeedSequence([seed, i, 0x6D6978])
                                    .generate_state(1)[0]), 2**32)
                       for i in range(len(self.weights))]

    def cumulative(self, step: int) -> np.ndarray:
        """Rows each source gave in steps 0 .. step-1, [K] (they sum to step * batch_size)."""
        left, out = step * self.batch_size, []
        for ratio, phase in zip(self.ratios, self.phases, strict=True):
            out.append(math.floor(left * ratio + phase))  # ratio 1 (the last): all left
            left -= out[-1]
        return np.array(out, np.int64)

    def counts(self, step: int) -> np.ndarray:
        """Rows of global batch `step` from each source, [K]."""
        return self.cumulative(step + 1) - self.cumulative(step)

    def mix(self, step: int) -> dict[str, int]:
        """{source name: rows of global batch `step`}."""
        return dict(zip(self.names, self.counts(step).tolist(), strict=True))

    def locate(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Each row of global batch `step`: its source and sequence id there, [batch_size] x2."""
        start, count = self.cumulative(step), self.counts(step)
        source = np.repeat(np.arange(len(count)), count)
        position = np.concatenate([np.arange(a, a + c) for a, c in zip(start, count,
                                                                       strict=True)])
        interleave = np.random.default_rng([self.seed, step, 0x6D6978]).permutation(
            self.batch_size)
        source, position = source[interleave], position[interleave]
        ids = np.empty_like(position)
        for i, rows in enumerate(self.sequences):
            mine = source == i
            epoch, k = np.divmod(position[mine], len(rows))
            if self.shuffle:
                from moejax import store

                k = k.copy()
                for e in np.unique(epoch):  # at most two: a step may cross an epoch's end
                    k[epoch == e] = store.feistel(k[epoch == e], len(rows), self.seed, int(e))
            ids[mine] = k
        return source, ids

    def host_rows(self, step: int, rows: slice) -> np.ndarray:
        """This host's rows `rows` of global batch `step`: [rows, seq_len + 1]; it reads
        those sequences of the memory maps and nothing else."""
        source, ids = (a[rows] for a in self.locate(step))
        out = np.empty((len(ids), self.sequences[0].shape[1]), np.int32)
        for i, sequences in enumerate(self.sequences):
            mine = source == i
            if mine.any():
                out[mine] = sequences[ids[mine]]
        return out


def make(cfg, tokenizer, split: str, seed: int) -> MixtureBatches:
    """The data.mixture batches of `split` (train: shuffled; eval: each split in order)."""
    from moejax import store

    entries = parse_mixture(cfg.mixture)
    paths = [p for p, _ in entries]
    sequences = []
    for path in paths:
        where = f"data.mixture entry {path!r}"
        rows = store.open_split(cfg, tokenizer, split, path=path, where=where)
        if len(rows) < cfg.batch_size:
            raise ConfigError(f"{where}: the {split} split holds {len(rows)} sequences of "
                              f"data.seq_len + 1 = {cfg.seq_len + 1} tokens; allowed: at least "
                              f"data.batch_size={cfg.batch_size} (more text, or a smaller "
                              "batch or seq_len)")
        sequences.append(rows)
    return MixtureBatches(source_names(paths), [w for _, w in entries], sequences,
                          cfg.batch_size, seed, shuffle=split == "train")


def line(batches, steps: int) -> str | None:
    """The realised proportions of steps 0 .. steps-1, one line (None: not a mixture)."""
    if not isinstance(batches, MixtureBatches):
        return None
    steps = max(1, steps)
    rows, b = batches.cumulative(steps), batches.batch_size
    parts = [f"{name} {r / (steps * b):.3f} (weight {float(w):.3f}, {r / steps:.1f} of {b} "
             "rows/step avg)" for name, w, r in zip(batches.names, batches.weights, rows,
                                                    strict=True)]
    return f"data mixture over {steps:,} steps: " + ", ".join(parts)


def scalars(batches, step: int) -> dict[str, float]:
    """{'data/mix/NAME': NAME's share of the rows of batches 0 .. step-1}, what TensorBoard
    shows at step `step` (which took batch step - 1); {} if not a mixture."""
    if not isinstance(batches, MixtureBatches) or step < 1:
        return {}
    rows = batches.cumulative(step) / (step * batches.batch_size)
    return {f"data/mix/{name}": float(r) for name, r in zip(batches.names, rows, strict=True)}
