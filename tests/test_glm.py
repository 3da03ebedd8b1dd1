"""GLM-4.5 (Glm4MoeForCausalLM) in moejax: partial rotary (model.rope_fraction) against NumPy
written from the definition; the glm4_moe fixture's MTP module against transformers' MtpModel
(its main logits, greedy tokens and byte-identical round trip are tests/test_convert.py's);
config.json as GLM ships it and as transformers 5 writes it, what is refused, the export's
config.json; configs/glm45_air.py against the published 106B total / 12B active."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from moejax import convert
from moejax.config_lib import ConfigError
from moejax.hf import maps
from moejax.model.layers import Rope, rope_fraction, rotary
from tests.test_convert import FIXTURES, load_model
from tests.test_yarn import reference_yarn

GLM = os.path.join(FIXTURES, "glm4_moe")


def reference_rotary(x, positions, freqs, factor=1.0):
    """NumPy, float64, a pair at a time: dims i and i + r/2 of each head's first r =
    2 len(freqs) dims turn by the angle position * freqs[i] (cos and sin times `factor`);
    the other dims pass unchanged."""
    out = x.astype(np.float64)
    half = len(freqs)
    for b, s, i in np.ndindex(*positions.shape, half):
        angle = positions[b, s] * freqs[i]
        cos, sin = np.cos(angle) * factor, np.sin(angle) * factor
        u, v = x[b, s, :, i].astype(np.float64), x[b, s, :, i + half].astype(np.float64)
        out[b, s, :, i], out[b, s, :, i + half] = u * cos - v * sin, v * cos + u * sin
    return out


X = np.random.default_rng(0).standard_normal((2, 5, 3, 16)).astype(np.float32)
POSITIONS = np.array([[0, 1, 2, 3, 4], [7, 30, 31, 90, 127]])


@pytest.mark.parametrize("fraction,rotated", [(0.5, 8), (0.25, 4), (1.0, 16)])
def test_partial_rotary_equals_numpy(fraction, rotated):
    """GLM-4.5's 0.5: the first 8 of 16 dims turn in pairs (i, i + 4), at 10000**(-2i/8)."""
    freqs = 10_000.0 ** (-2 * np.arange(rotated // 2) / rotated)
    got = rotary(jax.numpy.asarray(X), POSITIONS, 10_000.0, Rope(10_000.0, fraction=fraction))
    want = reference_rotary(X, POSITIONS, freqs)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(got)[..., rotated:], X[..., rotated:])


def test_partial_rotary_with_yarn_turns_its_dims_at_yarns_frequencies():
    """YaRN's frequencies and attention factor over the 8 rotated dims, as transformers
    computes them for a partial_rotary_factor (dim = head_dim * factor)."""
    yarn = dict(factor=4.0, original_max_len=32, beta_fast=32.0, beta_slow=1.0, mscale=0.0,
                mscale_all_dim=0.0)
    rope = Rope(10_000.0, "yarn", **yarn, fraction=0.5)
    freqs, factor = reference_yarn(8, 10_000.0, *yarn.values())
    got = rotary(jax.numpy.asarray(X), POSITIONS, 10_000.0, rope)
    np.testing.assert_allclose(np.asarray(got), reference_rotary(X, POSITIONS, freqs, factor),
                               atol=2e-5, rtol=0)
    assert rope.softmax_scale(16) is None  # the kernels' own 1/sqrt(head_dim): 16, not 8


def test_a_fraction_of_one_is_the_rotary_of_before_bit_for_bit():
    x = jax.numpy.asarray(X)
    np.testing.assert_array_equal(np.asarray(rotary(x, POSITIONS, 1e4, Rope(1e4))),
                                  np.asarray(rotary(x, POSITIONS, 1e4)))


@pytest.mark.parametrize("model,message", [
    (dict(rope_fraction=0.0), r"rope_fraction=0.0: allowed: a number in \(0, 1\]"),
    (dict(rope_fraction=1.5), r"rope_fraction=1.5: allowed: a number in \(0, 1\]"),
    (dict(rope_fraction=True), "rope_fraction=True"),
    (dict(rope_fraction=0.1875), r"int\(head_dim=16 x 0.1875\) = 3 dims; allowed: .* even"),
    (dict(rope_fraction=0.5, attention="mla"), "allowed with attention=mla: 1.0"),
])
def test_bad_rope_fractions_fail_in_one_line(model, message):
    cfg = ml_collections.ConfigDict({"head_dim": 16, "attention": "gqa", **model})
    with pytest.raises(ConfigError, match=message) as e:
        rope_fraction(cfg)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("glm") / "run")
    convert.from_hf(GLM, workdir, {"data": 1})
    return workdir


