"""Attention sinks (gpt-oss): each query head h has a learned logit s_h that joins every softmax
row, takes probability mass and carries no value. Every kernel path (XLA, splash in Pallas'
interpreter, context parallelism on both, `masked` for decoding) against a NumPy reference,
forward and the gradients of q, k, v and the sinks; the TPU program as exported from this host.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import parallel
from moejax.model import cudnn_attention, kernels, xla_attention
from tests.test_attention import cudnn_as_traced, documents, run_ids, visible
from tests.test_window import H, inputs


def numpy_sinks(q, k, v, sinks, dy, seen):
    """The definition, one (example, head) at a time in float64: q, dy [B, Sq, H, hd], k, v
    [B, Skv, KV, hd], sinks [H], seen [B, Sq, Skv] bool. p_j = exp(l_j) / (exp(s_h) + sum_k
    exp(l_k)) over the seen keys, y = sum_j p_j v_j -> y, dq, dk, dv, dsinks."""
    q, k, v, dy, sinks = (np.asarray(a, np.float64) for a in (q, k, v, dy, sinks))
    y, dq, dk, dv = (np.zeros_like(a) for a in (q, q, k, v))
    dsinks = np.zeros_like(sinks)
    group, scale = q.shape[2] // k.shape[2], q.shape[3] ** -0.5
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            g = h // group
            logits = np.where(seen[b], q[b, :, h] @ k[b, :, g].T * scale, -np.inf)
            top = np.maximum(logits.max(-1, keepdims=True), sinks[h])
            e, e_sink = np.exp(logits - top), np.exp(sinks[h] - top)
            z = e.sum(-1, keepdims=True) + e_sink
            p, p_sink = e / z, e_sink / z
            y[b, :, h] = p @ v[b, :, g]
            # dL/dl_j = p_j (dp_j - sum_k p_k dp_k); the sink's own dp is 0 (no value).
            dp = dy[b, :, h] @ v[b, :, g].T
            rowdot = (p * dp).sum(-1, keepdims=True)
            ds = p * (dp - rowdot)
            dq[b, :, h] = ds @ k[b, :, g] * scale
            dk[b, :, g] += ds.T @ q[b, :, h] * scale
            dv[b, :, g] += p.T @ dy[b, :, h]
            dsinks[h] += -(p_sink * rowdot).sum()
    return y, dq, dk, dv, dsinks


def causal_seen(batch, seq, window=0, segments=None):
    return np.stack([visible(seq, window, None if segments is None else segments[b])
                     for b in range(batch)])


def sink_values(seed=0):
    """[H] float32, spread wide enough (normal x 2) to move every row's normalizer."""
    return 2.0 * jax.random.normal(jax.random.key(100 + seed), (H,), jnp.float32)


def check(fn, seen, batch, seq, kv=2, sinks=None, tol=1e-5):
    """fn(q, k, v, sinks) and its gradients (q, k, v, sinks) against numpy_sinks."""
    q, k, v, dy = inputs(batch, seq, kv)
    sinks = sink_values() if sinks is None else jnp.asarray(sinks, jnp.float32)
    y, vjp = jax.vjp(fn, q, k, v, sinks)
    want = numpy_sinks(q, k, v, sinks, dy, seen)
    for name, a, b in zip("y dq dk dv dsinks".split(), (y, *vjp(dy)), want, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=tol, atol=tol, err_msg=name)
    return y


def test_reference_gradient_of_the_sinks_is_the_finite_difference():
    """The hand-derived dsinks of numpy_sinks against central differences of its own y."""
    q, k, v, dy = (np.asarray(a, np.float64) for a in inputs(1, 6, 2))
    sinks, seen = np.asarray(sink_values(), np.float64), causal_seen(1, 6, 3)
    dsinks = numpy_sinks(q, k, v, sinks, dy, seen)[4]
    for h in range(H):
        step = np.eye(H)[h] * 1e-6
        plus, minus = (numpy_sinks(q, k, v, sinks + d, dy, seen)[0] for d in (step, -step))
        np.testing.assert_allclose(((plus - minus) * dy).sum() / 2e-6, dsinks[h], rtol=1e-6)


@pytest.mark.parametrize("window, docs", [(0, False), (8, False), (0, True), (8, True)],
                         ids=["causal", "window", "documents", "window-documents"])
