"""moejax.convert against transformers itself, through the fixtures it made
(tests/fixtures/make_hf_fixtures.py): logits, greedy tokens, the round trip, bad input."""

import contextlib
import glob
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from moejax import convert, parallel
from moejax.config_lib import ConfigError
from moejax.hf import convert as hf_convert, maps
from moejax.run import state
from moejax.run.checkpoint import restore_params, run_checkpoints

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
NAMES = ("mixtral", "qwen3_moe_top2", "qwen3_moe_top4", "olmoe", "qwen2_moe", "mixtral_window",
         "qwen3_moe_window", "glm4_moe", "gpt_oss", "gpt_oss_mxfp4")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> workdir; written from an fsdp=2 x expert=4 layout, so that every device reads
    a slice of each tensor (layers, experts and d_model split)."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name in NAMES:
        out[name] = str(root / name)
        convert.from_hf(os.path.join(FIXTURES, name), out[name], {"fsdp": 2, "expert": 4})
    return out


def load_model(workdir, **model_overrides):
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    config.model.update(model_overrides)
    s = state.setup(config, parallel.make_mesh({}))
    with contextlib.closing(run_checkpoints(workdir, "workdir")) as mgr:
        params = restore_params(mgr, mgr.latest_step(), s.abstract["params"])
    return config, nnx.merge(s.graphdef, params)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("path", ["dropless", "capacity"])
def test_logits_equal_transformers(converted, name, path):
    expected = np.load(os.path.join(FIXTURES, name, "expected.npz"))
    # capacity: one group of all 32 tokens, C = T (nothing can be dropped), the [E, C, d] path
    overrides = ({"dispatch": "dropless"} if path == "dropless" else
                 {"dispatch": "capacity", "num_groups": 1})
    config, model = load_model(converted[name], **overrides)
    logits, aux = model(expected["input_ids"], train=False)
    np.testing.assert_allclose(np.asarray(logits), expected["logits"], atol=1e-4, rtol=0)
    assert float(aux["dropped_frac"].max()) == 0.0


def test_converted_config(converted):
    with open(os.path.join(converted["qwen3_moe_top4"], "config.json")) as f:
        m = json.load(f)["model"]
    assert (m["qk_norm"], m["renormalize"], m["top_k"], m["num_kv_heads"], m["norm_eps"]) == \
        ("head", True, 4, 2, 1e-6)
    with open(os.path.join(converted["mixtral"], "config.json")) as f:
        m = json.load(f)["model"]
    assert (m["qk_norm"], m["renormalize"], m["norm_eps"], m["rope_theta"]) == \
        ("none", True, 1e-5, 1e6)


def tensors(folder):
    out = {}
    for path in glob.glob(os.path.join(folder, "*.safetensors")):
        with safe_open(path, "np") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


# gpt_oss_mxfp4: its experts' MXFP4 values are bfloat16 values, and the fixture holds the
# model of gpt_oss, so its bfloat16 export is gpt_oss's files tensor for tensor.
@pytest.mark.parametrize("name,ref", [("mixtral", "mixtral"), ("olmoe", "olmoe"),
                                      ("qwen2_moe", "qwen2_moe"), ("glm4_moe", "glm4_moe"),
                                      ("gpt_oss", "gpt_oss"), ("gpt_oss_mxfp4", "gpt_oss")])
def test_round_trip_is_byte_identical(converted, name, ref, tmp_path):
    out = str(tmp_path / "out")
    files = convert.to_hf(converted[name], out, shard_gib=60_000 / 2**30)  # ~60 kB files
    assert len(files) > 1 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    ref, got = tensors(os.path.join(FIXTURES, ref)), tensors(out)
    assert got.keys() == ref.keys()
    for k in ref:
        assert (got[k].dtype, got[k].shape) == (ref[k].dtype, ref[k].shape), k
        assert got[k].tobytes() == ref[k].tobytes(), k
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        assert set(json.load(f)["weight_map"]) == set(ref)


