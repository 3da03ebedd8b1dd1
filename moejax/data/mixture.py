"""Weighted mixtures of prepared stores: data.mixture = 'stores/code:0.3,stores/web:0.7'.

With data.source='prepared' and data.path='', each entry DIR:WEIGHT is a token store that
`python -m moejax.data prepare` wrote with this config's tokenizer and eval_fraction (opened and
checked as data.path would be); weights are normalised to sum 1. A source is named by its
folder's name (its path where two folders share a name).

The mixture is grain's `MapDataset.mix`: row p of the mixture is the next row of one source,
chosen by a fixed interleaving of the weights (grain scales them to integers, the smallest to
100), so every prefix of the mixture holds each source in proportion to within a row or so,
and any row p is found in O(K) without reading the ones before it. Global batch `step` is rows
step * batch_size ... of it, a function of (seed, step) alone. Each source's own rows are its
split in grain's index-shuffled order (its own seed), epoch after epoch, each sequence once per
epoch. Held-out batches: the same interleaving over each store's eval split, in each split's
own order (no shuffle), so eval batch k is the same rows in every run.
"""

import os
import sys

import grain
import numpy as np

from moejax.config_lib import ConfigError, parse_mixture
from moejax.data import store


def source_names(paths: list[str]) -> list[str]:
    """Each store's folder name; its path where two folders share a name."""
    base = [os.path.basename(os.path.normpath(p)) or p for p in paths]
    return [b if base.count(b) == 1 else p for b, p in zip(base, paths, strict=True)]


def seed_of(seed: int, source: int) -> int:
    """Source `source`'s shuffle seed: its own, so two sources of one size differ in order."""
    return int(np.random.SeedSequence([seed, source]).generate_state(1)[0])


class Mixture:
    """K sources with weights as one grain MapDataset of rows (`rows`), and where each row of
    it comes from (`taken`)."""

    def __init__(self, names, weights, sequences, seed: int, shuffle: bool):
        self.names, self.weights = list(names), [float(w) for w in weights]
        sources = [grain.MapDataset.source(rows) for rows in sequences]
        if shuffle:
            sources = [s.shuffle(seed_of(seed, i)) for i, s in enumerate(sources)]
        # (source, its row index) for every row of the mixture: grain picks the source and
        # counts that source's rows (on past its end: the next epoch); the rows themselves
        # are read only when asked for.
        self.picks = grain.MapDataset.mix(
            [grain.MapDataset.range(sys.maxsize).map(lambda j, i=i: (i, j))
             for i in range(len(sources))], self.weights)
        self.rows = self.picks.map(lambda pick: sources[pick[0]][pick[1]])

    def taken(self, n: int) -> np.ndarray:
        """Rows each source gave among the mixture's first n, [K]. A source's rows come in
        order, so its count is one past the index of its last row there: looking back from row
        n - 1 finds every source within about 1 / (its weight) rows."""
        counts, p = [None] * len(self.names), n - 1
        while p >= 0 and None in counts:
            i, j = self.picks[p]
            counts[i] = j + 1 if counts[i] is None else counts[i]
            p -= 1
        return np.array([c or 0 for c in counts], np.int64)


def make(cfg, tokenizer, split: str, seed: int) -> Mixture:
    """The data.mixture of `split` (train: each source shuffled; eval: each in order)."""
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
    return Mixture(source_names(paths), [w for _, w in entries], sequences, seed,
                   shuffle=split == "train")


def line(mixture: Mixture | None, batch_size: int, steps: int) -> str | None:
    """The realised proportions of steps 0 .. steps-1, one line (None: not a mixture)."""
    if mixture is None:
        return None
    steps = max(1, steps)
    rows = mixture.taken(steps * batch_size)
    parts = [f"{name} {r / (steps * batch_size):.3f} (weight {w:.3f}, {r / steps:.1f} of "
             f"{batch_size} rows/step avg)"
             for name, w, r in zip(mixture.names, mixture.weights, rows, strict=True)]
    return f"data mixture over {steps:,} steps: " + ", ".join(parts)


def scalars(mixture: Mixture | None, batch_size: int, step: int) -> dict[str, float]:
    """{'data/mix/NAME': NAME's share of the rows of batches 0 .. step-1}, what TensorBoard
    shows at step `step` (which took batch step - 1); {} if not a mixture."""
    if mixture is None or step < 1:
        return {}
    rows = mixture.taken(step * batch_size) / (step * batch_size)
    return {f"data/mix/{name}": float(r) for name, r in zip(mixture.names, rows, strict=True)}
