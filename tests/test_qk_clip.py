"""QK-clip (moejax/run/qk_clip.py): the rescale of grouped-query and latent attention weights
against NumPy written from its definition, each head's logits shrinking by exactly gamma_h;
the largest logit the forward pass reports (kernels.max_logits) against a NumPy max over the
masked logits, one device and under context parallelism; real runs whose logits QK-clip keeps
under its threshold; and the config refusal with qk_norm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import deepseek_v3, tiny
from moejax import config_lib, parallel
from moejax.config_ranges import ConfigError
from moejax.model import kernels
from moejax.run import qk_clip, state
from moejax.train import train_and_evaluate
from tests.test_attention import documents, visible

TAU = 1.5


# ---- NumPy references, from the definition ---------------------------------------------------

def np_gamma(top, tau):
    return np.minimum(1.0, tau / top)


def rotate(x, positions):
    """[T, ..., e] rotated pairs (i, i + e/2) by angle position x 10000^(-i/(e/2))."""
    half = x.shape[-1] // 2
    angles = positions.reshape(-1, *([1] * (x.ndim - 1))) * 1e4 ** (-np.arange(half) / half)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(angles) - x2 * np.sin(angles),
                           x2 * np.cos(angles) + x1 * np.sin(angles)], -1)


def rms(x):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)


def gqa_logits(p, x, positions):
    """[h, T, T] q.k logits of a grouped-query layer with biases, rotated, scaled."""
    q = np.einsum("td,dhe->the", x, p["q"]) + p["q_bias"]
    k = np.einsum("td,dge->tge", x, p["kv"][:, 0]) + p["kv_bias"][0]
    q, k = rotate(q, positions), rotate(k, positions)
    group = q.shape[1] // k.shape[1]
    return np.stack([q[:, h] @ k[:, h // group].T for h in range(q.shape[1])]) * 0.5


def mla_logits(p, x, positions, nope):
    """[h, T, T]: latent attention's [q_nope, rope(q_rope)] . [k_nope, rope(k_rope)]."""
    q = (np.einsum("tr,rhe->the", rms(x @ p["q_down"]), p["q_up"]) if "q_up" in p
         else np.einsum("td,dhe->the", x, p["q"]))
    rank = p["kv_up"].shape[0]
    ckr = x @ p["kv_down"]
    k_nope = np.einsum("tr,rhe->the", rms(ckr[:, :rank]), p["kv_up"][..., :nope])
    k_rope = rotate(ckr[:, rank:], positions)
    q_rope = rotate(q[..., nope:], positions)
    return np.stack([q[:, h, :nope] @ k_nope[:, h].T + q_rope[:, h] @ k_rope.T
                     for h in range(q.shape[1])]) * 0.5


def gqa_clipped(p, top, tau):
    """One layer's params, clipped as the definition says: key of group g by sqrt(m_g),
    query head h by gamma_h / sqrt(m_g), m_g the group's smallest gamma."""
    p = {k: v.copy() for k, v in p.items()}
    gamma = np_gamma(top, tau)
    heads, kv = p["q"].shape[1], p["kv"].shape[2]
    group = heads // kv
    for g in range(kv):
        m = gamma[g * group:(g + 1) * group].min()
        p["kv"][:, 0, g] *= np.sqrt(m)
        p["kv_bias"][0, g] *= np.sqrt(m)
        for h in range(g * group, (g + 1) * group):
            p["q"][:, h] *= gamma[h] / np.sqrt(m)
            p["q_bias"][h] *= gamma[h] / np.sqrt(m)
    return p


def mla_clipped(p, top, tau, nope):
    """Kimi's rule: q_nope and k_nope columns by sqrt(gamma), q_rope by gamma."""
    p = {k: v.copy() for k, v in p.items()}
    gamma = np_gamma(top, tau)
    query = "q_up" if "q_up" in p else "q"
    for h in range(len(gamma)):
        p[query][:, h, :nope] *= np.sqrt(gamma[h])
        p[query][:, h, nope:] *= gamma[h]
        p["kv_up"][:, h, :nope] *= np.sqrt(gamma[h])
    return p


# ---- 1. the clip against NumPy ---------------------------------------------------------------

D, LAYERS, T = 12, 2, 6


def random_layers(shapes: dict, seed: int) -> dict:
    """{name: [LAYERS, *shape]} float32 normal."""
    rng = np.random.default_rng(seed)
    return {n: rng.normal(size=(LAYERS, *s)).astype(np.float32) for n, s in shapes.items()}