def test_to_hf_loads_in_transformers(converted, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for name in ("mixtral", "qwen3_moe_top4", "olmoe", "qwen2_moe"):
        out = str(tmp_path / name)
        convert.to_hf(converted[name], out, dtype="float32")
        model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        expected = np.load(os.path.join(FIXTURES, name, "expected.npz"))
        with torch.no_grad():
            logits = model(torch.tensor(expected["input_ids"]).long()).logits.numpy()
        np.testing.assert_allclose(logits, expected["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("model", [
    dict(qk_norm="all", num_kv_heads=1, renormalize=True, tie_embeddings=True, norm_eps=1e-5),
    dict(num_shared_experts=1, shared_gate=True, qkv_bias=True, moe_every=2),
])
def test_to_hf_of_a_model_made_here(tmp_path, model):
    """A run that never saw transformers: its config.json is built from the moejax config
    (OLMoE with tied embeddings; Qwen2-MoE with a dense layer between MoE layers)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from configs import tiny
    from moejax.run.checkpoint import Checkpoints

    config = tiny.get_config("smoke")
    config.model.update(vocab_size=257, dispatch="dropless", **model)
    s = state.setup(config, parallel.make_mesh({}))
    train_state = state.init(s)
    ckpt = Checkpoints(str(tmp_path / "run"), 1, False)
    ckpt.save(0, train_state, {"step": 0, "tokens_seen": 0})
    ckpt.close()
    with open(tmp_path / "run" / "config.json", "w") as f:
        f.write(config.to_json_best_effort())
    convert.to_hf(str(tmp_path / "run"), str(tmp_path / "out"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"),
                                                           dtype=torch.float32)
    tokens = np.random.default_rng(0).integers(0, 257, (2, 12))
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    ours, _ = nnx.merge(s.graphdef, train_state["params"])(tokens, train=False)
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)


def test_hub_name_goes_through_huggingface_hub(monkeypatch, tmp_path):
    import huggingface_hub

    asked = []

    def download(repo_id, **kwargs):
        asked.append(repo_id)
        return os.path.join(FIXTURES, "olmoe")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert hf_convert.resolve("allenai/OLMoE-1B-7B-0924") == os.path.join(FIXTURES, "olmoe")
    assert asked == ["allenai/OLMoE-1B-7B-0924"]


def broken_copy(tmp_path, edit_config=None, drop=None, add=None):
    """The mixtral fixture with its config edited or a tensor removed / added."""
    src = str(tmp_path / "src")
    shutil.copytree(os.path.join(FIXTURES, "mixtral"), src)
    if edit_config:
        with open(os.path.join(src, "config.json")) as f:
            hf = json.load(f)
        edit_config(hf)
        with open(os.path.join(src, "config.json"), "w") as f:
            json.dump(hf, f)
    if drop or add:
        from safetensors.numpy import save_file

        t = tensors(src)
        t.pop(drop, None)
        if add:
            t[add] = np.zeros(3, np.float32)
        save_file(t, os.path.join(src, "model.safetensors"))
    return src


@pytest.mark.parametrize("case,message", [
    (dict(edit_config=lambda c: c.update(architectures=["GPT2LMHeadModel"])),
     "architectures='GPT2LMHeadModel': unknown; allowed: MixtralForCausalLM"),
    (dict(edit_config=lambda c: c.update(rope_parameters={"rope_type": "yarn",
                                                          "rope_theta": 1e6})),
     "rope_parameters=.*not supported for MixtralForCausalLM; allowed: rope_type default"),
    (dict(edit_config=lambda c: c.update(hidden_act="gelu")), "hidden_act='gelu'"),
    (dict(drop="model.layers.1.block_sparse_moe.experts.7.w3.weight"),
     "tensor model.layers.1.block_sparse_moe.experts.7.w3.weight .for "
     "stacks.0.blocks.0.ffn.w_in. is missing"),
    (dict(add="model.layers.0.self_attn.q_proj.bias"),
     "tensor model.layers.0.self_attn.q_proj.bias has no place in the moejax model"),
    (dict(edit_config=lambda c: c.update(intermediate_size=24)),
     r"experts.0.w1.weight is \[16, 32\], config.json makes it \[24, 32\]"),
])
def test_bad_checkpoints_fail_in_one_line(tmp_path, case, message):
    src = broken_copy(tmp_path, **case)
    with pytest.raises(ConfigError, match=message) as e:
        convert.from_hf(src, str(tmp_path / "run"), {"data": 1})
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "0")
    assert not os.path.exists(tmp_path / "run" / "hf")


def test_from_hf_never_overwrites_a_checkpoint(converted):
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        convert.from_hf(os.path.join(FIXTURES, "olmoe"), converted["mixtral"], {"data": 1})


def test_to_hf_refuses_what_transformers_cannot_compute(tmp_path):
    from configs import tiny

    config = tiny.get_config("smoke")
    config.model.router_score = "sigmoid"
    with pytest.raises(ConfigError, match="model.router_score='sigmoid'.*allowed: softmax"):
        maps.hf_config(config, "float32", None)


# The released config.json files (fields that matter), as on the hub.
MIXTRAL_8X7B = dict(
    architectures=["MixtralForCausalLM"], hidden_act="silu", hidden_size=4096,
    intermediate_size=14336, max_position_embeddings=32768, num_attention_heads=32,
    num_experts_per_tok=2, num_hidden_layers=32, num_key_value_heads=8, num_local_experts=8,
    rms_norm_eps=1e-5, rope_theta=1e6, router_aux_loss_coef=0.02, sliding_window=None,
    tie_word_embeddings=False, torch_dtype="bfloat16", vocab_size=32000)
QWEN3_30B_A3B = dict(
    architectures=["Qwen3MoeForCausalLM"], attention_bias=False, decoder_sparse_step=1,
    head_dim=128, hidden_act="silu", hidden_size=2048, intermediate_size=6144,
    max_position_embeddings=40960, mlp_only_layers=[], moe_intermediate_size=768,
    norm_topk_prob=True, num_attention_heads=32, num_experts=128, num_experts_per_tok=8,
    num_hidden_layers=48, num_key_value_heads=4, rms_norm_eps=1e-6, rope_scaling=None,
    rope_theta=1e6, router_aux_loss_coef=0.001, sliding_window=None,
    tie_word_embeddings=False, torch_dtype="bfloat16", use_sliding_window=False,
    vocab_size=151936)


@pytest.mark.parametrize("hf,ours", [(MIXTRAL_8X7B, "mixtral_8x7b"),
                                     (QWEN3_30B_A3B, "qwen3_30b_a3b")])
def test_released_configs_convert_to_our_model_configs(hf, ours):
    """A released model's config.json gives the model of our config of it, key by key."""
    import importlib

    want = importlib.import_module(f"configs.{ours}").get_config().model
    got = maps.model_config(hf)
    keys = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "d_ff", "num_experts", "top_k", "renormalize", "rope_theta", "norm_eps",
            "qk_norm", "tie_embeddings", "activation")
    assert {k: got[k] for k in keys} == {k: want[k] for k in keys}


