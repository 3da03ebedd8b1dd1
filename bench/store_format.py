"""The prepared store's format, measured: start-up, rows/s and peak RSS of reading shuffled
batches (64 rows of 1025 tokens) from a flat uint16 memory map through grain's index shuffle
(what moejax/data/store.py does), from the same map through the Feistel permutation moejax
used before grain (9dd715a), and from an ArrayRecord file of the rows through grain's source.

  python bench/store_format.py N_TOKENS STEPS ROOT MODE
  MODE: memmap_grain | memmap_feistel | array_record  (`pip install array_record` for the last)

Writes random tokens (and the ArrayRecord file) once per ROOT. Figures: docs/benchmarks.md."""

import os
import resource
import subprocess
import sys
import time

import grain  # imported by every run anyway: not part of the store's start-up
import numpy as np

N, STEPS, ROOT, MODE = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
W, B = 1025, 64
os.makedirs(ROOT, exist_ok=True)
flat = os.path.join(ROOT, "tokens.bin")
if not os.path.exists(flat):
    rng = np.random.default_rng(0)
    with open(flat, "wb") as f:
        for i in range(0, N, 1 << 24):
            f.write(rng.integers(0, 50000, min(1 << 24, N - i), np.uint16).tobytes())
rows_n = N // W
ar = os.path.join(ROOT, "rows.array_record")
if MODE == "array_record" and not os.path.exists(ar):
    from array_record.python import array_record_module

    t = time.perf_counter()
    mm = np.memmap(flat, np.uint16, mode="r")
    writer = array_record_module.ArrayRecordWriter(ar, "group_size:1")
    for i in range(rows_n):
        writer.write(mm[i * W:(i + 1) * W].tobytes())
    writer.close()
    print(f"array_record write: {time.perf_counter() - t:.1f} s, {os.path.getsize(ar) >> 20} "
          f"MiB (flat {os.path.getsize(flat) >> 20} MiB)")

t0 = time.perf_counter()
if MODE == "memmap_grain":
    rows = grain.MapDataset.source(
        np.memmap(flat, np.uint16, mode="r")[: rows_n * W].reshape(-1, W)).shuffle(0)

    def get_batch(s):  # row by row, as grain's batches read a MapDataset
        return np.stack([rows[s * B + r] for r in range(B)])
elif MODE == "memmap_feistel":
    old = subprocess.run(["git", "show", "9dd715a:moejax/store.py"], capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    head = old.stdout.split("# --- reading")[0].replace("from moejax import data", "")
    exec(compile(head, "store.py@9dd715a", "exec"), space := {})
    mm = np.memmap(flat, np.uint16, mode="r")[: rows_n * W].reshape(-1, W)

    def get_batch(s):  # as the old loader did: one vectorised permutation call per batch
        pos = np.arange(s * B, (s + 1) * B)
        ids = space["feistel"](pos % rows_n, rows_n, 0, int(pos[0] // rows_n))
        return mm[np.sort(ids)][np.argsort(np.argsort(ids))]
else:
    source = grain.sources.ArrayRecordDataSource([ar])
    order = grain.MapDataset.range(len(source)).shuffle(0)

    def get_batch(s):  # one batched read of the batch's records
        records = source.__getitems__([order[s * B + r] for r in range(B)])
        return np.stack([np.frombuffer(b, np.uint16) for b in records])
get_batch(0)
startup = time.perf_counter() - t0
t = time.perf_counter()
for s in range(STEPS):
    get_batch(s).astype(np.int32)
dt = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
print(f"{MODE}: {N / 1e6:.0f}M tokens, start-up (first batch) {startup * 1e3:.1f} ms, "
      f"{STEPS * B / dt:,.0f} rows/s ({STEPS * B * W / dt / 1e6:.1f}M tokens/s), "
      f"peak RSS {rss} MiB")