def tops_around(tau, heads, seed):
    """[LAYERS, heads]: half the heads above tau, half below."""
    rng = np.random.default_rng(seed)
    return (tau * rng.choice([0.3, 0.9, 1.7, 6.0], (LAYERS, heads))).astype(np.float32)


def check_clip(layers, top, want_fn, logits_fn, extra=()):
    params = {"stacks": {"0": {"blocks": {"0": {"attn": layers, "attn_norm": {
        "scale": np.ones((LAYERS, D), np.float32)}}}}}}
    got = qk_clip.clip(params, {"stacks.0.blocks.0.attn": jnp.asarray(top)}, TAU, *extra)
    got = jax.tree.map(np.asarray, got)["stacks"]["0"]["blocks"]["0"]
    np.testing.assert_array_equal(got["attn_norm"]["scale"], 1.0)
    x = np.random.default_rng(9).normal(size=(T, D))
    positions = np.arange(T, dtype=np.float64)
    for layer in range(LAYERS):
        before = {n: a[layer].astype(np.float64) for n, a in layers.items()}
        want = want_fn(before, top[layer].astype(np.float64), TAU)
        for name in layers:
            np.testing.assert_allclose(got["attn"][name][layer], want[name], rtol=1e-6,
                                       atol=1e-6, err_msg=name)
        after = {n: a[layer].astype(np.float64) for n, a in got["attn"].items()}
        gamma = np_gamma(top[layer].astype(np.float64), TAU)
        np.testing.assert_allclose(logits_fn(after, x, positions),
                                   gamma[:, None, None] * logits_fn(before, x, positions),
                                   rtol=1e-5, atol=1e-5)


def test_gqa_clip_matches_numpy():
    """4 query heads over 2 kv groups, with biases; the values and output untouched."""
    h, kv, hd = 4, 2, 4
    layers = random_layers({"q": (D, h, hd), "kv": (D, 2, kv, hd), "q_bias": (h, hd),
                            "kv_bias": (2, kv, hd), "out": (h, hd, D)}, 0)
    check_clip(layers, tops_around(TAU, h, 1), gqa_clipped, gqa_logits)


@pytest.mark.parametrize("q_lora", [True, False])
def test_mla_clip_matches_numpy(q_lora):
    h, n, r, v, rank, rq = 3, 4, 2, 5, 6, 7
    shapes = {"kv_down": (D, rank + r), "kv_up": (rank, h, n + v), "out": (h, v, D)}
    shapes.update({"q_down": (D, rq), "q_up": (rq, h, n + r)} if q_lora else
                  {"q": (D, h, n + r)})
    layers = random_layers(shapes, 2)
    check_clip(layers, tops_around(TAU, h, 3), lambda p, t, tau: mla_clipped(p, t, tau, n),
               lambda p, x, pos: mla_logits(p, x, pos, n), (n,))


# ---- 2. S from the forward pass against NumPy -----------------------------------------------

