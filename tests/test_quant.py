"""Quantized training of the matmuls (moejax/moe/quant.py, `model.quantization`): Qwix's ops
against a NumPy fake quantization, the MoE layer's error and its layout invariance, which
matmuls are quantized, a short training run, and the config checks."""

import dataclasses
import math
from collections import Counter

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from configs import tiny
from moejax import config_lib, parallel
from moejax.moe import quant
from moejax.moe.quant import QTYPES
from tests.test_layer import apply, loss_and_grads, make, portable_on_cpu, tokens
from tests.test_precision import dtypes, equations, forward, smoke

FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


def fake_quant(x, axes, name):
    """NumPy: `x` quantized and dequantized with one absmax scale per index of `axes`.

    int8: scale = absmax / 127, q = round(x / scale) (half to even) in [-127, 127].
    fp8: scale = absmax / 448, q = x / scale rounded to float8_e4m3fn. An all-zero slice
    gets scale 1 (and stays zero)."""
    x = np.asarray(x, np.float32)
    reduce = tuple(a for a in range(x.ndim) if a not in axes)
    absmax = np.abs(x).max(axis=reduce, keepdims=True)
    scale = absmax / (127 if name == "int8" else FP8_MAX)
    scale = np.where(scale == 0, 1, scale).astype(np.float32)
    if name == "int8":
        q = np.clip(np.round(x / scale), -127, 127)
    else:
        q = (x / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return q.astype(np.float64) * scale


def normal(key, shape, std=1.0):
    return jax.random.normal(jax.random.key(key), shape) * std


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_batched_matmul_is_numpy_fake_quantization_with_straight_through_grads(name):
    x, w = normal(0, (3, 6, 16)), normal(1, (3, 16, 8), 0.3)
    x = x.at[1, 2].set(0.0)  # an empty capacity slot: zero in, zero out
    ct = normal(2, (3, 6, 8))

    def f(x, w):
        y = quant.einsum("erd,edf->erf", x, w, QTYPES[name])
        return jnp.sum(y * ct), y

    # Jitted: one program, not one per eager op.
    (_, y), (dx, dw) = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(x, w)
    qx, qw = fake_quant(x, (0, 1), name), fake_quant(w, (0, 2), name)  # per row; per expert, column
    np.testing.assert_allclose(y, np.einsum("erd,edf->erf", qx, qw), rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(y)[1, 2])
    exact = np.einsum("erd,edf->erf", np.asarray(x, np.float64), np.asarray(w, np.float64))
    assert np.abs(np.asarray(y) - exact).max() > 1e-3  # the quantization really applies
    # Straight through: the gradients of the matmul of the quantized operands.
    np.testing.assert_allclose(dx, np.einsum("erf,edf->erd", ct, qw), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, np.einsum("erd,erf->edf", qx, ct), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_ragged_matmul_is_numpy_fake_quantization_with_straight_through_grads(name):
    x, w, ct = normal(0, (12, 16)), normal(1, (3, 16, 8), 0.3), normal(2, (12, 8))
    sizes = np.array([5, 0, 6])  # an empty group, and one row past the last group

    def f(x, w):
        y = quant.ragged_dot(x, w, jnp.asarray(sizes), QTYPES[name])
        return jnp.sum(y * ct), y

    (_, y), (dx, dw) = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(x, w)
    qx, qw = fake_quant(x, (0,), name), fake_quant(w, (0, 2), name)
    want_y, want_dx, want_dw = np.zeros((12, 8)), np.zeros((12, 16)), np.zeros((3, 16, 8))
    start = 0
    for g, n in enumerate(sizes):
        rows = slice(start, start + n)
        want_y[rows] = qx[rows] @ qw[g]
        want_dx[rows] = np.asarray(ct)[rows] @ qw[g].T
        want_dw[g] = qx[rows].T @ np.asarray(ct)[rows]
        start += n
    for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_einsum_with_transposed_output_quantizes_per_output_channel():
    x, w = normal(0, (2, 5, 16)), normal(1, (16, 2, 3, 4), 0.3)  # attention's kv projection
    y = quant.einsum("bsd,dkhe->kbshe", x, w, jnp.int8)
    want = np.einsum("bsd,dkhe->kbshe", fake_quant(x, (0, 1), "int8"),
                     fake_quant(w, (1, 2, 3), "int8"))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(quant.einsum("bsd,dkhe->kbshe", x, w),
                                  jnp.einsum("bsd,dkhe->kbshe", x, w))


def quantized(model, name):
    model.cfg = dataclasses.replace(model.cfg, quantization=name)
    return model


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
@pytest.mark.parametrize("name,bound", [("int8", 2e-2), ("fp8", 1e-1)])
def test_quantized_layer_error_is_small_and_nonzero(dispatch, name, bound):
    x = tokens()
    y = apply(make(8, 2, 1.0, dispatch=dispatch), x, train=True)[0]
    yq, aux = apply(quantized(make(8, 2, 1.0, dispatch=dispatch), name), x, train=True)
    error = float(jnp.linalg.norm(yq - y) / jnp.linalg.norm(y))
    assert bound / 20 < error < bound, error  # docs/architecture.md gives the figures
    assert math.isfinite(float(aux["balance_loss"]))


def test_quantized_dropless_equals_quantized_capacity_with_room_for_all():
    """Both paths quantize each token's row and each expert's columns alike."""
    x = tokens()
    capacity = quantized(make(4, 2, 2.0), "int8")
    dropless = quantized(make(4, 2, 2.0, dispatch="dropless"), "int8")
    _, y1, _, (g1, gx1) = loss_and_grads(capacity, x)
    _, y2, _, (g2, gx2) = loss_and_grads(dropless, x)
    np.testing.assert_allclose(y2, y1, atol=1e-5)
    np.testing.assert_allclose(gx2, gx1, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5)


# Data, fsdp and expert splits leave every quantization scale whole. `tensor` would not:
# each rank's share of the hidden units is scaled alone (docs/architecture.md).
QUANT_LAYOUTS = [(2, 1, 4, 1), (1, 2, 4, 1)]
_ONE_DEVICE = {}  # (path, quantization) -> the single-device run both layouts are held to


@pytest.mark.parametrize("path,name", [("capacity", "int8"), ("dropless_ragged", "int8"),
                                       ("dropless_ring", "int8"), ("capacity", "fp8"),
                                       ("dropless_ring", "fp8")])
@pytest.mark.parametrize("layout", QUANT_LAYOUTS, ids=lambda t: "d{}f{}e{}t{}".format(*t))
def test_quantized_layer_is_the_same_on_every_mesh(path, name, layout, monkeypatch):
    dispatch = portable_on_cpu(monkeypatch, path)
    x = tokens()
    if (path, name) not in _ONE_DEVICE:
        _ONE_DEVICE[path, name] = loss_and_grads(
            quantized(make(8, 2, 1.0, dispatch=dispatch), name), x)
    _, y0, aux0, (g0, gx0) = _ONE_DEVICE[path, name]
    mesh = parallel.make_mesh(dict(zip(("data", "fsdp", "expert", "tensor"), layout, strict=True)))
    model = quantized(make(8, 2, 1.0, mesh=mesh, dispatch=dispatch), name)
    xs = jax.device_put(x, parallel.token_sharding(mesh))
    _, y, aux, (g, gx) = loss_and_grads(model, xs)
    np.testing.assert_allclose(y, y0, atol=1e-5)
    np.testing.assert_allclose(aux["balance_loss"], aux0["balance_loss"], atol=1e-5)
    np.testing.assert_allclose(gx, gx0, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_quantize_dense_adds_attention_never_router_embeddings_or_logits(dispatch):
    def int8_dots(**model):
        eqns = equations(forward(smoke(dispatch=dispatch, **model)))
        return Counter(e.outvars[0].aval.shape[-1] for e in eqns
                       if e.primitive.name in ("dot_general", "ragged_dot_general")
                       and dtypes(e)[0] == ("int8", "int8"))

    experts = int8_dots(quantization="int8")
    assert sum(experts.values()) == 2  # w_in and w_out, in the scanned MoE block
    both = int8_dots(quantization="int8", quantize_dense=True)
    assert sum(both.values()) == 5  # and the q, kv and out projections
    num_experts, vocab = tiny.get_config("smoke").model.num_experts, 257
    assert not (both.keys() & {num_experts, vocab})  # the router's and the logits' widths
    assert not int8_dots()


_FINAL_EVAL_LOSS = {}


def final_eval_loss(tmp_path_factory, dtype, quantization, moment_dtype):
    """The smoke run's last held-out loss for this precision setting (each run once). On one
    device: the comparison is between precisions, not layouts (the quantized layer on every
    mesh: test_quantized_layer_is_the_same_on_every_mesh), and the steps, evaluations and
    saves of a run on the 8 simulated devices take longer."""
    from moejax.train import train_and_evaluate

    setting = (dtype, quantization, moment_dtype)
    if setting not in _FINAL_EVAL_LOSS:
        config = tiny.get_config("smoke")
        config.mesh.data = 1
        config.model.update(dtype=dtype, quantization=quantization)
        config.train.moment_dtype = moment_dtype
        # Evaluated at steps 0 and 6 and saved once: the losses compared are all it needs.
        config.train.update(eval_every=100, ckpt_every=100)
        out = train_and_evaluate(config, str(tmp_path_factory.mktemp("run")))
        first, last = out["eval_loss"][0], out["eval_loss"][config.train.steps]
        assert math.isfinite(last) and last < first, out["eval_loss"]
        _FINAL_EVAL_LOSS[setting] = last
    return _FINAL_EVAL_LOSS[setting]


@pytest.mark.parametrize("setting", [("bfloat16", "none", "bfloat16"),
                                     ("bfloat16", "int8", "float32"),
                                     ("bfloat16", "fp8", "float32")], ids=str)
def test_smoke_training_matches_float32(setting, tmp_path_factory):
    """(compute, quantization, first moment): the final held-out loss within 1% of float32's
    (the tiny config's 600 steps: docs/benchmarks.md, "Precision"). bfloat16 compute and a
    bfloat16 first moment are held to it together: either alone off by 1% fails the pair."""
    want = final_eval_loss(tmp_path_factory, "float32", "none", "float32")
    got = final_eval_loss(tmp_path_factory, *setting)
    assert abs(got - want) / want < 0.01, (got, want)


@pytest.mark.parametrize("key,value,message", [
    ("quantization", "int4", r"^model.quantization='int4': unknown; allowed: none, int8, fp8$"),
    ("quantize_dense", True, r"^model.quantize_dense=True: needs model.quantization=int8 or fp8"),
])
def test_quantization_keys_are_validated(key, value, message):
    config = tiny.get_config()
    config.model[key] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config, 8)


def test_fp8_on_this_cpu_says_it_is_upcast_in_one_line():
    from types import SimpleNamespace

    from moejax.run.params import precision_line
    from moejax.run.state import setup

    config = tiny.get_config("smoke")
    config.model.update(vocab_size=257, quantization="fp8")
    line = precision_line(config, setup(config, parallel.make_mesh({})).abstract)
    assert line.splitlines()[1] == (
        "model.quantization=fp8: XLA:CPU has no float8 matmul; it runs the float8_e4m3fn "
        "operands upcast to float32 (fp8's numbers, not its speed)")
    ampere = SimpleNamespace(platform="gpu", compute_capability="8.0")
    assert "needs 8.9+" in quant.backend_note("fp8", ampere)
    hopper = SimpleNamespace(platform="gpu", compute_capability="9.0")
    assert quant.backend_note("fp8", hopper) is None
    assert quant.backend_note("int8", jax.devices()[0]) is None
