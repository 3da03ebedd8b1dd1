"""moejax.convert for DeepseekV3ForCausalLM (DeepSeek-V3, Kimi K2) against transformers itself,
through the fixtures it made (tests/fixtures/make_deepseek_fixtures.py): logits, the MTP
module's logits, greedy tokens, the round trip with MTP and the correction bias, DeepSeek's
block FP8 dequantized, Kimi K2's config.json, what is refused."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from moejax import convert
from moejax.config_lib import ConfigError
from moejax.hf import files, maps
from tests.test_convert import FIXTURES, load_model, tensors

NAMES = ("deepseek_v3", "deepseek_v3_noq", "kimi_k2")


# Where each fixture is converted from: one device (tests/test_convert.py reads its fixtures
# over fsdp=2 x expert=4, every device a slice of each tensor, through the same reader).
LAYOUTS = {"deepseek_v3": {"data": 1}, "deepseek_v3_noq": {"data": 1},
           "kimi_k2": {"data": 1}}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> workdir."""
    root = tmp_path_factory.mktemp("converted_deepseek")
    out = {}
    for name in NAMES:
        out[name] = str(root / name)
        convert.from_hf(os.path.join(FIXTURES, name), out[name], LAYOUTS[name])
    return out


def expected(name):
    return np.load(os.path.join(FIXTURES, name, "expected.npz"))


def forward(workdir, tokens, **overrides):
    """(logits, aux, MTP depth 1's logits or None) of the converted run, jitted: with MTP one
    program gives both (a dummy token appended: the last position's MTP logits are dropped)."""
    config, model = load_model(workdir, **overrides)
    graphdef, state = nnx.split(model)
    if not config.model.mtp_layers:
        logits, aux = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=False))(state, tokens)
        return logits, aux, None
    padded = np.concatenate([tokens, tokens[:, :1]], 1)
    logits, aux, mtp = jax.jit(lambda s, x: nnx.merge(graphdef, s).with_mtp(x, train=False))(
        state, padded)
    return logits, aux, mtp[0, :, :-1]


@pytest.mark.parametrize("name,path", [("deepseek_v3", "dropless"), ("deepseek_v3", "capacity"),
                                       ("deepseek_v3_noq", "dropless"), ("kimi_k2", "capacity")])
