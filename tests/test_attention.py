"""The attention kernels: splash (in Pallas' interpreter) against a NumPy causal attention, with
and without documents, the TPU program as exported from this CPU host, cuDNN's packed call as
traced (its statistics' size, its runs against blockwise), and the CPU path against
jax's own attention. Context parallelism: tests/test_context.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import parallel
from moejax.model import cudnn_attention, kernels

H, HD = 4, 16


def visible(seq: int, window: int = 0, segments=None) -> np.ndarray:
    """[S, S] bool, written from the definition (transformers' sliding_window_causal_mask:
    kv <= q and kv > q - W; W = 0: no window), one pair at a time, within documents."""
    out = np.zeros((seq, seq), bool)
    for i in range(seq):
        for j in range(seq):
            out[i, j] = j <= i and (window == 0 or j > i - window) and (
                segments is None or segments[i] == segments[j])
    return out


def numpy_attention(q, k, v, dy, segments=None, window=0):
    """Causal grouped-query attention and its vjp, one (example, head) at a time:
    q, dy [B, S, H, hd], k, v [B, S, KV, hd] -> y, dq, dk, dv. With segments [B, S] a query
    sees only the keys of its own document, with `window` W only the W most recent."""
    q, k, v, dy = (np.asarray(a, np.float64) for a in (q, k, v, dy))
    y, dq, dk, dv = (np.zeros_like(a) for a in (q, q, k, v))
    group, scale = q.shape[2] // k.shape[2], q.shape[3] ** -0.5
    for b in range(q.shape[0]):
        hidden = ~visible(q.shape[1], window, None if segments is None else segments[b])
        for h in range(q.shape[2]):
            g = h // group  # the kv head this query head shares
            s = np.where(hidden, -np.inf, q[b, :, h] @ k[b, :, g].T * scale)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            y[b, :, h] = p @ v[b, :, g]
            dp = dy[b, :, h] @ v[b, :, g].T
            ds = p * (dp - (dp * p).sum(-1, keepdims=True))
            dq[b, :, h] = ds @ k[b, :, g] * scale
            dk[b, :, g] += ds.T @ q[b, :, h] * scale
            dv[b, :, g] += p.T @ dy[b, :, h]
    return y, dq, dk, dv


def documents(rows: int, seq: int, seed: int = 0) -> np.ndarray:
    """[rows, seq] int32: four documents of random lengths per row, 1 .. 4, then 0 to 5
    positions of padding (0)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((rows, seq), np.int32)
    for r in range(rows):
        cuts = np.sort(rng.choice(np.arange(2, seq - 2), 3, replace=False))
        out[r] = np.searchsorted(cuts, np.arange(seq), side="right") + 1
        out[r, seq - rng.integers(0, 6):] = 0
    return out


def inputs(batch, seq, kv, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seq + kv), 4)
    q, dy = (jax.random.normal(key, (batch, seq, H, HD), dtype) for key in keys[:2])
    k, v = (jax.random.normal(key, (batch, seq, kv, HD), dtype) for key in keys[2:])
    return q, k, v, dy


