"""Layers that differ by attention (gpt-oss: windowed and full attention alternating) scan in
periods holding several MoE blocks: the stacks, each layer's window, and the period machinery
(aux in layer order, forced routing, decoding's expert ids) against the one-block-per-period
scan of the same weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from moejax import parallel
from moejax.model.transformer import layer_stacks, layer_window
from moejax.run import state
from tests.test_window import decoded

SEQ = 12


def config(**model):
    c = tiny.get_config("smoke")
    c.model.update(dict(dict(vocab_size=97, num_layers=4, num_heads=4, num_kv_heads=2,
                             head_dim=8, dispatch="dropless"), **model))
    return c


@pytest.mark.parametrize("layers, first, every, a, want", [
    (24, 0, 1, 2, [(12, 2)]),  # gpt-oss-20b
    (36, 0, 1, 2, [(18, 2)]),  # gpt-oss-120b
    (5, 1, 1, 2, [(1, 1), (2, 2)]),
    (6, 1, 1, 2, [(1, 1), (2, 2), (1, 1)]),
    (9, 2, 2, 3, [(1, 2), (1, 6), (1, 1)]),
    (7, 1, 2, 0, [(1, 1), (3, 2)]),  # no alternation: the stacks as before
])
def test_stacks(layers, first, every, a, want):
    m = config(num_layers=layers, first_dense_layers=first, moe_every=every, sliding_window=4,
               full_attention_every=a).model
    assert layer_stacks(m) == want
    assert sum(r * p for r, p in want) == layers


def test_each_layer_has_its_window():
    m = config(sliding_window=4, full_attention_every=2).model
    assert [layer_window(m, i) for i in range(4)] == [4, 0, 4, 0]
    setup = state.setup(config(sliding_window=4, full_attention_every=2), parallel.make_mesh({}))
    model = nnx.merge(setup.graphdef, state.init(setup)["params"])
    assert [block.attn.window for block in model.stacks[0].blocks] == [4, 0]
    assert [layer_window(config(sliding_window=4).model, i) for i in range(4)] == [4] * 4


@functools.cache
def models():
    """Two periods of [windowed, full] with a window wider than the sequence (so no layer's
    attention is cut), and the plain model, four periods of one block, with the same weights."""
    paired = state.setup(config(sliding_window=64, full_attention_every=2),
                         parallel.make_mesh({}))
    plain = state.setup(config(), parallel.make_mesh({}))
    params = state.init(paired)["params"]
    blocks = params["stacks"][0]["blocks"]
    # plain layer 2r + j = paired blocks[j][r]
    merged = jax.tree.map(lambda a, b: jnp.stack([a, b], 1).reshape(-1, *a.shape[1:]),
                          blocks[0], blocks[1])
    plain_params = state.init(plain)["params"]
    plain_params["stacks"][0]["blocks"][0] = merged
    others = [k for k in params if k != "stacks"]
    for k in others:
        plain_params[k] = params[k]
    return nnx.merge(paired.graphdef, params), nnx.merge(plain.graphdef, plain_params)


def test_periods_of_two_moe_blocks_match_one_block_periods():
    paired, plain = models()
    tokens = jax.random.randint(jax.random.key(0), (2, SEQ), 0, 97)
    run = nnx.jit(lambda m, t, r: m(t, train=False, routing=r, return_routing=True))
    (a, aux_a), (b, aux_b) = run(paired, tokens, None), run(plain, tokens, None)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert aux_a["tokens_per_expert"].shape == (4, 8)
    for key in ("tokens_per_expert", "expert_ids", "balance_loss", "z_loss"):
        np.testing.assert_allclose(aux_a[key], aux_b[key], atol=1e-6, rtol=0, err_msg=key)
    # a forced routing per layer reaches the right layer: the logits move as the plain model's
    forced = jax.random.randint(jax.random.key(1), (2, SEQ, 4, 2), 0, 8)
    (fa, _), (fb, _) = run(paired, tokens, forced), run(plain, tokens, forced)
    np.testing.assert_allclose(fa, fb, atol=1e-5, rtol=0)
    assert np.abs(np.asarray(fa) - np.asarray(a)).max() > 1e-3


def test_decoding_ids_in_layer_order():
    paired, plain = models()
    tokens = jax.random.randint(jax.random.key(2), (2, SEQ), 0, 97)
    run = nnx.jit(lambda m, t: m.decode(t, jnp.zeros(2, jnp.int32), m.init_cache(2, 16),
                                        return_routing=True))
    (la, _, ia), (lb, _, ib) = run(paired, tokens), run(plain, tokens)
    np.testing.assert_allclose(la, lb, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(ia, ib)
    assert ia.shape == (2, SEQ, 4, 2)


def test_sinks_biases_and_alternating_windows_decode_as_the_forward():
    """gpt-oss's attention (sinks, q/k/v and output biases, windowed and full layers): decoding
    one token at a time past the window gives the full forward's logits, and each piece moves
    them (so a decode that dropped one would fail)."""
    c = config(sliding_window=3, full_attention_every=2, attention_sinks=True, qkv_bias=True,
               out_bias=True)
    setup = state.setup(c, parallel.make_mesh({}))
    params = state.init(setup)["params"]
    keys = iter(jax.random.split(jax.random.key(3), 16))
    for block in params["stacks"][0]["blocks"].values():  # zero-initialized: make them matter
        for name in ("sinks", "q_bias", "kv_bias", "out_bias"):
            v = block["attn"][name]
            v[...] = 2 * jax.random.normal(next(keys), v.shape, v.dtype)
    model = nnx.merge(setup.graphdef, params)
    tokens = jax.random.randint(jax.random.key(4), (2, SEQ), 0, 97)
    want = np.asarray(nnx.jit(lambda m, t: m(t, train=False)[0])(model, tokens))
    np.testing.assert_allclose(decoded(model, tokens, 4, 16), want, atol=2e-5, rtol=0)
    for name in ("sinks", "out_bias"):
        moved = jax.tree.map(lambda x: x, params)
        for block in moved["stacks"][0]["blocks"].values():
            block["attn"][name][...] = jnp.zeros_like(block["attn"][name][...])
        other = np.asarray(nnx.jit(lambda m, t: m(t, train=False)[0])(
            nnx.merge(setup.graphdef, moved), tokens))
        assert np.abs(other - want).max() > 1e-2, name