def test_xla_sinks_match_numpy(window, docs):
    """The CPU path of kernels.causal on 40 positions."""
    segments = documents(2, 40, seed=3) if docs else None
    seg = None if segments is None else jnp.asarray(segments)
    check(lambda q, k, v, s: kernels.causal(q, k, v, None, segments=seg, window=window,
                                            sinks=s),
          causal_seen(2, 40, window, segments), batch=2, seq=40)


def test_a_dominant_sink_takes_the_mass():
    """Head 0's sink (12) outweighs every key of every row: its output is nearly 0, its
    gradients too; head 3's (-12) leaves plain softmax attention."""
    seq, sinks = 16, [12.0, 1.0, 0.0, -12.0]
    y = check(lambda q, k, v, s: kernels.causal(q, k, v, None, sinks=s),
              causal_seen(1, seq), batch=1, seq=seq, sinks=sinks)
    assert np.abs(np.asarray(y)[..., 0, :]).max() < 1e-3
    assert np.abs(np.asarray(y)[..., 3, :]).max() > 0.3


def test_no_sinks_is_jax_attention_bit_for_bit():
    q, k, v, _ = inputs(2, 40)
    np.testing.assert_array_equal(
        np.asarray(kernels.causal(q, k, v, None, sinks=None)),
        np.asarray(jax.nn.dot_product_attention(q, k, v, is_causal=True)))
    mask = jnp.asarray(causal_seen(2, 40, 8))[:, None]
    np.testing.assert_array_equal(
        np.asarray(xla_attention.masked(q, k, v, mask, scale=0.3)),
        np.asarray(jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.3)))


def test_masked_sinks_match_numpy_and_an_empty_row_is_zero():
    """Decoding's shape: 5 queries at positions 9 .. 13 (row 1: 0 .. 4) over a cache of 16,
    W = 4, one query row with no key seen at all (mask off): its output and gradients 0."""
    batch, seq = 2, 16
    q, k, v, dy = inputs(batch, seq)
    positions = np.array([np.arange(9, 14), np.arange(5)])
    behind = positions[:, :, None] - np.arange(seq)
    seen = (behind >= 0) & (behind < 4)
    seen[1, 2] = False
    q, dy = q[:, :5], dy[:, :5]
    sinks = sink_values(1)
    y, vjp = jax.vjp(lambda q, k, v, s: xla_attention.masked(q, k, v, jnp.asarray(seen)[:, None],
                                                       sinks=s), q, k, v, sinks)
    got = (y, *vjp(dy))
    want = numpy_sinks(q, k, v, sinks, dy, seen)
    for name, a, b in zip("y dq dk dv dsinks".split(), got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5, err_msg=name)
    assert not np.asarray(y)[1, 2].any() and not np.asarray(got[1])[1, 2].any()


def test_splash_sinks_match_numpy():
    """The TPU kernel in Pallas' interpreter: 256 positions in blocks of 128, W = 100 and
    documents; the kernel's own backward gives the sinks' gradient."""
    segments = documents(1, 256, seed=4)
    seg = jnp.asarray(segments)
    check(lambda q, k, v, s: kernels.splash(q, k, v, interpret=True, segments=seg, window=100,
                                            sinks=s),
          causal_seen(1, 256, 100, segments), batch=1, seq=256, tol=2e-5)


def test_sharded_splash_sinks_follow_the_heads():
    """tensor = 4 splits the 4 heads and their sinks; data = 2 the examples, so each sink's
    gradient is summed over both."""
    mesh = parallel.make_mesh({"data": 2, "tensor": 4})
    fn = jax.jit(lambda q, k, v, s: kernels.splash(q, k, v, mesh, interpret=True, sinks=s))
    check(fn, causal_seen(2, 128), batch=2, seq=128, tol=2e-5)


def test_context_parallel_sinks_match_numpy():
    """blockwise XLA attention over context = 2 (key blocks of 32): the sink enters the
    online softmax before the first block, its gradient from the saved log-sum-exp."""
    mesh = parallel.make_mesh({"context": 2, "tensor": 2})
    segments = documents(4, 64, seed=5)
    seg = jnp.asarray(segments)
    fn = jax.jit(lambda q, k, v, s: kernels.causal(q, k, v, mesh, segments=seg, window=8,
                                                   sinks=s))
    check(fn, causal_seen(4, 64, 8, segments), batch=4, seq=64)


