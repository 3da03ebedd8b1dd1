"""Router state through Hugging Face (issue 34, item 4): a Qwen3-MoE-shaped run trained with
auxiliary-loss-free balancing goes to-hf and back with its selection bias and bias_rate
(moejax_router.safetensors / .json beside the model files), and training goes on the same;
without those files the bias is gone and the losses differ."""

import contextlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from moejax import convert, parallel
from moejax.config_lib import ConfigError
from moejax.hf.fields import ROUTER_FILE, ROUTER_JSON
from moejax.run import state
from moejax.run.checkpoint import Checkpoints, path_name, restore_params, run_checkpoints
from tests.test_train import smoke

STEPS_BEFORE, STEPS_AFTER = 4, 3
# Model keys a Qwen3-MoE config.json does not carry that change nothing here: no dense FFN
# layer (dense_d_ff), no eval (eval_capacity_factor).
UNUSED = {"dense_d_ff", "eval_capacity_factor"}


def config():
    """The smoke model as Qwen3-MoE computes it (per-head q/k norms, renormalized top-k,
    dropless, no jitter), with the bias of auxiliary-loss-free balancing moving fast."""
    c = smoke(**{"model.vocab_size": 257})
    c.model.update(qk_norm="head", renormalize=True, dispatch="dropless", jitter_eps=0.0,
                   num_kv_heads=2, bias_rate=0.05)
    return c


def batches(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    c = config()
    return [rng.integers(0, 257, (c.data.batch_size, c.data.seq_len + 1)).astype(np.int32)
            for _ in range(n)]


def train(s, step_fn, params, data, first_step: int):
    """(losses, params) after one step per batch of `data` from `params`, a fresh AdamW."""
    opt = jax.jit(s.tx.init, out_shardings=s.shardings["opt_state"])(params)
    train_state, losses = {"params": params, "opt_state": opt}, []
    for i, batch in enumerate(data):
        train_state, metrics = step_fn(train_state, batch, jnp.int32(first_step + i))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(train_state["params"])


def named(params) -> dict:
    flat, _ = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda v: isinstance(v, nnx.Variable))
    return {path_name(p): np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v)
            for p, v in flat}


