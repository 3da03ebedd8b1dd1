"""On a GPU: moejax's cuDNN attention paths against XLA's attention in float32, values and
gradients, for what no CPU host can run: the plain causal call, a sliding window, the packed
layout for documents with few runs per row and with more than cudnn_attention.PACKED_RUNS
(which must take XLA's flash attention instead), and gpt-oss's sinks on both layouts
(cudnn_attention.py). Also what the packed step keeps for its backward, as XLA compiles
it. Run by bench/gpu.sh:

  python bench/attention_gpu.py [SEQ]
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from moejax.model import cudnn_attention, kernels

seq = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
b, h, kv, hd = 2, 8, 2, 128
keys = jax.random.split(jax.random.key(0), 4)
q, dy = (jax.random.normal(key, (b, seq, h, hd), jnp.bfloat16) for key in keys[:2])
k, v = (jax.random.normal(key, (b, seq, kv, hd), jnp.bfloat16) for key in keys[2:])
rng = np.random.default_rng(0)


def rows_of(runs: int) -> jnp.ndarray:
    """[b, seq]: `runs` documents per row at random cuts (the last row's last one padding)."""
    out = np.zeros((b, seq), np.int32)
    for r in range(b):
        cuts = np.sort(rng.choice(np.arange(1, seq), runs - 1, replace=False))
        out[r] = np.searchsorted(cuts, np.arange(seq), side="right") + 1
    out[-1, out[-1] == runs] = 0
    return jnp.asarray(out)


def step(q, k, v, dy, segments, sinks, window: int = 0):
    """causal's output and its gradients (q, k, v[, sinks]) at cotangent dy, as the train
    step runs it."""
    args = (q, k, v) if sinks is None else (q, k, v, sinks)
    y, vjp = jax.vjp(lambda q, k, v, *s: kernels.causal(q, k, v, None, None, segments, window,
                                                        *s), *args)
    return (y, *vjp(dy))


def reference(segments, sinks, window: int):
    """The same from XLA's attention in float32."""
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    args = f32 if sinks is None else (*f32, sinks)
    y, vjp = jax.vjp(lambda q, k, v, *s: kernels.xla(q, k, v, None, segments, window, *s),
                     *args)
    return (y, *vjp(dy.astype(jnp.float32)))


step = jax.jit(step, static_argnames="window")
sinks = 2.0 * jax.random.normal(jax.random.key(1), (h,), jnp.float32)
cases = [("causal", None, None, 0), ("window 256", None, None, 256),
         ("packed, 8 runs", rows_of(8), None, 0),
         (f"packed, {cudnn_attention.PACKED_RUNS + 8} runs", rows_of(cudnn_attention.PACKED_RUNS + 8), None, 0),
         ("packed, 8 runs, window 256", rows_of(8), None, 256),
         ("sinks, window 128", None, sinks, 128),
         ("sinks, packed, 8 runs", rows_of(8), sinks, 0),
         ("sinks, packed, window 128", rows_of(8), sinks, 128)]
print(f"{jax.devices()[0].device_kind}: b {b}, seq {seq}, heads {h}/{kv}, head dim {hd}, bf16")
print(f"{'case':<28} {'max |err| y':>12} {'dq':>9} {'dk':>9} {'dv':>9} {'dsinks':>9}")
for name, segments, s, window in cases:
    got = step(q, k, v, dy, segments, s, window=window)
    errors = [float(jnp.abs(g.astype(jnp.float32) - w).max())
              for g, w in zip(got, reference(segments, s, window), strict=True)]
    print(f"{name:<28} {errors[0]:>12.3g} " + " ".join(f"{e:>9.3g}" for e in errors[1:]))

memory = step.lower(q, k, v, dy, rows_of(8), None).compile().memory_analysis()
print(f"packed step's temporaries: {memory.temp_size_in_bytes / 2**20:.1f} MiB "
      f"(statistics [b x {cudnn_attention.PACKED_RUNS}, heads, seq] f32: "
      f"{b * cudnn_attention.PACKED_RUNS * h * seq * 4 / 2**20:.1f} MiB)")