def test_context_parallel_splash_sinks_match_numpy():
    """The TPU path of context = 2 in Pallas' interpreter: halves of 128 rows, W = 100."""
    mesh = parallel.make_mesh({"context": 2, "data": 2, "tensor": 2})
    segments = documents(2, 512, seed=6)
    seg = jnp.asarray(segments)
    fn = jax.jit(lambda q, k, v, s: kernels.context_parallel(
        q, k, v, mesh, segments=seg, interpret=True, window=100, sinks=s))
    check(fn, causal_seen(2, 512, 100, segments), batch=2, seq=512, tol=2e-5)


def test_tpu_export_passes_the_sinks_to_splash():
    """causal on [2, 256] bfloat16 for TPU, forward and gradient: the splash kernel, fed the
    sinks as its [8 sublanes, H] float32 operand (absent without sinks); the sinks' gradient
    comes back float32, as the sinks."""
    q, k, v, _ = inputs(2, 256, 2, jnp.bfloat16)
    sinks = sink_values()

    def grad(q, k, v, s):
        def loss(q, k, v, s):
            return jnp.sum(kernels.causal(q, k, v, None, sinks=s).astype(jnp.float32))
        return jax.grad(loss, (0, 1, 2) if s is None else (0, 1, 2, 3))(q, k, v, s)

    def export(s):
        return jax.export.export(jax.jit(grad), platforms=("tpu",))(q, k, v, s)

    with_sinks, without = export(sinks), export(None)
    for module in (with_sinks.mlir_module(), without.mlir_module()):
        assert "splash_attention_kernel.py" in module and "tpu_custom_call" in module
    assert f"tensor<8x{H}xf32>" in with_sinks.mlir_module()
    assert f"tensor<8x{H}xf32>" not in without.mlir_module()
    assert with_sinks.out_avals[3].dtype == jnp.float32


def test_start_up_says_where_attention_has_no_fused_kernel():
    """One rule (kernels.fused) picks causal's path, prices it in plan --target and prints
    the start-up line: a GPU has no fused kernel with sinks under context parallelism or
    outside bf16/f16; a TPU's splash needs 128 to divide a device's rows (halves under
    context parallelism); a CPU run is told nothing (XLA is all it has)."""
    from configs import tiny

    config = tiny.get_config()
    config.model.update(attention_sinks=True, dtype="bfloat16")
    config.data.seq_len = 512
    assert kernels.unfused_note(config, "gpu") is None  # cudnn_attention's sinks
    assert "attention sinks under context parallelism" in kernels.unfused_note(config, "gpu", 2)
    assert kernels.unfused_note(config, "tpu") is None  # splash takes sinks
    assert kernels.unfused_note(config, "cpu") is None
    assert "128 does not divide the 64 rows" in kernels.unfused_note(config, "tpu", 4)
    config.model.attention_sinks = False
    assert kernels.unfused_note(config, "gpu") is None
    config.model.dtype = "float32"
    assert "model.dtype=float32" in kernels.unfused_note(config, "gpu")
    assert [kernels.fused("tpu", jnp.bfloat16, True, rows) for rows in (128, 384, 200)] == [
        True, True, False]


