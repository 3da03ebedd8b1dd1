"""Weight-only int8 / int4 experts for inference (moejax/moe/quant.py, `generate --quantize`):
Qwix's quantization against NumPy, the layer against its dequantized weights on one device
and on a mesh, and the error on a trained model's own activations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

from moejax import parallel
from moejax.moe import quant
from moejax.run import params
from tests.test_layer import apply, make, tokens

QMAX = {"int8": 127, "int4": 7}  # the absmax's level (quant.calibration)


def numpy_weight_only(w, name, axis):
    """w quantized then dequantized by hand: absmax scales over groups of the input dim
    `axis` (the whole dim for int8, 128 or its largest shared divisor for int4), q =
    round(w / scale) half to even, in [-127, 127] / [-7, 7]."""
    w = np.moveaxis(np.asarray(w, np.float32), axis, -1)
    dim = w.shape[-1]
    group = dim if name == "int8" else np.gcd(dim, 128)
    g = w.reshape(*w.shape[:-1], dim // group, group)
    scale = np.abs(g).max(-1, keepdims=True) / QMAX[name]
    scale = np.where(scale == 0, 1, scale)
    lo, hi = -QMAX[name], QMAX[name]
    q = np.clip(np.round(g / scale), lo, hi)
    return np.moveaxis((q * scale).reshape(w.shape), -1, axis), q


@pytest.mark.parametrize("name,shape,axis", [("int8", (4, 32, 2, 24), 1),
                                             ("int4", (4, 256, 2, 24), 1),
                                             ("int4", (3, 48, 40), 1)])
def test_quantized_weights_are_numpy_absmax_rounding(name, shape, axis):
    w = jax.random.normal(jax.random.key(0), shape) * 0.1
    qa = quant.quantize_weight(w, name, axis - len(shape))
    want, q = numpy_weight_only(w, name, axis)
    assert qa.qvalue.dtype == quant.WEIGHT_ONLY[name]
    assert qa.qvalue.shape == w.shape
    groups = shape[axis] // (shape[axis] if name == "int8" else np.gcd(shape[axis], 128))
    assert qa.scale.shape == shape[:axis] + (groups,) + shape[axis + 1:]
    np.testing.assert_array_equal(np.moveaxis(np.asarray(qa.qvalue, np.float32), axis, -1)
                                  .reshape(q.shape), q)
    got = np.asarray(qwix.dequantize(qa), np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    err = np.abs(got - np.asarray(w)).max() / np.abs(np.asarray(w)).max()
    assert 0 < err < (1 / 127 if name == "int8" else 1 / 7)


def quantized_copy(model, name):
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    params.quantize_experts(copy, name)
    return copy


def dequantized_copy(model, name):
    """The float layer whose expert weights are the quantized ones, dequantized by hand."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    for w, axis in ((copy.w_in, 1), (copy.w_out, 1)):
        w.set_value(jnp.asarray(numpy_weight_only(w.get_value(), name, axis)[0]))
    return copy


@pytest.mark.parametrize("dispatch,name", [("capacity", "int8"), ("dropless", "int4")])
def test_weight_only_layer_is_the_float_layer_of_its_dequantized_weights(name, dispatch):
    x = tokens()
    want, _ = apply(dequantized_copy(make(8, 2, 2.0, dispatch=dispatch), name), x, train=False)
    got, _ = apply(quantized_copy(make(8, 2, 2.0, dispatch=dispatch), name), x, train=False)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the same on a data x fsdp x expert mesh: values and scales split and gathered
    sharded = make(8, 2, 2.0, mesh=parallel.make_mesh({"fsdp": 2, "expert": 4}), dispatch=dispatch)
    got_mesh, _ = apply(quantized_copy(sharded, name), x, train=False)
    np.testing.assert_allclose(got_mesh, want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """tiny:smoke, widened so that w_out's 256 inputs make two int4 groups, trained long
    enough that its greedy text is not one repeated byte; with its held-out tokens. On one
    device: generate.load reads it onto one device whatever the run's mesh, and a step of
    this width on the 8 simulated devices takes several times as long."""
    from configs import tiny
    from moejax import train
    from moejax.data import text
    from moejax.data.batches import make_batches
    from moejax.data.loader import read_first
    from moejax.generate import load

    config = tiny.get_config("smoke")
    config.model.update(d_model=64, d_ff=256)
    config.train.update(steps=60, warmup_steps=5, log_every=30, eval_every=60, ckpt_every=60)
    config.mesh.data = 1
    workdir = str(tmp_path_factory.mktemp("trained"))
    train.train(config, workdir)
    _, model, _ = load(workdir)
    tokenizer = text.make_tokenizer(config.data.tokenizer)
    held_out = make_batches(config.data, tokenizer, "eval", config.seed)
    return workdir, model, read_first(held_out, slice(0, 16), 1)[0][:, :-1]


def test_error_on_real_activations_and_greedy_agreement(trained):
    from moejax import quant_check

    _, model, tokens = trained
    prompts = [list(map(int, row[:8])) for row in tokens[:4]]
    result = quant_check.check(model, tokens, prompts, 16)
    int8, int4 = result["int8"], result["int4"]
    assert int8["layers"].shape == int4["layers"].shape == (2,)  # both layers are MoE
    # int8 rounds each weight to 1/254 of its channel's range, int4 to 1/14 of its group's:
    # the output error follows, int4 several times int8's and both far from 1.
    assert np.all(int8["layers"] > 0) and np.all(int8["layers"] < 0.02), int8["layers"]
    assert np.all(int4["layers"] > 2 * int8["layers"]) and np.all(int4["layers"] < 0.2)
    assert int8["next_token"] >= 0.97 and int4["next_token"] >= 0.85, result
    agree, of = int8["greedy"]
    assert of == 4 * 16 and agree >= 0.75 * of, result


def test_generate_quantize_prints_bytes_before_and_after(trained, capsys):
    from moejax import generate

    workdir, model, _ = trained
    experts = 2 * 8 * (64 * 2 * 256 + 256 * 64)  # layers x experts x (w_in + w_out)
    generate.main(["generate", "--workdir", workdir, "--tokens", "4", "--quantize", "int8"])
    line = next(x for x in capsys.readouterr().out.splitlines() if "weight-only" in x)
    # int8 values plus one fp32 scale per output channel: 2 x 8 x (2 x 256 + 64) channels
    int8 = experts + 4 * 2 * 8 * (2 * 256 + 64)
    assert f"routed experts {4 * experts / 2**20:,.2f} -> {int8 / 2**20:,.2f} MiB" in line, line
    generate.main(["generate", "--workdir", workdir, "--tokens", "4", "--quantize", "int4"])
    line = next(x for x in capsys.readouterr().out.splitlines() if "weight-only" in x)
    # int4: w_in's 64 inputs are one group, w_out's 256 two: 2 x 8 x (2 x 256 + 2 x 64)
    int4 = experts // 2 + 4 * 2 * 8 * (2 * 256 + 2 * 64)
    assert f"routed experts {4 * experts / 2**20:,.2f} -> {int4 / 2**20:,.2f} MiB" in line, line