def test_mtp_logits_equal_transformers(converted):
    """Depth 1 at position i reads the final-normed hidden state there and the token at
    i + 1, through model.layers.3 (partial rotary, biases, q/k norm and the routed MoE of
    the main layers), against transformers' MtpModel; one program gives both (a dummy token
    appended: the last position's MTP logits are dropped)."""
    expected = np.load(os.path.join(GLM, "expected.npz"))
    tokens = expected["input_ids"]
    config, model = load_model(converted)
    assert config.model.mtp_layers == 1
    graphdef, state = nnx.split(model)
    padded = np.concatenate([tokens, tokens[:, :1]], 1)
    logits, _, mtp = jax.jit(lambda s, x: nnx.merge(graphdef, s).with_mtp(x, train=False))(
        state, padded)
    np.testing.assert_allclose(np.asarray(logits), expected["logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(mtp[0, :, :-1]), expected["mtp_logits"], atol=1e-4,
                               rtol=0)


def test_converted_config(converted):
    with open(os.path.join(converted, "config.json")) as f:
        m = json.load(f)["model"]
    keys = ("rope_fraction", "rope_theta", "head_dim", "qk_norm", "qkv_bias", "router_score",
            "n_group", "topk_group", "routed_scaling_factor", "renormalize",
            "num_shared_experts", "first_dense_layers", "dense_d_ff", "d_ff", "mtp_layers",
            "norm_eps", "attention")
    assert {k: m[k] for k in keys} == dict(
        rope_fraction=0.5, rope_theta=1e4, head_dim=16, qk_norm="head", qkv_bias=True,
        router_score="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=1.8,
        renormalize=True, num_shared_experts=1, first_dense_layers=1, dense_d_ff=48, d_ff=16,
        mtp_layers=1, norm_eps=1e-5, attention="gqa")


def test_export_config_reads_back_as_the_import(converted):
    """config.json of the export: the same model keys as the fixture's; the rotary share
    both at the top level (GLM's files, transformers 4) and in rope_parameters."""
    with open(os.path.join(converted, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    with open(os.path.join(GLM, "config.json")) as f:
        saved = json.load(f)
    hf = maps.hf_config(config, "bfloat16", saved)
    assert (hf["architectures"], hf["partial_rotary_factor"],
            hf["rope_parameters"]["partial_rotary_factor"]) == (["Glm4MoeForCausalLM"], 0.5, 0.5)
    assert maps.model_config(hf) == maps.model_config(saved)
    assert maps.model_config(maps.hf_config(config, "bfloat16", None)) == maps.model_config(saved)


# GLM-4.5-Air's released config.json (fields that matter), as on the hub.
GLM_45_AIR = dict(
    architectures=["Glm4MoeForCausalLM"], attention_bias=True, first_k_dense_replace=1,
    head_dim=128, hidden_act="silu", hidden_size=4096, intermediate_size=10944,
    max_position_embeddings=131072, model_type="glm4_moe", moe_intermediate_size=1408,
    n_group=1, n_routed_experts=128, n_shared_experts=1, norm_topk_prob=True,
    num_attention_heads=96, num_experts_per_tok=8, num_hidden_layers=46, num_key_value_heads=8,
    num_nextn_predict_layers=1, partial_rotary_factor=0.5, rms_norm_eps=1e-5, rope_scaling=None,
    rope_theta=1000000, routed_scaling_factor=1.0, tie_word_embeddings=False, topk_group=1,
    torch_dtype="bfloat16", use_qk_norm=False, vocab_size=151552)


def test_released_air_config_is_our_config():
    from tests.test_configs import load

    want = load("glm45_air").get_config().model
    got = maps.model_config(GLM_45_AIR)
    keys = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "d_ff", "dense_d_ff", "num_experts", "top_k", "renormalize", "rope_theta",
            "rope_fraction", "norm_eps", "qk_norm", "qkv_bias", "tie_embeddings", "activation",
            "router_score", "n_group", "topk_group", "routed_scaling_factor",
            "num_shared_experts", "shared_gate", "first_dense_layers", "moe_every",
            "mtp_layers", "max_seq_len", "attention", "sliding_window")
    assert {k: got[k] for k in keys} == {k: want[k] for k in keys}


@pytest.mark.parametrize("edit,fraction", [
    (dict(), 0.5),  # GLM's own file: at the top level
    (dict(partial_rotary_factor=None, rope_theta=None,
          rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                           "partial_rotary_factor": 0.25}), 0.25),  # transformers 5's
    (dict(partial_rotary_factor=0.25, rope_parameters={"partial_rotary_factor": 0.25}), 0.25),
    (dict(partial_rotary_factor=None), 0.5),  # Glm4MoeConfig's default
    (dict(partial_rotary_factor=1.0), 1.0),
])
def test_partial_rotary_factor_is_read_where_either_writer_puts_it(edit, fraction):
    m = maps.model_config({**GLM_45_AIR, **edit})
    assert (m["rope_fraction"], m["rope_theta"]) == (fraction, 1e6)


@pytest.mark.parametrize("edit,message", [
    (dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.25}),
     "partial_rotary_factor=0.5: disagrees with rope_parameters.partial_rotary_factor=0.25"),
    (dict(partial_rotary_factor=1.5), r"partial_rotary_factor=1.5: .*allowed: a number in \(0, "),
    (dict(partial_rotary_factor=0.01), "partial_rotary_factor=0.01: .*an even number >= 2 of "
     "head_dim=128"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}),
     "rope_scaling.rope_type='yarn': not supported for Glm4MoeForCausalLM; allowed: default"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(first_k_dense_replace=46), "first_k_dense_replace=46.*< num_hidden_layers=46"),
    (dict(n_shared_experts=0), "n_shared_experts=0: not an integer >= 1"),
    (dict(use_qk_norm="yes"), "use_qk_norm='yes': not a boolean"),
])
def test_configs_moejax_cannot_compute_are_refused_in_one_line(edit, message):
    with pytest.raises(ConfigError, match=message) as e:
        maps.model_config({**GLM_45_AIR, **edit})
    assert "\n" not in str(e.value)


