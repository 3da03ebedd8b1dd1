"""Sliding windows of the architectures already imported (issue 35, item 5): config.json's
window becomes model.sliding_window, as transformers 5 reads it, and goes back out; the
models' logits against transformers' on windowed fixtures are in tests/test_convert.py."""

import json
import os
import shutil

import pytest

from moejax.config_lib import ConfigError, defaults
from moejax.hf import convert
from moejax.hf.maps import hf_config, model_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")


def fixture_config(name: str, **changes) -> dict:
    with open(os.path.join(FIXTURES, name, "config.json")) as f:
        return {**json.load(f), **changes}


@pytest.mark.parametrize("name,changes,window", [
    ("mixtral", {"sliding_window": None}, 0),
    ("mixtral", {"sliding_window": 6}, 6),
    ("mixtral", {"sliding_window": 128}, 0),  # max_position_embeddings: no sequence exceeds it
    ("qwen3_moe_top2", {"sliding_window": 6, "use_sliding_window": False}, 0),
    ("qwen3_moe_top2", {"sliding_window": 6, "use_sliding_window": True}, 6),
    # Qwen2-MoE windows only the layers layer_types names; all of them here.
    ("qwen2_moe", {"sliding_window": 6, "use_sliding_window": True,
                   "layer_types": ["sliding_attention"] * 2}, 6),
    ("qwen2_moe", {"sliding_window": 6, "use_sliding_window": False}, 0),
    ("olmoe", {"sliding_window": 6}, 0),  # OLMoE has no window
])
def test_window_from_config_json(name, changes, window):
    ours = model_config(fixture_config(name, **changes))
    assert ours["sliding_window"] == window
    assert ours["max_seq_len"] == 128  # the positions, never capped at the window


def test_some_layers_windowed_is_refused_in_one_line():
    # transformers' default layer_types for Qwen2-MoE (a config.json that writes none): every
    # other layer below max_window_layers
    hf = fixture_config("qwen2_moe", sliding_window=6, use_sliding_window=True,
                        max_window_layers=28, layer_types=None)
    with pytest.raises(ConfigError, match="^config.json layer_types=None: not supported for "
                       "Qwen2MoeForCausalLM; allowed: every layer sliding_attention, or every "
                       r"layer full_attention \(one window for all layers\)$"):
        model_config(hf)


@pytest.mark.parametrize("name,written", [
    ("mixtral", {"sliding_window": 6}),
    ("qwen3_moe_top2", {"sliding_window": 6, "use_sliding_window": True}),
    ("qwen2_moe", {"sliding_window": 6, "use_sliding_window": True,
                   "layer_types": ["sliding_attention"] * 2}),
])
def test_window_goes_back_out_and_in(name, written):
    hf = fixture_config(name, **written)
    config = defaults()
    config.model.update(model_config(hf))
    out = hf_config(config, "float32", None)
    assert {k: out[k] for k in written} == written
    assert model_config(out)["sliding_window"] == 6
    config.model.sliding_window = 0
    out = hf_config(config, "float32", hf)  # an import's config.json had a window: gone
    assert model_config(out)["sliding_window"] == 0 and out["sliding_window"] is None


def test_olmoe_with_a_window_is_not_exported():
    config = defaults()
    config.model.update(model_config(fixture_config("olmoe")))
    config.model.sliding_window = 6
    with pytest.raises(ConfigError, match="sliding_window=6.*allowed: 0 for OLMoE"):
        hf_config(config, "float32", None)


def test_short_positions_set_the_default_sequence_length(tmp_path):
    """A model whose positions end before the default data.seq_len imports with seq_len at
    its max_position_embeddings, instead of an error about a data.seq_len nobody set."""
    src = tmp_path / "src"
    shutil.copytree(os.path.join(FIXTURES, "mixtral"), src)
    hf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**hf, "max_position_embeddings": 16}))
    convert.from_hf(str(src), str(tmp_path / "run"), {"fsdp": 8})
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["seq_len"] == config["model"]["max_seq_len"] == 16