def test_tokenizer_travels_with_the_checkpoint(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from moejax.data import text

    src = str(tmp_path / "src")
    shutil.copytree(os.path.join(FIXTURES, "mixtral"), src)
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "hello", "world"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(os.path.join(src, "tokenizer.json"))
    work = str(tmp_path / "run")
    convert.from_hf(src, work, {"data": 1})
    with open(os.path.join(work, "config.json")) as f:
        name = json.load(f)["data"]["tokenizer"]
    assert name == os.path.join(os.path.abspath(work), "hf")
    assert list(text.make_tokenizer(name).encode("hello world")) == [2, 3]
    convert.to_hf(work, str(tmp_path / "out"))
    assert os.path.exists(tmp_path / "out" / "tokenizer.json")


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_equals_transformers(converted, name):
    from moejax import generate

    expected = np.load(os.path.join(FIXTURES, name, "expected.npz"))
    _, model, step = generate.load(converted[name])
    prompts = expected["prompt_ids"].tolist()
    new = generate.generate(model, prompts, 10)
    np.testing.assert_array_equal(np.concatenate([expected["prompt_ids"], new], 1),
                                  expected["greedy_ids"])


def test_a_config_json_from_before_a_key_existed_takes_its_default(tmp_path):
    from configs import tiny
    from moejax import config_lib

    saved = tiny.get_config("smoke").to_dict()
    del saved["model"]["qkv_bias"], saved["model"]["shared_gate"]
    saved["model"]["d_model"] = 48
    with open(tmp_path / "config.json", "w") as f:
        json.dump(saved, f)
    config = config_lib.run_config(str(tmp_path))
    assert (config.model.qkv_bias, config.model.shared_gate, config.model.d_model) == \
        (False, False, 48)
    with pytest.raises(ConfigError, match="no config.json in it"):
        config_lib.run_config(str(tmp_path / "nowhere"))


def test_each_tensor_is_read_once_whatever_the_layout(monkeypatch, tmp_path):
    """8 devices each take a slice of every weight (d_model split over fsdp, experts over
    expert); the host still reads every tensor of the files exactly once."""
    reads = []
    get = hf_convert.Tensors.get
    monkeypatch.setattr(hf_convert.Tensors, "get", lambda self, n: reads.append(n) or get(self, n))
    convert.from_hf(os.path.join(FIXTURES, "olmoe"), str(tmp_path / "run"),
                    {"fsdp": 2, "expert": 4})
    assert sorted(reads) == sorted(tensors(os.path.join(FIXTURES, "olmoe")))