def test_logits_equal_transformers(converted, name, path):
    """Dropless, or the capacity path with one group of all 32 tokens (C = T: nothing can be
    dropped); deepseek_v3's MTP module too, against transformers' MtpModel: depth 1 at position
    i reads the final-normed hidden state there and the token at i + 1."""
    exp = expected(name)
    overrides = ({"dispatch": "dropless"} if path == "dropless" else
                 {"dispatch": "capacity", "num_groups": 1})
    logits, aux, mtp = forward(converted[name], exp["input_ids"], **overrides)
    np.testing.assert_allclose(np.asarray(logits), exp["logits"], atol=1e-4, rtol=0)
    assert float(aux["dropped_frac"].max()) == 0.0
    assert (mtp is None) == ("mtp_logits" not in exp.files)
    if mtp is not None:
        np.testing.assert_allclose(np.asarray(mtp), exp["mtp_logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_equals_transformers(converted, name):
    """Through the compressed cache (decode with the absorbed projections); the MTP module
    drafts nothing."""
    from moejax import generate

    exp = expected(name)
    _, model, _ = generate.load(converted[name])
    new = generate.generate(model, exp["prompt_ids"].tolist(), 10)
    np.testing.assert_array_equal(np.concatenate([exp["prompt_ids"], new], 1),
                                  exp["greedy_ids"])


def test_converted_configs(converted):
    with open(os.path.join(converted["deepseek_v3"], "config.json")) as f:
        m = json.load(f)["model"]
    assert {k: m[k] for k in ("attention", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                              "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group",
                              "routed_scaling_factor", "first_dense_layers", "dense_d_ff",
                              "router_score", "renormalize", "num_shared_experts",
                              "mtp_layers", "rope_scaling", "rope_factor",
                              "rope_original_max_len", "rope_mscale_all_dim")} == dict(
        attention="mla", q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=12, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        first_dense_layers=1, dense_d_ff=32, router_score="sigmoid", renormalize=True,
        num_shared_experts=1, mtp_layers=1, rope_scaling="yarn", rope_factor=4.0,
        rope_original_max_len=32, rope_mscale_all_dim=1.0)
    with open(os.path.join(converted["deepseek_v3_noq"], "config.json")) as f:
        m = json.load(f)["model"]
    assert (m["q_lora_rank"], m["n_group"], m["first_dense_layers"], m["rope_scaling"],
            m["renormalize"], m["mtp_layers"]) == (0, 1, 0, "none", False, 0)


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v3_noq"])
def test_round_trip_is_byte_identical(converted, name, tmp_path):
    """Every tensor, the MTP layer's (its embed_tokens / shared_head.head copies too) and the
    float32 correction bias included, over several files."""
    out = str(tmp_path / "out")
    files_written = convert.to_hf(converted[name], out, shard_gib=60_000 / 2**30)
    assert len(files_written) > 1
    ref, got = tensors(os.path.join(FIXTURES, name)), tensors(out)
    assert got.keys() == ref.keys()
    for k in ref:
        assert (got[k].dtype, got[k].shape) == (ref[k].dtype, ref[k].shape), k
        assert got[k].tobytes() == ref[k].tobytes(), k
    assert any(".layers.3.eh_proj" in k for k in ref) == (name == "deepseek_v3")
    assert ref["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == np.float32
    with open(os.path.join(out, "config.json")) as f:
        hf = json.load(f)
    with open(os.path.join(FIXTURES, name, "config.json")) as f:
        saved = json.load(f)
    assert maps.model_config(hf) == maps.model_config(saved)


def test_fp8_import_equals_numpy_dequantization(converted, tmp_path):
    """Kimi K2's float8 weights, each times its 8 x 8 block's weight_scale_inv (edge blocks
    cropped), are what the run holds; the export writes them bf16 as transformers' own
    deepseek_v3, without Kimi's quantization_config and auto_map."""
    path = os.path.join(FIXTURES, "kimi_k2", "model.safetensors")
    name = "model.layers.0.self_attn.q_a_proj.weight"  # [20, 32]: rows 16..19 a cropped block
    q, scale = files.read_raw(path, name), files.Tensors(os.path.dirname(path)).get(
        name + "_scale_inv")
    assert (q.dtype.name, q.shape, scale.shape) == ("float8_e4m3fn", (20, 32), (3, 4))
    want = np.empty((20, 32), np.float32)
    for i, j in np.ndindex(20, 32):
        want[i, j] = float(q[i, j]) * scale[i // 8, j // 8]
    _, model = load_model(converted["kimi_k2"])
    got = np.asarray(model.stacks[0].blocks[0].attn.q_down[...])[0]  # [d, Rq]
    np.testing.assert_array_equal(got.T, want)
    out = str(tmp_path / "out")
    convert.to_hf(converted["kimi_k2"], out)
    with open(os.path.join(out, "config.json")) as f:
        hf = json.load(f)
    assert (hf["model_type"], hf["dtype"], "quantization_config" in hf, "auto_map" in hf) == \
        ("deepseek_v3", "bfloat16", False, False)
    with safe_open(os.path.join(out, "model.safetensors"), "np") as f:
        written = f.get_tensor(name)
    assert written.dtype.name == "bfloat16" and np.array_equal(
        written, want.astype(written.dtype))
    assert not any(k.endswith("_scale_inv") for k in tensors(out))


# DeepSeek-V3's released config.json (fields that matter), as on the hub.
DEEPSEEK_V3 = dict(
    architectures=["DeepseekV3ForCausalLM"], attention_bias=False, first_k_dense_replace=3,
    hidden_act="silu", hidden_size=7168, intermediate_size=18432, kv_lora_rank=512,
    max_position_embeddings=163840, model_type="deepseek_v3", moe_intermediate_size=2048,
    moe_layer_freq=1, n_group=8, n_routed_experts=256, n_shared_experts=1, norm_topk_prob=True,
    num_attention_heads=128, num_experts_per_tok=8, num_hidden_layers=61,
    num_key_value_heads=128, num_nextn_predict_layers=1, q_lora_rank=1536, qk_nope_head_dim=128,
    qk_rope_head_dim=64, rms_norm_eps=1e-06, rope_theta=10000,
    rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                  "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                  "type": "yarn"},
    routed_scaling_factor=2.5, scoring_func="sigmoid", tie_word_embeddings=False, topk_group=4,
    topk_method="noaux_tc", torch_dtype="bfloat16", v_head_dim=128, vocab_size=129280,
    quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                         "weight_block_size": [128, 128]})


def test_released_and_kimi_configs_read():
    m = maps.model_config(DEEPSEEK_V3)
    assert {k: m[k] for k in ("num_layers", "first_dense_layers", "num_experts", "top_k",
                              "n_group", "topk_group", "q_lora_rank", "head_dim", "mtp_layers",
                              "rope_scaling", "rope_factor", "rope_original_max_len",
                              "rope_beta_fast", "rope_theta", "max_seq_len")} == dict(
        num_layers=61, first_dense_layers=3, num_experts=256, top_k=8, n_group=8, topk_group=4,
        q_lora_rank=1536, head_dim=192, mtp_layers=1, rope_scaling="yarn", rope_factor=40.0,
        rope_original_max_len=4096, rope_beta_fast=32.0, rope_theta=10000.0,
        max_seq_len=163840)
    with open(os.path.join(FIXTURES, "kimi_k2", "config.json")) as f:
        kimi = json.load(f)
    assert kimi["model_type"] == "kimi_k2" and kimi["rope_scaling"]["type"] == "yarn"
    m = maps.model_config(kimi)
    assert {k: m[k] for k in ("rope_beta_fast", "rope_beta_slow", "rope_factor", "rope_theta",
                              "n_group", "routed_scaling_factor", "mtp_layers", "top_k")} == \
        dict(rope_beta_fast=1.0, rope_beta_slow=1.0, rope_factor=8.0, rope_theta=50000.0,
             n_group=1, routed_scaling_factor=2.827, mtp_layers=0, top_k=4)


@pytest.mark.parametrize("edit,message", [
    (dict(scoring_func="softmax"), "scoring_func='softmax': not supported for "
     "DeepseekV3ForCausalLM; allowed: sigmoid"),
    (dict(topk_method="greedy"), "topk_method='greedy'.*allowed: noaux_tc"),
    (dict(rope_scaling={"type": "longrope", "factor": 4.0}),
     "rope_scaling.rope_type='longrope'.*allowed: default or yarn"),
    (dict(attention_bias=True), "attention_bias=True.*allowed: false"),
    (dict(num_key_value_heads=2), "num_key_value_heads=2.*allowed: 4"),
    (dict(moe_layer_freq=2), "moe_layer_freq=2"),
    (dict(first_k_dense_replace=3), "first_k_dense_replace=3.*< num_hidden_layers=3"),
])
def test_configs_moejax_cannot_compute_are_refused_in_one_line(edit, message):
    with open(os.path.join(FIXTURES, "kimi_k2", "config.json")) as f:
        hf = json.load(f)
    hf.update(edit)
    with pytest.raises(ConfigError, match=message) as e:
        maps.model_config(hf)
    assert "\n" not in str(e.value)


def broken_copy(tmp_path, name, edit_config=None, edit_tensors=None):
    src = str(tmp_path / "src")
    shutil.copytree(os.path.join(FIXTURES, name), src)
    if edit_config:
        with open(os.path.join(src, "config.json")) as f:
            hf = json.load(f)
        edit_config(hf)
        with open(os.path.join(src, "config.json"), "w") as f:
            json.dump(hf, f)
    if edit_tensors:
        from safetensors.numpy import save_file

        t = tensors(src)
        edit_tensors(t)
        save_file(t, os.path.join(src, "model.safetensors"))
    return src


def test_a_changed_mtp_copy_is_refused(tmp_path):
    def edit(t):
        t["model.layers.3.shared_head.head.weight"] = t["model.layers.3.shared_head.head.weight"]\
            .copy()
        t["model.layers.3.shared_head.head.weight"][5, 3] += 1

    src = broken_copy(tmp_path, "deepseek_v3", edit_tensors=edit)
    with pytest.raises(ConfigError, match="tensor model.layers.3.shared_head.head.weight "
                       "differs from lm_head.weight") as e:
        convert.from_hf(src, str(tmp_path / "run"), {"data": 1})
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("qc,message", [
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [8, 8]},
     "quantization_config.fmt='e5m2': not supported; allowed: e4m3"),
    ({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 8]},
     r"weight_scale_inv is \[.*\], and weight_block_size \[16, 8\] over"),
])
def test_bad_fp8_checkpoints_are_refused_in_one_line(tmp_path, qc, message):
    src = broken_copy(tmp_path, "kimi_k2", edit_config=lambda c: c.update(quantization_config=qc))
    with pytest.raises(ConfigError, match=message) as e:
        convert.from_hf(src, str(tmp_path / "run"), {"data": 1})
    assert "\n" not in str(e.value)


