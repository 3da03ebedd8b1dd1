"""Context parallelism (moejax/model/context.py, kernels.context_parallel): attention with the
sequence split over mesh axis `context` and documents against a NumPy reference, the balanced
split's equal work, the TPU and CUDA programs as exported from this CPU host, and the whole
model's loss and gradients at context > 1 against context = 1."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from moejax import parallel
from moejax.model import context, kernels
from moejax.run import state
from moejax.run.checkpoint import path_name
from tests.test_attention import documents, numpy_attention

H, HD = 4, 8


def inputs(batch, seq, kv, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seq + kv), 4)
    q, dy = (jax.random.normal(key, (batch, seq, H, HD), dtype) for key in keys[:2])
    k, v = (jax.random.normal(key, (batch, seq, kv, HD), dtype) for key in keys[2:])
    return q, k, v, dy


def check(fn, q, k, v, segments, dy, tol=1e-5):
    y, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, jnp.asarray(segments)), q, k, v)
    got = (y, *vjp(dy))
    want = numpy_attention(q, k, v, dy, segments)
    for name, a, b in zip("y dq dk dv".split(), got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("sizes,kv", [
    ({"context": 4, "tensor": 2}, 2),  # kv heads split over tensor with the query heads
    ({"context": 4, "tensor": 2}, 1),  # one kv head, repeated for the two tensor shards
    ({"context": 2, "fsdp": 2, "expert": 2}, 2),
])
def test_context_parallel_matches_numpy(sizes, kv):
    mesh = parallel.make_mesh(sizes)
    q, k, v, dy = inputs(4, 32, kv)
    fn = jax.jit(lambda q, k, v, s: kernels.causal(q, k, v, mesh, segments=s))
    check(fn, q, k, v, documents(4, 32), dy)
    # The sequence stays split: the queries travel by ppermute, keys by all-gather.
    hlo = fn.lower(q, k, v, jnp.asarray(documents(4, 32))).compile().as_text()
    assert "collective-permute" in hlo and "all-gather" in hlo


def test_without_segments_is_plain_causal():
    mesh = parallel.make_mesh({"context": 4, "data": 2})
    q, k, v, dy = inputs(4, 32, 2)
    check(jax.jit(lambda q, k, v, s: kernels.causal(q, k, v, mesh)), q, k, v,
          np.ones((4, 32), np.int32), dy)


def test_balanced_rows():
    # Device i computes halves i and 2C-1-i of the sequence: with C = 4 and 16 positions,
    # halves of 2.
    np.testing.assert_array_equal(
        context.query_index(16, 4).reshape(4, 4),
        [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]])


@pytest.mark.parametrize("c", [2, 4, 8])
def test_balanced_split_gives_every_device_equal_causal_work(c):
    """Causal (query, key) pairs per device: equal for the balanced rows; the natural split
    gives the last device about 2C-1 times the first's."""
    seq = 64 * c
    keys_seen = context.query_index(seq, c) + 1  # a query sees the keys up to its own
    per_device = keys_seen.reshape(c, -1).sum(1)
    assert (per_device == per_device[0]).all()
    natural = (np.arange(seq) + 1).reshape(c, -1).sum(1)
    assert natural[-1] / natural[0] > 2 * c - 1.5  # (2C-1) as chunks grow
    # The splash kernel's block-sparse grid agrees: as many live blocks on every device.
    kernel = kernels._make_splash(1, seq, 32, interpret=True,
                                  q_index=context.query_index(seq, c), q_shards=c)
    live = (np.asarray(kernel.fwd_mask_info.block_mask[0]) > 0).reshape(c, -1).sum(1)
    assert (live == live[0]).all(), live