def imported_params(workdir: str):
    """(model config, parameters) of a from-hf run, restored onto one device."""
    with open(os.path.join(workdir, "config.json")) as f:
        c = config()
        c.model.update(json.load(f)["model"])
    s = state.setup(c, parallel.make_mesh({}))
    with contextlib.closing(run_checkpoints(workdir, "workdir")) as mgr:
        return c.model, restore_params(mgr, mgr.latest_step(), s.abstract["params"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A trained run (router bias nonzero), its to-hf export, the setup and step program."""
    root = tmp_path_factory.mktemp("bias")
    s = state.setup(config(), parallel.make_mesh({}))
    step_fn = state.train_step_fn(s)
    train_state = state.init(s)
    for i, batch in enumerate(batches(STEPS_BEFORE, 0)):
        train_state, _ = step_fn(train_state, batch, jnp.int32(i))
    run = str(root / "run")
    with contextlib.closing(Checkpoints(run, 1, False)) as ckpt:
        ckpt.save(STEPS_BEFORE, train_state, {"step": STEPS_BEFORE, "tokens_seen": 0})
    with open(os.path.join(run, "config.json"), "w") as f:
        f.write(config().to_json_best_effort())
    convert.to_hf(run, str(root / "out"))
    return root, s, step_fn, jax.device_get(train_state["params"])


def test_router_bias_round_trip_trains_the_same(exported, capsys):
    root, s, step_fn, original = exported
    out = root / "out"
    with safe_open(str(out / ROUTER_FILE), "np") as f:
        bias = {k: f.get_tensor(k) for k in f.keys()}
    assert sorted(bias) == [f"model.layers.{i}.mlp.gate.moejax_bias" for i in range(2)]
    want = named(original)["stacks.0.blocks.0.ffn.router_bias"]  # [layers, E]
    assert np.abs(want).max() > 0.05  # the balancing moved it
    for i in range(2):
        np.testing.assert_array_equal(bias[f"model.layers.{i}.mlp.gate.moejax_bias"], want[i])
    with open(out / ROUTER_JSON) as f:
        assert json.load(f) == {"bias_rate": 0.05, "router_score": "softmax"}

    convert.from_hf(str(out), str(root / "imported"), {"fsdp": 2, "expert": 4})
    assert "router state from moejax_router.json: bias_rate 0.05, each MoE layer's " \
           "selection bias from moejax_router.safetensors" in capsys.readouterr().out
    model, params = imported_params(str(root / "imported"))
    assert {k for k in model if model[k] != config().model[k]} <= UNUSED
    got, ref = named(params), named(original)
    assert got.keys() == ref.keys()
    for k in ref:  # float32 export: every bit, the router bias included
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)

    data = batches(STEPS_AFTER, 1)
    ref_losses, ref_after = train(s, step_fn, original, data, STEPS_BEFORE)
    got_losses, got_after = train(s, step_fn, params, data, STEPS_BEFORE)
    assert got_losses == ref_losses
    got_after, ref_after = named(got_after), named(ref_after)
    for k in ref_after:
        np.testing.assert_array_equal(got_after[k], ref_after[k], err_msg=k)

    # Negative control: the same export without the two files imports without the bias
    # (bias_rate 0, no router_bias); its weights with the bias zeroed train otherwise.
    bare = root / "bare"
    shutil.copytree(out, bare)
    os.remove(bare / ROUTER_FILE)
    os.remove(bare / ROUTER_JSON)
    convert.from_hf(str(bare), str(root / "bare_run"))
    model, bare_params = imported_params(str(root / "bare_run"))
    bare_named = named(bare_params)
    assert model.bias_rate == 0.0 and not any("router_bias" in k for k in bare_named)

    def fill(path, v):
        name = path_name(path)
        value = bare_named.get(name, np.zeros(v.shape, v.dtype))
        return v.replace(jax.device_put(value, v.get_value().sharding))

    zeroed = jax.tree_util.tree_map_with_path(
        fill, jax.device_put(original), is_leaf=lambda v: isinstance(v, nnx.Variable))
    bare_losses, _ = train(s, step_fn, zeroed, data, STEPS_BEFORE)
    print(f"losses after the round trip {got_losses}, the original's {ref_losses}, "
          f"without the router files {bare_losses}")
    assert all(abs(a - b) > 1e-6 for a, b in zip(bare_losses, ref_losses, strict=True))


@pytest.mark.parametrize("edit,message", [
    (lambda d: os.remove(d / ROUTER_JSON),
     f"{ROUTER_FILE} without {ROUTER_JSON} (the bias_rate that moves its bias)"),
    (lambda d: (d / ROUTER_JSON).write_text('{"bias_rate": 0.05, "router_score": "sigmoid"}'),
     "router_score='sigmoid': config.json's architecture routes by softmax; allowed: softmax"),
    (lambda d: (d / ROUTER_JSON).write_text('{"bias_rate": -1, "router_score": "softmax"}'),
     "bias_rate=-1: not a finite number >= 0"),
    (lambda d: os.remove(d / ROUTER_FILE),
     "tensor model.layers.0.mlp.gate.moejax_bias (for stacks.0.blocks.0.ffn.router_bias) "
     "is missing"),
])
def test_broken_router_files_are_one_line(exported, tmp_path, edit, message):
    src = tmp_path / "src"
    shutil.copytree(exported[0] / "out", src)
    edit(src)
    with pytest.raises(ConfigError) as e:
        convert.from_hf(str(src), str(tmp_path / "run"))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "run")


def test_router_bias_survives_a_quantized_export(exported, tmp_path):
    """--quantize int8: the experts are quantized, the bias still goes float32 to its file."""
    root, _, _, original = exported
    convert.to_hf(str(root / "run"), str(tmp_path / "q"), quantize="int8")
    convert.from_hf(str(tmp_path / "q"), str(tmp_path / "imported"))
    model, params = imported_params(str(tmp_path / "imported"))
    assert model.bias_rate == 0.05
    name = "stacks.0.blocks.0.ffn.router_bias"
    np.testing.assert_array_equal(named(params)[name], named(original)[name])