def check_against_numpy(fn, q, k, v, dy, segments=None):
    y, vjp = jax.vjp(fn, q, k, v)
    got = (y, *vjp(dy))
    want = numpy_attention(q, k, v, dy, segments)
    for name, a, b in zip("y dq dk dv".split(), got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("kv", [2, H])
def test_splash_matches_numpy(kv):
    # 384 = 3 blocks of 128: blocks on, below and above (skipped) the diagonal.
    q, k, v, dy = inputs(1, 384, kv)
    check_against_numpy(lambda q, k, v: kernels.splash(q, k, v, interpret=True), q, k, v, dy)


@pytest.mark.parametrize("kv", [1, 2, H])
def test_sharded_splash_matches_numpy(kv):
    # tensor=4 splits the 4 query heads; 1 or 2 kv heads cannot split alike and are repeated.
    mesh = parallel.make_mesh({"data": 2, "tensor": 4})
    q, k, v, dy = inputs(2, 128, kv)
    fn = jax.jit(lambda q, k, v: kernels.splash(q, k, v, mesh, interpret=True))
    check_against_numpy(fn, q, k, v, dy)


def test_splash_with_documents_matches_numpy():
    # Four documents and padding per row: splash's SegmentIds and its causal mask together.
    q, k, v, dy = inputs(2, 256, 2)
    segments = documents(2, 256)
    check_against_numpy(lambda q, k, v: kernels.splash(q, k, v, interpret=True,
                                                       segments=jnp.asarray(segments)),
                        q, k, v, dy, segments)


def test_sharded_splash_with_documents_matches_numpy():
    mesh = parallel.make_mesh({"data": 2, "tensor": 4})
    q, k, v, dy = inputs(2, 128, 2)
    segments = documents(2, 128, seed=1)
    fn = jax.jit(lambda q, k, v: kernels.splash(q, k, v, mesh, interpret=True,
                                                segments=jnp.asarray(segments)))
    check_against_numpy(fn, q, k, v, dy, segments)


def test_xla_with_documents_matches_numpy():
    q, k, v, dy = inputs(2, 64, 2)
    segments = documents(2, 64, seed=2)
    check_against_numpy(lambda q, k, v: kernels.causal(q, k, v, None,
                                                       segments=jnp.asarray(segments)),
                        q, k, v, dy, segments)


def test_packed_runs_for_cudnn():
    # Hand-computed: runs of one id (padding too) with their lengths and start offsets, -1
    # after the last; a row's runs past the bound are left out (cudnn_packed sends such rows
    # to blockwise, below).
    lengths, offsets = cudnn_attention.packed_runs(jnp.array([[1, 1, 2, 2, 2, 0], [1] * 6]), 4)
    np.testing.assert_array_equal(lengths, [[2, 3, 1, -1], [6, -1, -1, -1]])
    np.testing.assert_array_equal(offsets, [[0, 2, 5, -1, -1], [0, -1, -1, -1, -1]])
    lengths, offsets = cudnn_attention.packed_runs(jnp.array([[1, 1, 2, 2, 2, 0]]), 2)
    np.testing.assert_array_equal(lengths, [[2, 3]])
    np.testing.assert_array_equal(offsets, [[0, 2, -1]])


def run_ids(lengths, offsets, seq: int) -> jax.Array:
    """[b, S]: each token's run, 1, 2, ..., rebuilt from cuDNN's packed lengths [b, M] and
    offsets [b, M + 1] (0: in none)."""
    starts, lengths = offsets[:, :-1, None], lengths[:, :, None]
    pos = jnp.arange(seq)
    inside = (lengths > 0) & (pos >= starts) & (pos < starts + lengths)  # [b, M, S]
    return jnp.where(inside.any(1), jnp.argmax(inside, 1) + 1, 0)


def cudnn_as_traced(monkeypatch):
    """jax's cuDNN module, its device checks answered as on an H100 with cuDNN 9.10, so that
    its calls trace (not lower) on this CPU host."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(cudnn, "is_cuda_compute_capability_equal", lambda capability: False)
    return cudnn


def test_cudnn_packed_statistics_sized_by_runs_not_sequence(monkeypatch):
    # cuDNN's packed call saves [b x M, heads, S] float32 statistics for its backward: at
    # M = S (each row's most possible runs) as many bytes as [S, S] scores per head, which
    # on a 4,096-token row of 32 heads is 2 GiB an example on every layer.
    cudnn_as_traced(monkeypatch)
    q, k, v, _ = inputs(2, 256, 2, jnp.bfloat16)
    segments = jnp.asarray(documents(2, 256))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda q: jnp.sum(cudnn_attention.attention(
        q, k, v, segments).astype(jnp.float32))))(q))
    assert f"f32[{2 * cudnn_attention.PACKED_RUNS},{H},256]" in jaxpr
    assert "f32[512,4,256]" not in jaxpr


@pytest.mark.parametrize("many_runs", [False, True])
def test_cudnn_packed_takes_blockwise_past_its_runs(monkeypatch, many_runs):
    # A stand-in for cuDNN that rebuilds each token's run from the packed lengths and offsets
    # and attends within it; rows of 40 runs (past PACKED_RUNS = 32) must take blockwise.
    # Each case poisons the path it must not take, so a wrong choice shows as NaN.
    cudnn = cudnn_as_traced(monkeypatch)
    seq = 64

    def packed_stand_in(q, k, v, bias, mask, q_seqlen, kv_seqlen, q_offsets, kv_offsets,
                        **kw):
        assert q_seqlen.shape == (q.shape[0], cudnn_attention.PACKED_RUNS)
        run = run_ids(q_seqlen, q_offsets, seq)
        y = kernels.xla(q, k, v, kw["scale"], run, kw["sliding_window_length"] or 0)
        return y + jnp.nan if many_runs else y

    monkeypatch.setattr(cudnn, "dot_product_attention", packed_stand_in)
    if not many_runs:
        monkeypatch.setattr(cudnn_attention, "blockwise", lambda q, *a: q + jnp.nan)
    q, k, v, dy = inputs(2, seq, 2)
    segments = documents(2, seq, seed=3)
    if many_runs:
        segments[1] = np.minimum(np.arange(seq) // 1 + 1, 40)  # 40 runs: 39 of one token
    check_against_numpy(lambda q, k, v: cudnn_attention.attention(q, k, v, jnp.asarray(segments)),
                        q, k, v, dy, segments)


def exported(fn, platform, *args):
    return jax.export.export(jax.jit(fn), platforms=(platform,))(*args).mlir_module()


def test_tpu_export_runs_splash_per_device():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    q, k, v, _ = inputs(4, 256, 2, jnp.bfloat16)

    def fn(q, k, v):
        return kernels.causal(q, k, v, mesh)

    def grad(q, k, v):
        return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), (0, 1, 2))(q, k, v)

    tpu = exported(fn, "tpu", q, k, v)
    assert tpu.count("tpu_custom_call") == 1
    assert "manual_computation" in tpu  # the shard_map around it
    # The backward runs the kernel's own dq and dkv kernels after the forward one.
    assert exported(grad, "tpu", q, k, v).count("tpu_custom_call") == 3
    for platform in ("cuda", "cpu"):
        assert "tpu_custom_call" not in exported(fn, platform, q, k, v)
        assert "tpu_custom_call" not in exported(grad, platform, q, k, v)


def test_tpu_export_with_documents_runs_splash_per_device():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    q, k, v, _ = inputs(4, 256, 2, jnp.bfloat16)
    segments = jnp.asarray(documents(4, 256))

    def fn(q, k, v):
        return kernels.causal(q, k, v, mesh, segments=segments)

    assert exported(fn, "tpu", q, k, v).count("tpu_custom_call") == 1
    for platform in ("cuda", "cpu"):
        assert "tpu_custom_call" not in exported(fn, platform, q, k, v)


def test_short_sequence_exports_xla_attention_for_tpu():
    q, k, v, _ = inputs(2, 64, 2)
    assert "tpu_custom_call" not in exported(lambda *a: kernels.causal(*a, None), "tpu", q, k, v)


@pytest.mark.parametrize("seq", [32, 128])
def test_cpu_is_xla_attention_bit_for_bit(seq):
    # Through a scan of two layers, as the model runs it: the values, the gradients and the
    # memory are jax's attention's; the TPU branch (128) leaves nothing behind.
    mesh = parallel.make_mesh({"data": 2, "tensor": 4})
    q, k, v, _ = inputs(2, seq, 2)

    def step(attend):
        def loss(q, k, v):
            y, _ = jax.lax.scan(lambda x, _: (attend(x, k, v), None), q, None, length=2)
            return jnp.sum(y * y)
        return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))

    ours = step(lambda q, k, v: kernels.causal(q, k, v, mesh))
    xla = step(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
    for a, b in zip(jax.tree.leaves(ours(q, k, v)), jax.tree.leaves(xla(q, k, v)), strict=True):
        np.testing.assert_array_equal(a, b)
    memory = [f.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes for f in (ours, xla)]
    assert memory[0] == memory[1]