@pytest.mark.slow
def test_splash_context_parallel_matches_numpy():
    """The TPU path in Pallas' interpreter: 512 positions over context = 2 is two halves of
    128 rows per device, one block each."""
    mesh = parallel.make_mesh({"context": 2, "tensor": 2, "data": 2})
    q, k, v, dy = inputs(2, 512, 2)
    fn = jax.jit(lambda q, k, v, s: kernels.context_parallel(q, k, v, mesh, segments=s,
                                                            interpret=True))
    check(fn, q, k, v, documents(2, 512), dy, tol=2e-5)


def exported(fn, platform, *args):
    return jax.export.export(jax.jit(fn), platforms=(platform,))(*args).mlir_module()


def test_tpu_and_cuda_export_with_documents():
    mesh = parallel.make_mesh({"context": 2, "data": 2, "tensor": 2})
    q, k, v, _ = inputs(4, 512, 2, jnp.bfloat16)
    segments = jnp.asarray(documents(4, 512))

    def fn(q, k, v, s):
        return kernels.causal(q, k, v, mesh, segments=s)

    def grad(q, k, v, s):
        return jax.grad(lambda *a: jnp.sum(fn(*a, s).astype(jnp.float32)), (0, 1, 2))(q, k, v)

    for platform in ("tpu", "cuda"):
        forward, backward = (exported(f, platform, q, k, v, segments) for f in (fn, grad))
        # 2 ppermutes of q, 2 of the segments, 2 of the output back; k, v, segments gathered.
        assert forward.count("stablehlo.collective_permute") == 6
        assert forward.count("stablehlo.all_gather") == 3
        assert "stablehlo.reduce_scatter" in backward  # dk, dv
        # Splash on TPU only: its forward kernel, then its dq and dkv kernels.
        tpu = platform == "tpu"
        assert forward.count("tpu_custom_call") == tpu
        assert backward.count("tpu_custom_call") == 3 * tpu


MODEL_LAYOUTS = [
    {"context": 2, "expert": 4},
    {"context": 4, "fsdp": 2},
    {"context": 2, "fsdp": 2, "tensor": 2},
    {"context": 8},
]


@functools.cache
def model_setup():
    config = tiny.get_config("smoke")
    config.model.update(vocab_size=64, num_heads=4, num_kv_heads=2, head_dim=8,
                        dispatch="dropless")
    config.train.update(balance_coef=1e-2, z_coef=1e-3)
    segments = documents(8, 33, seed=1)
    tokens = np.random.default_rng(1).integers(0, 63, segments.shape).astype(np.int32)
    batch = {"tokens": tokens, "segments": segments,
             "loss_mask": (segments > 0).astype(np.int32)}
    return config, batch


def loss_and_grads(sizes):
    config, batch = model_setup()
    config = config.copy_and_resolve_references()
    config.mesh.update(data=1, **sizes)
    mesh = parallel.make_mesh(parallel.mesh_sizes(config.mesh, jax.device_count()))
    s = state.setup(config, mesh)
    params = state.init(s)["params"]

    def fn(params, batch):
        return jax.value_and_grad(state.loss_fn, has_aux=True)(params, s.graphdef, batch,
                                                                None, config.train)

    batch = jax.device_put(batch, parallel.token_sharding(mesh))
    compiled = jax.jit(fn).lower(params, batch).compile()
    (loss, _), grads = compiled(params, batch)
    flat = {path_name(p): np.asarray(g)
            for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    return float(loss), flat, compiled.as_text()


@functools.cache
def reference():
    return loss_and_grads({})[:2]


@pytest.mark.slow
@pytest.mark.parametrize("sizes", MODEL_LAYOUTS, ids=lambda s: "x".join(
    f"{a}{n}" for a, n in s.items()))
def test_model_loss_and_grads_match_one_device(sizes):
    """Documents on (four per row, padding), dropless experts, balance and z losses: the
    loss and every gradient as on one device, in float32."""
    want_loss, want = reference()
    loss, got, hlo = loss_and_grads(sizes)
    assert "collective-permute" in hlo  # the balanced attention ran
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, rtol=1e-5, err_msg=name)