@pytest.mark.parametrize("window,with_segments,with_sinks", [(0, False, False), (8, True, True)])
def test_planner_stand_in_for_a_fused_kernel_is_the_same_attention(window, with_segments,
                                                                    with_sinks):
    """What plan --target compiles for a fused-kernel target (kernels.standing_in_for_fused:
    blockwise flash attention in XLA) gives XLA's attention and its gradients: only the
    memory it holds differs. Two key blocks of 512 plus one of 64 would not divide, so 1,088
    rows take gcd(1,088, 512) = 64-key blocks."""
    q, k, v, dy = inputs(1, 1088)
    segments = jnp.asarray(np.repeat([1, 2], [600, 488])[None]) if with_segments else None
    sinks = jnp.linspace(-1.0, 1.0, H) if with_sinks else None

    def run(q, k, v):
        return kernels.xla(q, k, v, None, segments, window, sinks)

    want, want_vjp = jax.vjp(run, q, k, v)
    with kernels.standing_in_for_fused():
        got, got_vjp = jax.vjp(run, q, k, v)
    for a, b in zip((got, *got_vjp(dy)), (want, *want_vjp(dy)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


class CudnnStandIn:
    """cuDNN's forward and backward rules as cudnn_attention calls them, in XLA on this
    host. The forward returns the output and the softmax statistics: [b, h, S] on the plain
    layout; NaN on the packed one, whose statistics cudnn_attention must not read. The
    backward recomputes the probabilities from q, k and the statistics it saved, and takes
    its row sums dy . y from the output it is handed, as flash attention's backward does."""

    @staticmethod
    def forward(call, q, k, v, lengths, offsets):
        seq, group = q.shape[1], q.shape[2] // k.shape[2]
        k, v = (jnp.repeat(a, group, axis=2) for a in (k, v))
        runs = (jnp.ones(q.shape[:2], jnp.int32) if lengths is None
                else run_ids(lengths, offsets, seq))
        index = jnp.arange(seq)
        seen = xla_attention.document_mask(runs, runs, index, index, call.window)[:, 0]
        logits = jnp.where(seen[:, None], jnp.einsum("bqhd,bkhd->bhqk", q, k) * call.scale,
                           -jnp.inf)
        lse = jax.nn.logsumexp(logits, -1)  # [b, h, S]
        out = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(logits - lse[..., None]), v)
        stats = jnp.full((q.shape[0] * lengths.shape[1], *lse.shape[1:]), jnp.nan) \
            if call.packed else lse
        return out, stats, (q, k, v, logits, lse, group)

    @staticmethod
    def backward(call, res, y, dy):
        q, k, v, logits, lse, group = res
        p = jnp.exp(logits - lse[..., None])
        dp = jnp.einsum("bqhd,bkhd->bhqk", dy, v)
        ds = p * (dp - jnp.einsum("bqhd,bqhd->bhq", dy, y)[..., None])
        dq = jnp.einsum("bhqk,bkhd->bqhd", ds, k) * call.scale
        dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q) * call.scale
        dv = jnp.einsum("bhqk,bqhd->bkhd", p, dy)
        unrepeat = lambda a: a.reshape(*a.shape[:2], -1, group, a.shape[3]).sum(3)  # noqa: E731
        return dq, unrepeat(dk), unrepeat(dv)


@pytest.mark.parametrize("window, runs", [(8, 0), (8, 4), (0, 40)],
                         ids=["plain-window", "documents-window", "past-packed-runs"])
def test_cudnn_sinks_match_numpy(monkeypatch, window, runs):
    """cudnn_attention's sinks with cuDNN's rules stood in for (CudnnStandIn): the kernel's
    output rescaled by sigmoid(lse - s_h), its backward handed that output, against the
    definition. Plain: lse from the kernel's statistics (GQA, 4 heads over 2); documents:
    from row_lse (the packed statistics are NaN here); 40 runs, past PACKED_RUNS: blockwise
    (the stand-in poisoned)."""
    monkeypatch.setattr(cudnn_attention._Cudnn, "forward", CudnnStandIn.forward)
    monkeypatch.setattr(cudnn_attention._Cudnn, "backward", CudnnStandIn.backward)
    if runs > cudnn_attention.PACKED_RUNS:
        def poisoned(*a):  # lax.cond traces both branches: a wrong choice gives NaN
            out, stats, res = CudnnStandIn.forward(*a)
            return out + jnp.nan, stats, res

        monkeypatch.setattr(cudnn_attention._Cudnn, "forward", poisoned)
    seq = 48
    segments = None
    if runs:
        segments = documents(2, seq, seed=5)
        segments[1] = np.minimum(np.arange(seq) + 1, runs) if runs > 4 else segments[1]
    seg = None if segments is None else jnp.asarray(segments)
    check(lambda q, k, v, s: cudnn_attention.attention(q, k, v, seg, s, window=window),
          causal_seen(2, seq, window, segments), batch=2, seq=seq)