def test_to_hf_refuses_what_glm_cannot_compute():
    from configs import tiny

    config = tiny.get_config("smoke")
    config.model.update(router_score="sigmoid", num_shared_experts=1, qk_norm="all")
    with pytest.raises(ConfigError, match="model.qk_norm='all': Glm4MoeForCausalLM cannot "
                       "compute it; allowed: none or head"):
        maps.hf_config(config, "float32", None)
    config.model.update(router_score="softmax", qk_norm="head", rope_fraction=0.5)
    with pytest.raises(ConfigError, match="model.router_score='softmax': Glm4MoeForCausalLM"):
        maps.hf_config(config, "float32", None)


def test_a_glm_made_here_loads_in_transformers(tmp_path):
    """A run that never saw transformers (sigmoid routing over 2 groups, a shared expert, a
    dense first layer, partial rotary, q/k/v biases and norms, random router bias): its
    export computes the same logits there."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from configs import tiny
    from moejax import parallel
    from moejax.run import state
    from moejax.run.checkpoint import Checkpoints

    config = tiny.get_config("smoke")
    config.model.update(vocab_size=257, dispatch="dropless", router_score="sigmoid",
                        num_shared_experts=1, rope_fraction=0.5, qkv_bias=True, qk_norm="head",
                        num_layers=3, first_dense_layers=1, dense_d_ff=40, n_group=2,
                        topk_group=1, routed_scaling_factor=2.0, renormalize=True)
    s = state.setup(config, parallel.make_mesh({}))
    train_state = state.init(s)
    train_state["params"] = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.3 * jax.random.normal(jax.random.key(len(str(p))), x.shape, x.dtype)
        if "bias" in jax.tree_util.keystr(p) else x, train_state["params"])
    ckpt = Checkpoints(str(tmp_path / "run"), 1, False)
    ckpt.save(0, train_state, {"step": 0, "tokens_seen": 0})
    ckpt.close()
    with open(tmp_path / "run" / "config.json", "w") as f:
        f.write(config.to_json_best_effort())
    convert.to_hf(str(tmp_path / "run"), str(tmp_path / "out"), dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"),
                                                           dtype=torch.float32)
    tokens = np.random.default_rng(0).integers(0, 257, (2, 12))
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    ours, _ = nnx.merge(s.graphdef, train_state["params"])(tokens, train=False)
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)


def test_glm45_air_is_the_published_106b_with_12b_active():
    """Published: 106B total, 12B active. Counted without the MTP module (2.4B more): 106.85B
    total, within 1% of 106B (embedding and output head included, as the 106B is); 13.42B
    active with the embedding and the output head, 12.18B without them (within 2% of 12B:
    their 1.24B is what the published active count leaves out)."""
    from tests.test_configs import counts, load

    config = load("glm45_air").get_config()
    embed_and_head = 2 * 151_552 * 4096
    with_mtp = counts(config, 151_552)
    config.model.mtp_layers = 0
    c = counts(config, 151_552)
    assert 106.0e9 < c["total"] < 107.0e9, c
    assert 12.0e9 < c["active"] - embed_and_head < 12.25e9, c
    assert 2.3e9 < with_mtp["total"] - c["total"] < 2.4e9, with_mtp
