"""The cached decode path against the full forward, and `generate` against a naive loop."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from moejax import generate as gen, parallel
from moejax.run import state
from moejax.run.checkpoint import Checkpoints

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13], [7, 8, 9, 10, 11]]


def tiny_config(num_experts=8, qk_norm="head"):
    """Two query heads sharing one key-value head; three layers as two stacks, the second a
    period of two blocks whose last is the MoE layer (so cache slots (repeat, j) get j > 0)."""
    config = tiny.get_config("smoke")
    config.model.update(vocab_size=257, num_kv_heads=1, qk_norm=qk_norm, num_layers=3,
                        first_dense_layers=1, moe_every=2, num_experts=num_experts,
                        dispatch="dropless")  # as generate.load sets it
    return config


def build(config):
    setup = state.setup(config, parallel.make_mesh({}))
    train_state = state.init(setup)
    return nnx.merge(setup.graphdef, train_state["params"]), train_state


@pytest.fixture(scope="module")
def moe():
    return build(tiny_config())


@pytest.mark.parametrize("which", ["moe, qk_norm=head", "dense, qk_norm=all"])
def test_decode_matches_full_forward(which, moe):
    model = moe[0] if which.startswith("moe") else build(tiny_config(0, "all"))[0]
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 257)
    want = nnx.jit(lambda m, t: m(t, train=False)[0])(model, tokens)
    decode = nnx.jit(lambda m, t, s, c: m.decode(t, s, c))
    cache = model.init_cache(2, 16)  # longer than the tokens: stale slots must stay unseen
    logits, cache = decode(model, tokens[:, :5], jnp.zeros(2, jnp.int32), cache)  # prefill
    got = [logits]
    for i in range(5, 12):
        logits, cache = decode(model, tokens[:, i : i + 1], jnp.full(2, i, jnp.int32), cache)
        got.append(logits)
    np.testing.assert_allclose(jnp.concatenate(got, 1), want, atol=1e-5, rtol=0)


def reference(model, prompt, max_new_tokens, length):
    """Greedy decoding the obvious way: the whole sequence through the full forward each step.
    The sequence is right-padded to `length` (the same for every prompt), so the forward
    compiles once; a causal model's logits at the last real token cannot see the padding."""
    forward = nnx.jit(lambda m, t: m(t, train=False)[0])
    ids = list(prompt)
    for _ in range(max_new_tokens):
        padded = jnp.asarray([ids + [0] * (length - len(ids))], jnp.int32)
        ids.append(int(jnp.argmax(forward(model, padded)[0, len(ids) - 1])))
    return ids[len(prompt):]


def test_greedy_matches_naive_loop_batched_and_alone(moe):
    model, _ = moe
    batched = gen.generate(model, PROMPTS, 8)
    length = max(map(len, PROMPTS)) + 8
    assert batched == [reference(model, p, 8, length) for p in PROMPTS]
    assert batched == [gen.generate(model, [p], 8)[0] for p in PROMPTS]


def test_top_p_and_seeds(moe):
    model, _ = moe
    greedy = gen.generate(model, PROMPTS, 6)
    assert gen.generate(model, PROMPTS, 6, temperature=1.0, top_p=1e-6, seed=3) == greedy
    a = gen.generate(model, PROMPTS, 6, temperature=2.0, seed=1)
    assert a == gen.generate(model, PROMPTS, 6, temperature=2.0, seed=1)
    assert a != gen.generate(model, PROMPTS, 6, temperature=2.0, seed=2)
    assert all(0 <= t < 257 for row in a for t in row)


def test_top_p_keeps_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = jax.vmap(lambda k: gen.next_token(logits, k, 1.0, 0.75, greedy=False)[0])
    assert set(np.asarray(draw(keys)).tolist()) == {0, 1}  # 0.5 + 0.3 is the first >= 0.75


def test_eos_stops_a_row(moe):
    model, _ = moe
    greedy = gen.generate(model, PROMPTS, 8)
    eos = greedy[0][2]
    out = gen.generate(model, PROMPTS, 8, eos_id=eos)
    for got, want in zip(out, greedy, strict=True):
        assert got == (want[: want.index(eos) + 1] if eos in want else want)
    assert gen.generate(model, PROMPTS[:1], 8, eos_id=greedy[0][0]) == [greedy[0][:1]]


def test_too_long_is_one_line_error(moe):
    model, _ = moe
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        gen.generate(model, PROMPTS, model.max_seq_len)


def test_cli_prints_tokens_per_second(moe, tmp_path, monkeypatch, capsys):
    config, (_, train_state) = tiny_config(), moe
    config.model.dispatch = "capacity"  # load() makes it dropless
    ckpt = Checkpoints(str(tmp_path), 1, False)
    ckpt.save(0, train_state, {"step": 0, "tokens_seen": 0})
    ckpt.close()
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    monkeypatch.setattr(sys, "argv", ["generate", "--workdir", str(tmp_path), "--prompt", "def ",
                                      "--prompt", "x", "--tokens", "5"])
    gen.main()
    out = capsys.readouterr().out
    assert "# step 0 of" in out and "def " in out and "tokens/s" in out, out


def test_compilations_do_not_grow_with_max_new_tokens(moe):
    model, _ = moe
    counts = []
    for max_new in (3, 40):
        jax.clear_caches()
        gen.TRACES.clear()
        out = gen.generate(model, PROMPTS, max_new)
        assert [len(r) for r in out] == [max_new] * 3
        counts.append(sum(gen.TRACES.values()))
    assert counts == [1, 1], counts  # one program: prefill and the whole decode loop
    gen.generate(model, PROMPTS, 17)  # same buckets: nothing new to compile
    assert sum(gen.TRACES.values()) == counts[1]
