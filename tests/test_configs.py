"""Every shipped config builds (abstractly), is self-contained and is what its docstring says."""

import ast
import functools
import importlib.util
import math
from pathlib import Path

import pytest
from flax import nnx

from moejax import config_lib
from moejax.model.transformer import Transformer
from moejax.run.params import param_counts
from moejax.run.workdir import flat

CONFIGS = Path(__file__).parent.parent / "configs"
NAMES = sorted(p.stem for p in CONFIGS.glob("*.py"))
# Variants a file accepts beyond those its unknown-variant error lists.
COMBINED = {"switch_scaling": ["dense,smoke", "e2,smoke", "e4,smoke", "e8,smoke", "e16,smoke"]}
# Smoke variants trained by the slow test; every other file's trains in the fast suite.
SLOW_SMOKE = ["mixtral_8x7b", "qwen3_30b_a3b", "deepseek_v3", "kimi_k2", "glm45_air",
              "gpt_oss_20b", "gpt_oss_120b", "llama4_maverick"]
# Files whose smoke model is another file's (the same architecture at another size): the
# other's training covers it; test_same_smoke_model checks the two stay equal.
SAME_SMOKE = {"qwen3_235b_a22b": "qwen3_30b_a3b"}
# Architecture features a smoke variant keeps from its file's default (only sizes change).
FEATURES = ("activation", "qk_norm", "qkv_bias", "tie_embeddings", "moe_every", "renormalize",
            "jitter_eps", "dispatch", "router_score", "routing", "bias_rate",
            "num_shared_experts", "shared_gate", "attention", "mtp_layers", "rope_scaling",
            "rope_fraction", "rope_truncate", "full_attention_every", "attention_sinks",
            "out_bias", "moe_bias", "swiglu_limit")


@functools.cache
def load(name):
    """configs/<name>.py, loaded by path as `--config configs/<name>.py` does."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def allowed(name):
    """The variants configs/<name>.py names in its unknown-variant error."""
    with pytest.raises(ValueError, match="; allowed: ") as error:
        load(name).get_config("nosuch")
    return str(error.value).split("; allowed: ")[1].split(", ")


def variants(name):
    return [None, *allowed(name), *COMBINED.get(name, [])]


def declared_keys(name):
    """The dotted keys of the config_dict(...) call in configs/<name>.py, in source order."""
    tree = ast.parse((CONFIGS / f"{name}.py").read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and getattr(node.func, "id", None) == "config_dict"]
    assert len(calls) == 1, f"configs/{name}.py: {len(calls)} config_dict(...) calls; want 1"
    keys = []
    for group in calls[0].keywords:
        if isinstance(group.value, ast.Call):  # model=dict(...)
            keys += [f"{group.arg}.{key.arg}" for key in group.value.keywords]
        else:
            keys.append(group.arg)
    return keys


def counts(config, vocab):
    config.model.vocab_size = vocab
    model = nnx.eval_shape(lambda: Transformer(config.model, mesh=None, rngs=nnx.Rngs(0)))
    return param_counts(model, config.model.top_k, config.model.num_experts)


def test_deepseek_v3_without_mtp_is_the_published_671b_with_37b_active():
    config = load("deepseek_v3").get_config()
    config.model.mtp_layers = 0
    c = counts(config, 129280)
    assert 670.5e9 < c["total"] < 671.5e9 and 37.0e9 < c["active"] < 38.0e9, c


@pytest.mark.parametrize("name,vocab,total,active", [
    ("tiny", 257, (3e6, 4e6), (0.9e6, 1.3e6)),
    ("switch_base", 32128, (3.5e9, 4.0e9), (0.12e9, 0.17e9)),
    ("mixtral_small", 32000, (0.5e9, 0.6e9), (0.18e9, 0.22e9)),
    ("moe_1b", 50257, (0.95e9, 1.15e9), (0.35e9, 0.42e9)),
    # Published: Mixtral-8x7B 46.7B / 12.9B, Qwen3-30B-A3B 30.5B / 3.3B.
    ("mixtral_8x7b", 32000, (46.6e9, 46.8e9), (12.8e9, 13.0e9)),
    ("qwen3_30b_a3b", 151936, (30.4e9, 30.6e9), (3.2e9, 3.4e9)),
    # Qwen3-235B-A22B: 235B / 22B (its model card).
    ("qwen3_235b_a22b", 151936, (234.5e9, 235.5e9), (22.0e9, 22.4e9)),
    # Llama-4-Maverick: "17B active, 400B total" (Meta's model card).
    ("llama4_maverick", 202048, (399.5e9, 401.5e9), (16.9e9, 17.4e9)),
    # DeepSeek-V3 with its MTP module: 671.0B + 11.6B, the module sharing the embedding and
    # the head, of which the released checkpoint holds copies (+ 1.9B: the hub's "685B").
    ("deepseek_v3", 129280, (682.0e9, 683.0e9), (38.0e9, 38.5e9)),
    # Kimi K2, published "1.04T total, 32B activated": ours counts 1.026T / 32.9B from the
    # released config.json's shapes (within 1.5% and 3% of those round figures).
    ("kimi_k2", 163840, (1.0244e12, 1.0556e12), (32e9, 32.96e9)),
])
def test_config_sizes(name, vocab, total, active):
    config = load(name).get_config()
    c = counts(config, vocab)
    assert total[0] < c["total"] < total[1], c
    assert active[0] < c["active"] < active[1], c


@pytest.mark.parametrize("name", NAMES)
def test_every_variant_has_exactly_the_keys_of_tiny(name):
    want = set(flat(load("tiny").get_config().to_dict()))
    for variant in variants(name):
        got = set(flat(load(name).get_config(variant).to_dict()))
        assert not want - got, f"configs/{name}.py:{variant} lacks {sorted(want - got)}"
        assert not got - want, f"configs/{name}.py:{variant} has extra {sorted(got - want)}"


@pytest.mark.parametrize("name", NAMES)
def test_config_files_are_self_contained(name):
    """No config imports another (an inheritance chain); each declares every key itself, in
    configs/tiny.py's order, so the files read alike."""
    for node in ast.walk(ast.parse((CONFIGS / f"{name}.py").read_text())):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"configs/{name}.py:{node.lineno}: a relative import"
            modules = [node.module]
        else:
            continue
        for module in modules:
            assert module.split(".")[0] != "configs", f"configs/{name}.py imports {module}"
    assert declared_keys(name) == declared_keys("tiny")


