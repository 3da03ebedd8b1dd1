"""Every shipped config builds (abstractly) and is what its docstring says."""

import importlib

import pytest
from flax import nnx

from moejax import config_lib
from moejax.model import Transformer
from moejax.params import param_counts


def counts(config, vocab):
    config.model.vocab_size = vocab
    model = nnx.eval_shape(lambda: Transformer(config.model, mesh=None, rngs=nnx.Rngs(0)))
    return param_counts(model, config.model.top_k, config.model.num_experts)


@pytest.mark.parametrize("name,vocab,total,active", [
    ("tiny", 257, (3e6, 4e6), (0.9e6, 1.3e6)),
    ("switch_base", 32128, (3.5e9, 4.0e9), (0.12e9, 0.17e9)),
    ("mixtral_small", 32000, (0.5e9, 0.6e9), (0.18e9, 0.22e9)),
    ("moe_1b", 50257, (0.95e9, 1.15e9), (0.35e9, 0.42e9)),
    # Published: Mixtral-8x7B 46.7B / 12.9B, Qwen3-30B-A3B 30.5B / 3.3B, DeepSeek-V3 671B / 37B
    # (ours has grouped-query attention in place of MLA).
    ("mixtral_8x7b", 32000, (46.6e9, 46.8e9), (12.8e9, 13.0e9)),
    ("qwen3_30b_a3b", 151936, (30.4e9, 30.6e9), (3.2e9, 3.4e9)),
    ("deepseek_v3_shaped", 129280, (660e9, 690e9), (36e9, 45e9)),
])
def test_config_sizes(name, vocab, total, active):
    config = importlib.import_module(f"configs.{name}").get_config()
    c = counts(config, vocab)
    assert total[0] < c["total"] < total[1], c
    assert active[0] < c["active"] < active[1], c


def test_unknown_variant_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: dense, smoke"):
        importlib.import_module("configs.tiny").get_config("smok")


def test_dense_variant_matches_active_flops():
    tiny = importlib.import_module("configs.tiny")
    moe, dense = counts(tiny.get_config(), 257), counts(tiny.get_config("dense"), 257)
    router = 4 * 128 * 8
    assert dense["total"] == dense["active"] == moe["active"] - router


def test_validate_names_the_key():
    config = importlib.import_module("configs.tiny").get_config()
    config.model.top_k = 9
    with pytest.raises(config_lib.ConfigError, match=r"model.top_k=9: must be in 1..num_experts=8"):
        config_lib.validate(config, 8)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixtral_8x7b", "qwen3_30b_a3b", "deepseek_v3_shaped"])
def test_real_model_smoke_variants_train(name, tmp_path):
    from moejax.train import train_and_evaluate

    config = importlib.import_module(f"configs.{name}").get_config("smoke")
    out = train_and_evaluate(config, str(tmp_path))
    steps = config.train.steps
    assert out["eval_loss"][steps] < out["eval_loss"][0]