def test_to_hf_refuses_what_deepseek_v3_cannot_compute():
    from configs import tiny

    config = tiny.get_config("smoke")
    config.model.update(attention="mla", kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
                        v_head_dim=8, num_shared_experts=1)
    with pytest.raises(ConfigError, match="model.router_score='softmax': DeepseekV3ForCausalLM "
                       "cannot compute it; allowed: sigmoid"):
        maps.hf_config(config, "float32", None)
    config.model.update(router_score="sigmoid", rope_scaling="yarn", n_group=2, topk_group=1,
                        routed_scaling_factor=2.5)
    assert maps.hf_config(config, "float32", None)["rope_parameters"]["rope_type"] == "yarn"
    config.model.update(attention="gqa", router_score="softmax", rope_scaling="none",
                        n_group=1, topk_group=1, routed_scaling_factor=1.0, mtp_layers=1,
                        num_shared_experts=0, renormalize=True)
    with pytest.raises(ConfigError, match="model.mtp_layers=1: MixtralForCausalLM cannot"):
        maps.hf_config(config, "float32", None)


def test_a_kimi_tiktoken_folder_without_tokenizer_json_is_refused(tmp_path):
    src = str(tmp_path / "src")
    os.makedirs(src)
    open(os.path.join(src, "tiktoken.model"), "w").close()
    with pytest.raises(ConfigError, match="its tokenizer is tiktoken.model without "
                       "tokenizer.json"):
        files.tokenizer_of(src, str(tmp_path / "hf"))