def numpy_max_logits(q, k, segments, window, scale):
    """[H]: the largest q.k x scale over the pairs visible() allows, over the batch."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    group = q.shape[2] // k.shape[2]
    out = np.full(q.shape[2], -np.inf)
    for b in range(q.shape[0]):
        seen = visible(q.shape[1], window, segments[b])
        for h in range(q.shape[2]):
            s = q[b, :, h] @ k[b, :, h // group].T * scale
            out[h] = max(out[h], s[seen].max())
    return out


@pytest.mark.parametrize("sizes", [None, {"context": 2, "tensor": 2, "data": 2}])
def test_max_logits_match_numpy(sizes):
    """One device (the XLA path's) and context parallelism (balanced rows per device, heads
    split over tensor): causal, four documents a row, a window of 5."""
    mesh = None if sizes is None else parallel.make_mesh(sizes)
    keys = jax.random.split(jax.random.key(0), 2)
    q = jax.random.normal(keys[0], (4, 32, 4, 8)) * 2
    k = jax.random.normal(keys[1], (4, 32, 2, 8))
    segments = documents(4, 32)
    got = jax.jit(lambda q, k, s: kernels.max_logits(q, k, mesh, 0.3, s, 5))(q, k, segments)
    np.testing.assert_allclose(np.asarray(got), numpy_max_logits(q, k, segments, 5, 0.3),
                               rtol=1e-5)


def test_attention_layer_reports_its_max_logit():
    """The module's S: its own rotated q, k through the NumPy max (full causal, rows one
    document each)."""
    config = tiny.get_config("smoke")
    from moejax.model.attention import Attention

    attn = Attention(config.model, None, jnp.float32, jnp.float32, nnx.Rngs(0), window=3)
    x = jax.random.normal(jax.random.key(1), (2, 16, config.model.d_model)) * 3
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
    y, top = attn(x, positions, max_logit=True)
    np.testing.assert_allclose(np.asarray(y), np.asarray(attn(x, positions)), rtol=1e-6)
    q, k, _ = attn.project(x, positions)
    want = numpy_max_logits(q, k, np.ones((2, 16)), 3, config.model.head_dim ** -0.5)
    np.testing.assert_allclose(np.asarray(top), want, rtol=1e-5)


# ---- 3. real runs --------------------------------------------------------------------------

def largest_logits_after(monkeypatch, config, tmp_path) -> list[tuple[float, float]]:
    """Runs train_and_evaluate; per step, the largest logit the forward pass saw on its
    batch before the update, and the one the weights after the step (clipped, if on) give on
    that same batch. One attention layer first: no randomness (the router's) reaches its
    logits, so any rng recomputes them."""
    real, seen = state.train_step_fn, []

    def recording(setup):
        step_fn = real(setup)

        @jax.jit
        def largest(params, batch, step):
            model = nnx.merge(setup.graphdef, params)
            rng = jax.random.fold_in(jax.random.key(config.seed), step)
            tokens, segments = batch["tokens"], batch["segments"][:, :-1]
            if len(model.mtp):
                aux = model.with_mtp(tokens, train=True, rng=rng, segments=segments,
                                     max_logits=True)[1]
            else:
                aux = model(tokens[:, :-1], train=True, rng=rng, segments=segments,
                            max_logits=True)[1]
            return jnp.max(jnp.stack([t.max() for t in jax.tree.leaves(aux["max_logits"])]))

        def step(train_state, batch, i):
            before = largest(train_state["params"], batch, i)
            train_state, metrics = step_fn(train_state, batch, i)
            seen.append((float(before), float(largest(train_state["params"], batch, i))))
            return train_state, metrics

        return step

    monkeypatch.setattr(state, "train_step_fn", recording)
    train_and_evaluate(config, str(tmp_path))
    return seen


# Real runs (the clip itself and S are checked fast above): the slow suite's.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "deepseek_v3"])
def test_qk_clip_holds_the_largest_logit_under_tau(name, monkeypatch, tmp_path):
    """QK-clip holds the largest attention logit under its threshold on a run made to exceed
    it: tau far below the logits at init. With qk_clip on, the weights after every step give
    logits <= tau on that step's batch; the same run with qk_clip = 0 stays far above tau,
    so the check can fail.

    The clip is exact for the inputs its S came from (test_*_clip_matches_numpy); what moves
    those inputs is not clipped until the next step: the update itself (S is the forward
    pass's, on the weights before it: a small learning rate keeps that under 1% here) and,
    in a deeper model, the clip of the layers below (at smoke's 2 layers and lr 3e-3,
    tiny:smoke's first step ends 17% over tau, its third 0.1% under). So one attention
    layer, no MTP. tiny under Muon over two micro-batches (S the larger of theirs),
    deepseek_v3 (latent attention) under AdamW."""
    config = (tiny if name == "tiny" else deepseek_v3).get_config("smoke")
    config.model.update(num_layers=1, first_dense_layers=0, mtp_layers=0)
    config.train.update(steps=3, eval_every=100, ckpt_every=100, log_every=1, lr=1e-4)
    if name == "tiny":
        config.train.update(optimizer="muon", grad_accum=2)
    config.train.qk_clip = TAU
    clipped = largest_logits_after(monkeypatch, config, tmp_path / "on")
    assert clipped[0][0] > 2 * TAU, clipped  # the run starts far above tau
    for _, after in clipped:
        assert after <= TAU * 1.01, clipped
    if name == "tiny":
        config.train.qk_clip = 0.0
        free = largest_logits_after(monkeypatch, config, tmp_path / "off")
        assert min(after for _, after in free) > 2 * TAU, free


# ---- 4. the refusal --------------------------------------------------------------------------

def test_qk_norm_refuses_qk_clip():
    config = tiny.get_config("smoke")
    config.model.vocab_size = 64
    config.model.qk_norm = "head"
    config.train.qk_clip = 100.0
    with pytest.raises(ConfigError) as error:
        config_lib.validate(config, 8)
    message = str(error.value)
    assert "\n" not in message and "train.qk_clip=100.0" in message, message
    assert "model.qk_norm='head'" in message and "allowed" in message, message
    config.train.qk_clip = 0.0
    config_lib.validate(config, 8)
