"""Issue 32, items 1, 4 and 6: multi-head latent attention against a NumPy version written here
from DeepSeek-V3's formulas (low-rank query or not, YaRN on), the absorbed decode over the
compressed cache against the full forward, multi-token prediction's alignment and loss, and the
config keys refused in one line."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import tiny
from moejax import config_lib
from moejax.model.mla import LatentAttention
from moejax.model.transformer import Transformer
from moejax.run import state
from tests.test_yarn import DEEPSEEK_V3, reference_yarn

D, H, NOPE, ROPE, V, RQ, RKV = 32, 4, 8, 6, 10, 12, 16


def mla_config(**model):
    config = tiny.get_config("smoke")
    config.model.update({**dict(attention="mla", d_model=D, num_heads=H, q_lora_rank=RQ,
                                 kv_lora_rank=RKV, qk_nope_head_dim=NOPE,
                                 qk_rope_head_dim=ROPE, v_head_dim=V, vocab_size=64), **model})
    return config


def rms(x, scale, eps=1e-6):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale


def rotate(x, positions, freqs, factor):
    """x [..., S, r] (half-split pairs), positions [S]."""
    angles = positions[:, None] * freqs
    cos, sin = np.cos(angles) * factor, np.sin(angles) * factor
    x1, x2 = np.split(x, 2, -1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def reference_mla(p, x, rope):
    """One sequence x [S, d] through MLA in float64, head by head."""
    seq = x.shape[0]
    pos = np.arange(seq, dtype=np.float64)
    freqs, factor = reference_yarn(ROPE, 10_000.0, **rope)
    if "q_up" in p:
        q = np.einsum("sr,rhe->she", rms(x @ p["q_down"], p["q_norm"]), p["q_up"])
    else:
        q = np.einsum("sd,dhe->she", x, p["q"])
    ckr = x @ p["kv_down"]
    c, k_rope = rms(ckr[:, :RKV], p["kv_norm"]), rotate(ckr[:, RKV:], pos, freqs, factor)
    kv = np.einsum("sr,rhe->she", c, p["kv_up"])
    scale = (NOPE + ROPE) ** -0.5 * (0.1 * rope["mscale_all_dim"] * np.log(rope["factor"]) + 1) ** 2
    out = np.zeros((seq, D))
    for h in range(H):
        qh = np.concatenate([q[:, h, :NOPE], rotate(q[:, h, NOPE:], pos, freqs, factor)], -1)
        kh = np.concatenate([kv[:, h, :NOPE], k_rope], -1)
        logits = qh @ kh.T * scale + np.triu(np.full((seq, seq), -np.inf), 1)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        out += (probs / probs.sum(-1, keepdims=True)) @ kv[:, h, NOPE:] @ p["out"][h]
    return out


ROPE_CASE = dict(DEEPSEEK_V3, factor=4.0, original_max_len=8)  # the ramp within these dims


@pytest.mark.parametrize("q_lora_rank", [RQ, 0], ids=["low_rank_query", "full_query"])
def test_latent_attention_equals_numpy(q_lora_rank):
    rope = ROPE_CASE
    cfg = mla_config(q_lora_rank=q_lora_rank, rope_scaling="yarn", rope_factor=rope["factor"],
                     rope_original_max_len=rope["original_max_len"],
                     rope_mscale=rope["mscale"], rope_mscale_all_dim=rope["mscale_all_dim"],
                     max_seq_len=64).model
    attn = LatentAttention(cfg, None, jnp.float32, jnp.float32, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for norm in ("q_norm", "kv_norm"):  # gains other than 1, so a missed norm shows
        if hasattr(attn, norm):
            getattr(attn, norm).scale[...] = rng.uniform(0.5, 1.5, getattr(attn, norm).scale.shape)
    x = rng.standard_normal((2, 24, D)).astype(np.float32)
    positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
    got = np.asarray(jax.jit(lambda x: attn(x, positions))(x))
    p = {name: np.asarray(getattr(attn, name)[...], np.float64)
         for name in ("q", "q_down", "q_up", "kv_down", "kv_up", "out") if hasattr(attn, name)}
    p.update({name: np.asarray(getattr(attn, name).scale[...], np.float64)
              for name in ("q_norm", "kv_norm") if hasattr(attn, name)})
    for b in range(2):
        np.testing.assert_allclose(got[b], reference_mla(p, x[b].astype(np.float64), rope),
                                   atol=2e-5, rtol=1e-5)


def test_absorbed_decode_over_the_compressed_cache_equals_the_forward():
    """A dense model (capacity routing would drop differently over 12 tokens than over 1):
    a prefill of 7 and five one-token steps give the forward's logits, while the cache holds
    kv_lora_rank + qk_rope_head_dim numbers per token and layer, not the heads' keys/values."""
    cfg = mla_config(num_experts=0, num_layers=2).model
    model = Transformer(cfg, mesh=None, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
    want, _ = jax.jit(lambda t: model(t, train=False))(tokens)
    cache = model.init_cache(2, 16)
    assert {k: v.shape for k, v in cache[0].items()} == {"c": (2, 1, 2, 16, RKV),
                                                         "k_rope": (2, 1, 2, 16, ROPE)}
    decode = jax.jit(lambda t, s, c: model.decode(t, s, c))
    got, cache = decode(tokens[:, :7], jnp.zeros(2, jnp.int32), cache)
    got = [got]
    for i in range(7, 12):
        logits, cache = decode(tokens[:, i:i + 1], jnp.full(2, i, jnp.int32), cache)
        got.append(logits)
    np.testing.assert_allclose(np.concatenate(got, 1), want, atol=2e-5, rtol=1e-5)
    assert decode._cache_size() == 2  # the prefill's shape and the one-token step's


def test_mtp_predicts_k_ahead_from_what_it_may_see_and_its_loss_is_the_masked_mean():
    config = mla_config(num_experts=0, num_layers=1, mtp_layers=2)
    model = Transformer(config.model, mesh=None, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 11), 0, 64)  # S = 10 inputs
    run = jax.jit(lambda t: model.with_mtp(t, train=False))
    main, _, mtp = run(tokens)
    assert mtp.shape == (2, 2, 10, 64)
    np.testing.assert_allclose(main, model(tokens[:, :-1], train=False)[0], atol=1e-5)
    # Depth k at position i reads tokens up to i + k: changing token 6 leaves depth 1's
    # positions 0..4 and depth 2's 0..3 as they were, and changes the next ones.
    changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % 64)
    _, _, mtp2 = run(changed)
    for k, first in ((1, 5), (2, 4)):
        np.testing.assert_allclose(mtp2[k - 1, :, :first], mtp[k - 1, :, :first], atol=1e-6)
        assert np.abs(mtp2[k - 1, :, first] - mtp[k - 1, :, first]).max() > 1e-3
    # The loss: depth k at i scores tokens[i + k + 1], i < 10 - k; the mean over depths.
    t, z = np.asarray(tokens), np.asarray(mtp, np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = np.mean([np.mean([-logp[k - 1, b, i, t[b, i + k + 1]]
                             for b in range(2) for i in range(10 - k)]) for k in (1, 2)])
    np.testing.assert_allclose(state.mtp_loss(mtp, tokens), want, rtol=1e-5)
    # ... and what the train step adds: ce + mtp_coef x that, logged as mtp_loss.
    graphdef = nnx.graphdef(model)
    loss, metrics = jax.jit(lambda params, t: state.loss_fn(params, graphdef, t, None,
                                                            config.train))(nnx.state(model), tokens)
    ce = optax.softmax_cross_entropy_with_integer_labels(main, tokens[:, 1:]).mean()
    np.testing.assert_allclose(loss, ce + config.train.mtp_coef * want, rtol=1e-5)
    np.testing.assert_allclose(metrics["mtp_loss"], want, rtol=1e-5)


@pytest.mark.parametrize(("key", "value", "says"), [
    ("attention", "latent", "model.attention='latent': unknown; allowed: gqa, mla"),
    ("kv_lora_rank", 0, "model.kv_lora_rank=0: must be >= 1 with model.attention=mla"),
    ("qk_rope_head_dim", 5, "model.qk_rope_head_dim=5: must be even and >= 2"),
    ("mtp_layers", -1, "model.mtp_layers=-1: must be >= 0"),
])
def test_bad_latent_keys_are_one_line(key, value, says):
    config = mla_config()
    config.model[key] = value
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config, 1)
    assert says in str(e.value) and "\n" not in str(e.value)