@pytest.mark.parametrize("documents_", [False, True], ids=["plain", "packed"])
def test_cudnn_sinks_trace_through_jaxs_rules(monkeypatch, documents_):
    """The real cuDNN rules, traced (not lowered) with their device checks answered as on an
    H100: the sink path's forward keeps the kernel's statistics, its backward gets the
    rescaled output, and every gradient comes back in its input's shape and dtype."""
    cudnn_as_traced(monkeypatch)
    q, k, v, _ = inputs(2, 256, 2, jnp.bfloat16)
    sinks = sink_values().astype(jnp.bfloat16)
    seg = jnp.asarray(documents(2, 256)) if documents_ else None
    grads = jax.eval_shape(jax.grad(
        lambda *a: jnp.sum(cudnn_attention.attention(*a[:3], seg, a[3], window=64)
                           .astype(jnp.float32)), (0, 1, 2, 3)), q, k, v, sinks)
    for g, a in zip(grads, (q, k, v, sinks), strict=True):
        assert (g.shape, g.dtype) == (a.shape, a.dtype)
    jaxpr = jax.make_jaxpr(jax.grad(
        lambda q: jnp.sum(cudnn_attention.attention(q, k, v, seg, sinks).astype(
            jnp.float32))))(q)
    assert "dot_product_attention_fwd" in str(jaxpr)
    assert "dot_product_attention_bwd" in str(jaxpr)
    if not documents_:  # (packed, both sit inside lax.cond's branch)
        eqns = {e.primitive.name: e for e in jaxpr.eqns}
        fwd = eqns["dot_product_attention_fwd_wrapper"]
        bwd = eqns["dot_product_attention_bwd_wrapper"]
        # The backward's fwd_output operand (its 12th) is the rescaled y, not the kernel's.
        assert bwd.invars[11] is not fwd.outvars[0]
        assert bwd.invars[10] is fwd.outvars[1]  # its statistics are the kernel's own


@pytest.mark.parametrize("window", [0, 8, 20], ids=["full", "window-8", "window-20"])
def test_row_normalizers_are_the_definitions(window):
    """row_lse (all key blocks) and band_lse (only the key tiles a window reaches: 16-row
    tiles at 48 positions, a band of 2 or 3 of them) against log sum exp of the seen logits,
    written from the definition in NumPy, with documents and padding."""
    q, k, _, _ = inputs(2, 48, 2)
    segments = documents(2, 48, seed=7)
    seen = causal_seen(2, 48, window, segments)
    logits = np.einsum("bqkgd,bskd->bqkgs", np.asarray(q, np.float64).reshape(2, 48, 2, 2, -1),
                       np.asarray(k, np.float64)) * q.shape[-1] ** -0.5
    logits = np.where(seen[:, :, None, None, :], logits, -np.inf)
    top = logits.max(-1, keepdims=True)
    want = (top[..., 0] + np.log(np.exp(logits - top).sum(-1))).reshape(2, 48, H)
    seg = jnp.asarray(segments)
    got = xla_attention.row_lse(q, k, seg, seg, jnp.arange(48), q.shape[-1] ** -0.5, 16, window)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    if window:
        got = xla_attention.band_lse(q, k, seg, q.shape[-1] ** -0.5, window)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("documents_, with_sinks", [(False, False), (True, False), (False, True),
                                                    (True, True)],
                         ids=["plain", "packed", "plain-sinks", "packed-sinks"])
def test_causal_on_a_gpu_takes_cudnn(monkeypatch, documents_, with_sinks):
    """kernels.causal as traced on a Hopper GPU (backend and device checks answered so): every
    case, sinks included, reaches cuDNN's kernel, forward and backward; none XLA's [S, S]."""
    cudnn_as_traced(monkeypatch)
    monkeypatch.setattr(kernels.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(kernels, "_hopper", lambda: True)
    q, k, v, _ = inputs(2, 1024, 2, jnp.bfloat16)
    sinks = sink_values().astype(jnp.bfloat16) if with_sinks else None
    seg = jnp.asarray(documents(2, 1024)) if documents_ else None
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda q: jnp.sum(kernels.causal(
        q, k, v, None, segments=seg, window=64, sinks=sinks).astype(jnp.float32))))(q))
    assert "dot_product_attention_fwd" in jaxpr and "dot_product_attention_bwd" in jaxpr
    assert "1024,1024" not in jaxpr.replace(" ", "")  # (blockwise's fallback: 512 keys)
