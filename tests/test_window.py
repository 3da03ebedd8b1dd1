"""Sliding-window attention (model.sliding_window = W: a query sees the W most recent positions,
itself included, of its own document): every kernel against a NumPy reference on sequences
longer than the window, the model's receptive field, cached decoding against the full forward,
and the TPU program as exported from this CPU host."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from moejax import config_lib, parallel
from moejax.config_lib import ConfigError
from moejax.model import context, kernels, xla_attention
from moejax.run import state
from tests.test_attention import documents, numpy_attention, visible

H, HD = 4, 8


def inputs(batch, seq, kv=2, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seq + kv), 4)
    q, dy = (jax.random.normal(key, (batch, seq, H, HD), dtype) for key in keys[:2])
    k, v = (jax.random.normal(key, (batch, seq, kv, HD), dtype) for key in keys[2:])
    return q, k, v, dy


def check(fn, window, segments=None, batch=2, seq=40, tol=1e-5):
    """fn(q, k, v, segments) and its gradients against numpy_attention."""
    q, k, v, dy = inputs(batch, seq)
    seg = None if segments is None else jnp.asarray(segments)
    y, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
    want = numpy_attention(q, k, v, dy, segments, window)
    for name, a, b in zip("y dq dk dv".split(), (y, *vjp(dy)), want, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=tol, atol=tol, err_msg=name)


def test_reference_window_is_transformers_convention():
    # W = 3 over 5 positions: row i sees i-2 .. i; with documents [1 1 1 2 2], not across.
    np.testing.assert_array_equal(visible(5, 3).astype(int), [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert not visible(5, 3, [1, 1, 1, 2, 2])[3, 2]
    np.testing.assert_array_equal(
        np.asarray(xla_attention.seen(jnp.arange(5), jnp.arange(5), 3)), visible(5, 3))


@pytest.mark.parametrize("docs", [False, True], ids=["row", "documents"])
def test_xla_window_matches_numpy(docs):
    """W = 8 on 40 positions: the CPU path (kernels.causal), forward and gradients."""
    segments = documents(2, 40, seed=3) if docs else None
    check(lambda q, k, v, s: kernels.causal(q, k, v, None, segments=s, window=8), 8, segments)


def test_window_zero_and_wider_than_the_sequence_are_plain_causal():
    check(lambda q, k, v, s: kernels.causal(q, k, v, None, window=0), 0)
    check(lambda q, k, v, s: kernels.causal(q, k, v, None, window=64), 0)


@pytest.mark.parametrize("docs", [False, True], ids=["row", "documents"])
def test_splash_window_matches_numpy(docs):
    """The TPU kernel in Pallas' interpreter: 384 positions in blocks of 128 with W = 100, so
    the block two below the diagonal lies wholly outside the band (skipped) and the others
    straddle its edges; documents are and-ed with the LocalMask inside the kernel."""
    segments = documents(1, 384, seed=4) if docs else None
    check(lambda q, k, v, s: kernels.splash(q, k, v, interpret=True, segments=s, window=100),
          100, segments, batch=1, seq=384, tol=2e-5)


def test_splash_skips_the_blocks_outside_the_window():
    # 3 x 3 blocks of 128: causal keeps the lower triangle (6 blocks, those below the
    # diagonal whole); W = 100 drops (2, 0), and its grid is 2 key blocks wide: query block 0
    # reads key block 0, 1 reads 0 and 1, 2 reads 1 and 2, each in part (1; 0: no block).
    causal = kernels._make_splash(1, 384, 128, interpret=True).fwd_mask_info
    local = kernels._make_splash(1, 384, 128, interpret=True, window=100).fwd_mask_info
    np.testing.assert_array_equal(np.asarray(causal.block_mask)[0],
                                  [[1, 0, 0], [2, 1, 0], [2, 2, 1]])
    np.testing.assert_array_equal(np.asarray(local.block_mask)[0], [[1, 0], [1, 1], [1, 1]])
    np.testing.assert_array_equal(np.asarray(local.data_next)[0][:, :2], [[0, 0], [0, 1],
                                                                         [1, 2]])


@pytest.mark.parametrize("sizes", [{"context": 2, "tensor": 2}, {"context": 4}],
                         ids=["context2", "context4"])
def test_context_parallel_window_matches_numpy(sizes):
    """The balanced rows (global positions) through blockwise XLA attention: 64 positions,
    key blocks of 32 or 16, W = 8 with documents, so whole key blocks lie outside a row's
    window and some rows meet their first live block late."""
    mesh = parallel.make_mesh(sizes)
    fn = jax.jit(lambda q, k, v, s: kernels.causal(q, k, v, mesh, segments=s, window=8))
    check(fn, 8, documents(4, 64, seed=5), batch=4, seq=64)


def test_context_splash_mask_info_follows_the_window():
    """Splash over context = 2's balanced rows: a block of the kernel's grid is live exactly
    where the reference window mask (rows at their global positions) has a visible pair."""
    seq, c, block, window = 256, 2, 32, 40
    rows = context.query_index(seq, c)
    kernel = kernels._make_splash(1, seq, block, interpret=True, q_index=rows, q_shards=c,
                                  window=window)
    info = kernel.fwd_mask_info
    want = visible(seq, window)[rows].reshape(seq // block, block, seq // block, block)
    want = want.any((1, 3))
    got = np.zeros_like(want)
    live = np.asarray(info.block_mask[0]) > 0
    for i, j in zip(*np.nonzero(live), strict=True):
        got[i, np.asarray(info.data_next[0])[i, j]] = True
    np.testing.assert_array_equal(got, want)


def test_context_parallel_splash_window_matches_numpy():
    """The TPU path of context = 2 in Pallas' interpreter: halves of 128 rows, W = 100."""
    mesh = parallel.make_mesh({"context": 2, "data": 2, "tensor": 2})
    fn = jax.jit(lambda q, k, v, s: kernels.context_parallel(q, k, v, mesh, segments=s,
                                                            interpret=True, window=100))
    check(fn, 100, documents(2, 512, seed=6), batch=2, seq=512, tol=2e-5)