@pytest.mark.parametrize("name", NAMES)
def test_smoke_variant_applies_and_is_small(name):
    default, smoke = load(name).get_config(), load(name).get_config("smoke")
    assert smoke.to_dict() != default.to_dict(), f"configs/{name}.py ignores :smoke"
    m, d = smoke.model, smoke.data
    for key in FEATURES:
        assert m[key] == default.model[key], f"configs/{name}.py:smoke changes model.{key}"
    for key in ("num_experts", "first_dense_layers", "num_kv_heads", "dense_d_ff"):
        assert bool(m[key]) == bool(default.model[key]), f"model.{key}"
    assert m.d_model <= 64 and 2 <= m.num_layers <= 4 and m.num_experts <= 16
    assert m.vocab_size == 0 and m.dtype == "float32"
    assert (d.source, d.tokenizer, d.streaming, d.seq_len, d.batch_size) == (
        "stdlib", "byte", False, 32, 16)
    assert smoke.mesh.to_dict() == dict(data=-1, fsdp=1, expert=1, context=1, tensor=1)
    assert smoke.train.steps <= 8 and smoke.train.eval_batches <= 2
    assert counts(smoke, 257)["total"] < 2e6


@pytest.mark.parametrize("name", NAMES)
def test_unknown_variant_names_the_allowed_ones(name):
    with pytest.raises(ValueError, match="unknown variant 'nosuch'; allowed: .*smoke"):
        load(name).get_config("nosuch")  # every name it lists loads: the test of the keys


def test_unknown_tiny_variant_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: dense, smoke$"):
        load("tiny").get_config("smok")


def test_switch_scaling_smoke_alone_is_e8():
    scaling = load("switch_scaling")
    assert scaling.get_config("smoke").to_dict() == scaling.get_config("e8,smoke").to_dict()
    assert scaling.get_config().to_dict() == scaling.get_config("e8").to_dict()
    assert scaling.get_config("e4,smoke").model.num_experts == 4
    with pytest.raises(ValueError, match="allowed: smoke"):
        scaling.get_config("e4,big")


def test_dense_variant_matches_active_flops():
    tiny = load("tiny")
    moe, dense = counts(tiny.get_config(), 257), counts(tiny.get_config("dense"), 257)
    router = 4 * 128 * 8
    assert dense["total"] == dense["active"] == moe["active"] - router


def test_validate_names_the_key():
    config = load("tiny").get_config()
    config.model.top_k = 9
    with pytest.raises(config_lib.ConfigError, match=r"model.top_k=9: must be in 1..num_experts=8"):
        config_lib.validate(config, 8)


def train_smoke(name, workdir, one_device=False):
    from moejax.train import train_and_evaluate

    config = load(name).get_config("smoke")
    if one_device:
        config.mesh.data = 1
    # Evaluated at the first and last step and saved at the last: the losses compared, and a
    # checkpoint of the architecture (the loop's periodic ones: tests/test_train.py).
    config.train.update(eval_every=100, ckpt_every=100)
    out = train_and_evaluate(config, workdir)
    first, last = out["eval_loss"][0], out["eval_loss"][config.train.steps]
    assert math.isfinite(last) and last < first, out["eval_loss"]


# tiny:smoke on its own mesh (all 8 devices: the program tests/test_train.py's runs compile);
# the other files' on one device: that an architecture trains does not depend on the layout
# (data parallelism and the MoE layer on every mesh: test_train.py, test_layer.py), and the
# steps, evaluations and saves of a run on the 8 simulated devices take longer.
@pytest.mark.parametrize("name", [n for n in NAMES if n not in SLOW_SMOKE + [*SAME_SMOKE]])
def test_smoke_variants_train(name, tmp_path):
    train_smoke(name, str(tmp_path), one_device=name != "tiny")


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_SMOKE)
def test_real_model_smoke_variants_train(name, tmp_path):
    train_smoke(name, str(tmp_path))


@pytest.mark.parametrize("name,twin", SAME_SMOKE.items())
def test_same_smoke_model(name, twin):
    assert load(name).get_config("smoke").to_dict() == load(twin).get_config("smoke").to_dict()


@pytest.mark.parametrize("name,total,active", [
    ("gpt_oss_20b", 20.91e9, 3.61e9), ("gpt_oss_120b", 116.83e9, 5.13e9)])
def test_gpt_oss_sizes_are_the_model_cards(name, total, active):
    """OpenAI's gpt-oss model card (its table to 0.01B): total parameters, and active ones
    counting the unembedding but not the embedding lookup; ours counts both tables as
    active, 201,088 x 2,880 = 0.58B more."""
    c = counts(load(name).get_config(), 201088)
    assert abs(c["total"] - total) < 0.006e9, c
    assert abs(c["active"] - 201088 * 2880 - active) < 0.006e9, c
