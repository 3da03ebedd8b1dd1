"""Issue 32, item 2: YaRN rotary scaling as DeepSeek-V3 and Kimi K2 configure it. Its inverse
frequencies, attention factor and softmax scale against a NumPy reference written here from the
formulas (and against transformers' own where it is installed); rope_scaling="none" unchanged
bit for bit; one attention forward (and its decode) with yarn on against a NumPy scaled-rotary
attention; the config keys refused in one line."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import cli, config_lib
from moejax.model import kernels
from moejax.model.attention import Attention
from moejax.model.layers import Rope, rotary

# rope_scaling of the released config.json files (qk_rope_head_dim 64, rope_theta 10000).
DEEPSEEK_V3 = dict(factor=40.0, original_max_len=4096, beta_fast=32.0, beta_slow=1.0,
                   mscale=1.0, mscale_all_dim=1.0)
KIMI_K2 = dict(DEEPSEEK_V3, factor=32.0)
QWEN_STYLE = dict(factor=4.0, original_max_len=32768, beta_fast=32.0, beta_slow=1.0,
                  mscale=0.0, mscale_all_dim=0.0)  # no mscale keys: 0.1 ln(factor) + 1
V2_LITE_STYLE = dict(DEEPSEEK_V3, mscale=0.707)  # mscale != mscale_all_dim: a factor != 1


def reference_yarn(dim, theta, factor, original_max_len, beta_fast, beta_slow, mscale,
                   mscale_all_dim, truncate=True):
    """(inverse frequencies [dim / 2], cos/sin factor), one pair at a time in float64, from
    YaRN's formulas as transformers' _compute_yarn_parameters states them."""

    def magnitude(m):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    def pair_turning(rotations):  # the pair index d with original_max_len / wavelength_d = r
        return dim * math.log(original_max_len / (2 * math.pi * rotations)) / (2 * math.log(theta))

    low, high = pair_turning(beta_fast), pair_turning(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    width = (high - low) or 0.001
    freqs = []
    for i in range(dim // 2):
        plain = 1.0 / theta ** (2 * i / dim)
        ramp = min(max((i - low) / width, 0.0), 1.0)  # 0: keep plain, 1: divide by factor
        freqs.append(plain * (1 - ramp) + plain / factor * ramp)
    if mscale and mscale_all_dim:
        attention_factor = magnitude(mscale) / magnitude(mscale_all_dim)
    else:
        attention_factor = magnitude(1.0)
    return np.array(freqs), attention_factor


# gpt-oss (head_dim 64, rope_theta 150000 in its release; 10000 here as for the others):
# no mscale keys, and the ramp's ends not rounded to whole pairs (truncate false).
GPT_OSS = dict(QWEN_STYLE, factor=32.0, original_max_len=4096, truncate=False)
CASES = {"deepseek_v3(factor=40)": DEEPSEEK_V3, "kimi_k2(factor=32)": KIMI_K2,
         "qwen_style(no mscale)": QWEN_STYLE, "mscale=0.707,all_dim=1": V2_LITE_STYLE,
         "gpt_oss(truncate=false)": GPT_OSS}


class TestFrequencies:
    @pytest.mark.parametrize("dim", [64, 16])
    @pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
    def test_equal_to_the_numpy_reference(self, case, dim):
        rope = Rope(10_000.0, "yarn", **case)
        freqs, factor = reference_yarn(dim, 10_000.0, **case)
        np.testing.assert_allclose(rope.frequencies(dim), freqs, rtol=1e-6)
        assert rope.frequencies(dim).dtype == np.float32
        assert rope.attention_factor() == pytest.approx(factor, rel=1e-12)

    def test_truncate_false_keeps_the_ramp_ends_fractional(self):
        # Over 4096 positions pair d of 32 turns more than 32 times up to d = 10.47 and fewer
        # than once from d = 22.5. Truncated, the ramp runs from 10 to 23 (pair 11 at 1/13 of
        # the way to division by 32); not, from 10.47 to 22.5 (pair 11 at 0.53/12.03).
        plain = 10_000.0 ** (-np.arange(32) * 2 / 64)
        cut = Rope(10_000.0, "yarn", **dict(GPT_OSS, truncate=True)).frequencies(64)
        smooth = Rope(10_000.0, "yarn", **GPT_OSS).frequencies(64)
        for freqs, ramp in ((cut, 1 / 13), (smooth, 0.0440)):
            np.testing.assert_allclose(freqs[:11], plain[:11], rtol=1e-6)
            np.testing.assert_allclose(freqs[23:], plain[23:] / 32, rtol=1e-6)
            want = plain[11] * (1 - ramp) + plain[11] / 32 * ramp
            assert freqs[11] == pytest.approx(want, rel=2e-3)

    def test_deepseek_v3_by_hand(self):
        # Pair d turns 4096 * 10000**(-2d/64) / (2 pi) times over 4096 positions: more than
        # beta_fast = 32 up to d = 10.47 (floor 10), fewer than beta_slow = 1 from d = 22.5
        # (ceil 23). Below the ramp the frequency is kept, above it divided by 40.
        plain = 10_000.0 ** (-np.arange(32) * 2 / 64)
        freqs = Rope(10_000.0, "yarn", **DEEPSEEK_V3).frequencies(64)
        np.testing.assert_allclose(freqs[:11], plain[:11], rtol=1e-6)
        np.testing.assert_allclose(freqs[23:], plain[23:] / 40, rtol=1e-6)
        inside = freqs[11:23] / plain[11:23]
        assert np.all((inside < 1) & (inside > 1 / 40)) and np.all(np.diff(inside) < 0)

    @pytest.mark.parametrize("case,factor,scale", [
        # DeepSeek-V3: mscale = mscale_all_dim, so cos and sin stay; the logits take
        # (0.1 ln 40 + 1)**2 = 1.8739 over sqrt(192) (qk_nope 128 + qk_rope 64).
        (DEEPSEEK_V3, 1.0, 1.8738542071 / 192**0.5),
        (KIMI_K2, 1.0, (0.1 * math.log(32) + 1) ** 2 / 192**0.5),
        (QWEN_STYLE, 1.1386294361, None),  # 0.1 ln 4 + 1; the kernels' own 1/sqrt(192)
        (V2_LITE_STYLE, 1.2608037774 / 1.3688879454, 1.8738542071 / 192**0.5),
        (GPT_OSS, 1.3465735903, None),  # 0.1 ln 32 + 1
    ], ids=CASES.keys())
    def test_attention_factor_and_softmax_scale(self, case, factor, scale):
        rope = Rope(10_000.0, "yarn", **case)
        assert rope.attention_factor() == pytest.approx(factor, rel=1e-9)
        assert rope.softmax_scale(192) == (None if scale is None else pytest.approx(scale))

    @pytest.mark.parametrize("case", [DEEPSEEK_V3, KIMI_K2], ids=["deepseek_v3", "kimi_k2"])
    def test_equal_to_transformers(self, case):
        pytest.importorskip("torch")
        transformers = pytest.importorskip("transformers")
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        scaling = {"type": "yarn", "factor": case["factor"], "beta_fast": 32, "beta_slow": 1,
                   "mscale": 1.0, "mscale_all_dim": 1.0,
                   "original_max_position_embeddings": 4096}
        config = transformers.DeepseekV3Config(
            hidden_size=256, num_attention_heads=4, qk_rope_head_dim=64, qk_nope_head_dim=128,
            v_head_dim=128, rope_theta=10_000.0, rope_scaling=scaling,
            max_position_embeddings=int(4096 * case["factor"]))
        inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
        rope = Rope(10_000.0, "yarn", **case)
        np.testing.assert_allclose(rope.frequencies(64), inv_freq.numpy(), rtol=1e-6)
        assert rope.attention_factor() == pytest.approx(float(factor))


class TestNoneUnchanged:
    def test_rotary_bit_for_bit(self):
        x = jax.random.normal(jax.random.key(0), (2, 5, 3, 16))
        positions = jnp.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
        # The rotation as it was before rope_scaling existed, written out.
        freqs = 10_000.0 ** (-jnp.arange(8, dtype=jnp.float32) / 8)
        angles = positions[..., None, None].astype(jnp.float32) * freqs
        x1, x2 = jnp.split(x, 2, axis=-1)
        before = jnp.concatenate([x1 * jnp.cos(angles) - x2 * jnp.sin(angles),
                                  x2 * jnp.cos(angles) + x1 * jnp.sin(angles)], -1)
        for got in (rotary(x, positions, 10_000.0),
                    rotary(x, positions, 10_000.0, Rope(10_000.0))):
            assert np.array_equal(np.asarray(got), np.asarray(before))

    def test_kernel_scale_none_is_jax_default(self):
        q, k, v = (jax.random.normal(key, (1, 8, 2, 16)) for key in jax.random.split(
            jax.random.key(1), 3))
        default = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        assert np.array_equal(np.asarray(kernels.causal(q, k, v, None)), np.asarray(default))
        assert Rope(10_000.0).softmax_scale(16) is None


def model_config(**rope):
    cfg = config_lib.defaults().model
    cfg.update(d_model=32, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10_000.0,
               max_seq_len=64, **{f"rope_{k}": v for k, v in rope.items()})
    return cfg


def numpy_yarn_attention(x, attn, case, positions):
    """Causal grouped-query attention in float64 with YaRN's rotation and softmax scale."""
    wq, wkv, wo = (np.asarray(w[...], np.float64) for w in (attn.q, attn.kv, attn.out))
    x = np.asarray(x, np.float64)
    q, (k, v) = np.einsum("bsd,dhe->bshe", x, wq), np.einsum("bsd,dkhe->kbshe", x, wkv)
    freqs, factor = reference_yarn(16, 10_000.0, **case)
    angles = positions[..., None, None] * freqs  # [B, S, 1, 8]
    cos, sin = np.cos(angles) * factor, np.sin(angles) * factor

    def rotate(a):
        a1, a2 = a[..., :8], a[..., 8:]
        return np.concatenate([a1 * cos - a2 * sin, a2 * cos + a1 * sin], -1)

    q, k = rotate(q), rotate(k)
    mscale = 0.1 * case["mscale_all_dim"] * math.log(case["factor"]) + 1
    scale = 16**-0.5 * (mscale**2 if case["mscale_all_dim"] else 1)
    k, v = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)  # 4 query heads over 2 kv heads
    logits = np.einsum("bqhe,bkhe->bhqk", q, k) * scale
    seq = x.shape[1]
    logits = np.where(np.tril(np.ones((seq, seq), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    y = np.einsum("bhqk,bkhe->bqhe", p, v)
    return np.einsum("bshe,hed->bsd", y, wo)


# A small context so that 12 positions reach past original_max_len and the ramp is mid-way.
FORWARD = {"deepseek_v3(factor=40,original=8)": dict(DEEPSEEK_V3, original_max_len=8),
           "mscale=0.707,all_dim=1(factor=4,original=8)": dict(V2_LITE_STYLE, factor=4.0,
                                                              original_max_len=8)}


class TestAttentionForward:
    @pytest.mark.parametrize("case", FORWARD.values(), ids=FORWARD.keys())
    def test_forward_and_decode_equal_numpy(self, case):
        attn = Attention(model_config(scaling="yarn", **case), None, jnp.float32, jnp.float32,
                         nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(2), (2, 12, 32))
        positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
        want = numpy_yarn_attention(x, attn, case, np.asarray(positions, np.float64))
        np.testing.assert_allclose(np.asarray(attn(x, positions)), want, rtol=1e-5, atol=1e-5)
        # Decoding, a prefill of all 12 rows into a cache of 16: the same scale reaches it.
        cache = {n: jnp.zeros((1, 1, 2, 16, 2, 16)) for n in ("k", "v")}
        y, _ = attn.decode(x, positions, cache, (0, 0))
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)

    def test_splash_takes_the_scale(self):
        # The TPU kernel, in Pallas' interpreter, scaled as the XLA path is.
        q, k, v = (jax.random.normal(key, (1, 128, 2, 16)) for key in jax.random.split(
            jax.random.key(3), 3))
        scale = Rope(10_000.0, "yarn", **DEEPSEEK_V3).softmax_scale(16)
        np.testing.assert_allclose(
            np.asarray(kernels.splash(q, k, v, interpret=True, scale=scale)),
            np.asarray(kernels.xla(q, k, v, scale)), rtol=1e-5, atol=1e-5)


SPEC = f"{config_lib.CONFIGS}/tiny.py:smoke"
REFUSED = [  # overrides of the smoke config, the whole line
    (["model.rope_scaling=linear"],
     "model.rope_scaling='linear': unknown; allowed: none, yarn"),
    (["model.rope_factor=40"],
     "model.rope_factor=40.0: needs model.rope_scaling=yarn (without it the key changes "
     "nothing)"),
    (["model.rope_scaling=yarn", "model.rope_factor=0.5"],
     "model.rope_factor=0.5: must be >= 1 (1 = none)"),
    (["model.rope_scaling=yarn", "model.rope_beta_fast=0.5"],
     "model.rope_beta_fast=0.5: must be >= model.rope_beta_slow=1.0 (the ramp runs from the "
     "fast-turning pairs to the slow)"),
    (["model.rope_scaling=yarn", "model.rope_theta=1"],
     "model.rope_theta=1.0: must be > 1 with model.rope_scaling=yarn"),
    (["model.rope_scaling=yarn", "model.rope_mscale=-1"],
     "model.rope_mscale=-1.0: must be >= 0 (0 = not given)"),
]


class TestConfig:
    @pytest.mark.parametrize("overrides,error", REFUSED, ids=["+".join(o) for o, _ in REFUSED])
    def test_refused_in_one_line(self, overrides, error):
        config = cli.load(SPEC, [f"--config.{o}" for o in overrides])
        with pytest.raises(config_lib.ConfigError) as e:
            config_lib.validate(config, 1)
        assert str(e.value) == error

    def test_deepseek_v3_keys_accepted(self):
        overrides = ["rope_scaling=yarn", "rope_factor=40", "rope_original_max_len=4096",
                     "rope_mscale=1", "rope_mscale_all_dim=1"]
        config_lib.validate(cli.load(SPEC, [f"--config.model.{o}" for o in overrides]), 1)