def test_negative_window_is_refused():
    q, k, v, _ = inputs(1, 8)
    with pytest.raises(ValueError, match="sliding window -1"):
        kernels.causal(q, k, v, None, window=-1)


# The model: tiny:smoke with two layers, dropless experts (no token's routing depends on
# another's), W = 4 on 24 positions.
WINDOW, SEQ = 4, 24


def tiny_config(window: int, **model):
    config = tiny.get_config("smoke")
    config.model.update(vocab_size=97, num_heads=4, num_kv_heads=2, head_dim=8,
                        dispatch="dropless", sliding_window=window, **model)
    return config


@functools.cache
def model(window: int):
    setup = state.setup(tiny_config(window), parallel.make_mesh({}))
    return nnx.merge(setup.graphdef, state.init(setup)["params"])


@functools.cache
def forward():
    return nnx.jit(lambda m, t: m(t, train=False)[0])


def tokens(seed: int = 0):
    return jax.random.randint(jax.random.key(seed), (2, SEQ), 0, 97)


def test_model_sees_only_its_receptive_field():
    """Two layers of W = 4: position i reads positions i - 6 .. i (3 back per layer). Changing
    positions 0 .. 7 leaves the logits from 14 on as they were and changes 13's; with the
    window off (the same weights: the window is no parameter) every later logit changes."""
    reach = 2 * (WINDOW - 1)
    a = tokens()
    b = a.at[:, :8].set((a[:, :8] + 1) % 97)
    windowed = [np.asarray(forward()(model(WINDOW), t)) for t in (a, b)]
    np.testing.assert_allclose(windowed[0][:, 8 + reach:], windowed[1][:, 8 + reach:],
                               atol=1e-6, rtol=0)
    assert np.abs(windowed[0][:, 7 + reach] - windowed[1][:, 7 + reach]).max() > 1e-3
    full = [np.asarray(forward()(model(0), t)) for t in (a, b)]
    assert (np.abs(full[0] - full[1]).max(-1)[:, 8:] > 1e-3).all()


def decoded(m, t, prefill: int, cache_len: int) -> np.ndarray:
    """The logits of tokens t [B, S] from m's cache: a prefill of `prefill`, then one token
    at a time."""
    decode = nnx.jit(lambda m, t, s, c: m.decode(t, s, c))
    cache = m.init_cache(t.shape[0], cache_len)
    logits, cache = decode(m, t[:, :prefill], jnp.zeros(t.shape[0], jnp.int32), cache)
    got = [logits]
    for i in range(prefill, t.shape[1]):
        logits, cache = decode(m, t[:, i:i + 1], jnp.full(t.shape[0], i, jnp.int32), cache)
        got.append(logits)
    return np.concatenate(got, 1)


def test_decode_matches_full_forward_past_the_window():
    """A prefill of 6 (> W) and then one token at a time to 24 positions, into a cache of 32
    that stays full length: every logit as the full windowed forward's, which differ from the
    unwindowed model's (so a decode that ignored the window would fail here)."""
    m, t = model(WINDOW), tokens(1)
    want = np.asarray(forward()(m, t))
    np.testing.assert_allclose(decoded(m, t, 6, 32), want, atol=1e-5, rtol=0)
    assert np.abs(want[:, 8:] - np.asarray(forward()(model(0), t))[:, 8:]).max() > 1e-3


def test_latent_attention_has_no_window():
    from configs import deepseek_v3

    config = deepseek_v3.get_config("smoke")
    config.model.sliding_window = 8
    with pytest.raises(ConfigError, match="model.sliding_window=8: not with model.attention=mla"):
        config_lib.validate(config, num_devices=8)


def exported_forward(seq: int, window: int) -> str:
    """tiny:smoke's forward on [2, seq] tokens for TPU, lowered on this CPU host."""
    setup = state.setup(tiny_config(window), parallel.make_mesh({}))

    def fn(params, t):
        return nnx.merge(setup.graphdef, params)(t, train=False)[0]

    t = jax.ShapeDtypeStruct((2, seq), jnp.int32)
    return jax.export.export(jax.jit(fn), platforms=("tpu",))(
        setup.abstract["params"], t).mlir_module()


def test_tpu_export_runs_splash_with_the_local_mask():
    """384 positions (3 blocks of 128), W = 100: the splash kernel, its block grid two key
    blocks wide (the LocalMask's band; causal is three wide) in the program's constants.
    40 positions: no 128-row blocks, the XLA path."""
    windowed, causal = exported_forward(384, 100), exported_forward(384, 0)
    for module in (windowed, causal):
        assert "splash_attention_kernel.py" in module and "tpu_custom_call" in module
    assert "tensor<1x3x2xi8>" in windowed and "tensor<1x3x2xi8>" not in causal
    assert "tensor<1x3x3xi8>" in causal and "tensor<1x3x3xi8>" not in windowed
    assert "splash_attention_kernel.py" not in exported_forward(40, 8)
