"""gpt-oss's model on every layout: sinks, alternating sliding windows, q/k/v and output
biases, YaRN without truncation, router and expert biases and the clamped SwiGLU together
(configs/gpt_oss_20b.py:smoke, its biases and sinks drawn nonzero), on packed documents
longer than the window: the loss and every gradient as on one device."""

import functools

import jax
import numpy as np
import pytest

from configs import gpt_oss_20b
from moejax import parallel
from moejax.run import state
from moejax.run.checkpoint import path_name
from tests.test_attention import documents

DRAWN = ("sinks", "q_bias", "kv_bias", "out_bias", "router_logit_bias", "in_bias")


@functools.cache
def model_setup():
    config = gpt_oss_20b.get_config("smoke")
    config.model.update(vocab_size=64, num_layers=4, num_experts=8, top_k=2,
                        sliding_window=6, dispatch="dropless")
    config.train.update(balance_coef=1e-2, z_coef=1e-3)
    segments = documents(8, 33, seed=2)
    tokens = np.random.default_rng(2).integers(0, 63, segments.shape).astype(np.int32)
    batch = {"tokens": tokens, "segments": segments,
             "loss_mask": (segments > 0).astype(np.int32)}
    return config, batch


def drawn(params):
    """The zero-initialized biases and sinks, and the output bias too, drawn from N(0, 1)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    keys = iter(jax.random.split(jax.random.key(5), len(leaves)))

    def draw(path, x):
        key = next(keys)
        name = path_name(path)
        if name.rsplit(".", 1)[-1] in DRAWN or name.endswith("ffn.out_bias"):
            return jax.random.normal(key, x.shape, x.dtype).astype(x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(draw, params)


def loss_and_grads(sizes, dispatch="dropless"):
    config, batch = model_setup()
    config = config.copy_and_resolve_references()
    config.model.dispatch = dispatch
    config.mesh.update({**dict(data=1, fsdp=1), **sizes})
    mesh = parallel.make_mesh(parallel.mesh_sizes(config.mesh, jax.device_count()))
    s = state.setup(config, mesh)
    params = jax.jit(drawn, out_shardings=s.shardings["params"])(state.init(s)["params"])

    def fn(params, batch):
        return jax.value_and_grad(state.loss_fn, has_aux=True)(params, s.graphdef, batch,
                                                                None, config.train)

    batch = jax.device_put(batch, parallel.token_sharding(mesh))
    (loss, _), grads = jax.jit(fn)(params, batch)
    return float(loss), {path_name(p): np.asarray(g)
                         for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}


@functools.cache
def reference():
    return loss_and_grads({})


def check(sizes, dispatch="dropless"):
    want_loss, want = reference()
    loss, got = loss_and_grads(sizes, dispatch)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=2e-6, rtol=1e-4, err_msg=name)


def test_every_feature_has_a_gradient():
    _, grads = reference()
    for suffix in ("attn.sinks", "attn.q_bias", "attn.out_bias", "ffn.router_logit_bias",
                   "ffn.in_bias", "ffn.out_bias"):
        found = [n for n in grads if n.endswith(suffix)]
        assert found and all(np.abs(grads[n]).max() > 1e-6 for n in found), suffix


def test_fsdp_expert_tensor_matches_one_device():
    check({"fsdp": 2, "expert": 2, "tensor": 2})


@pytest.mark.slow
@pytest.mark.parametrize("sizes,dispatch", [
    ({"expert": 8}, "dropless"),
    ({"data": 2, "tensor": 4}, "dropless"),
    ({"context": 2, "tensor": 2, "expert": 2}, "dropless"),
    ({"fsdp": 4, "context": 2}, "dropless_ring"),
    ({"fsdp": 2, "expert": 4}, "dropless_ring"),
], ids=lambda v: "x".join(f"{a}{n}" for a, n in v.items()) if isinstance(v, dict) else v)
def test_layouts_match_one_device(sizes, dispatch):
    check(sizes, dispatch)
