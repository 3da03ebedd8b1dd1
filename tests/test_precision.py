"""Mixed precision (docs/architecture.md, "Precision"): float32 master weights and moments by
default, bfloat16 compute where model.dtype says so, float32 router, norm statistics, logits
and loss whatever it says; AdamW's first moment in train.moment_dtype."""

import json
from collections import Counter

import jax
import jax.numpy as jnp
import pytest
from jax.extend.core import jaxprs_in_params

from configs import tiny
from moejax import config_lib, parallel
from moejax.run import state
from moejax.run.checkpoint import path_name


def smoke(**model):
    config = tiny.get_config("smoke")
    config.model.update(vocab_size=257, **model)
    return config


def setup(config):
    return state.setup(config, parallel.make_mesh({"data": 1}))


def dtypes_of(tree, part):
    """{path: dtype name} of the leaves of `tree` whose path contains `part`."""
    return {path_name(p): str(x.dtype) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if part in path_name(p)}


def test_default_state_is_float32_weights_and_moments():
    s = setup(smoke())
    params = dtypes_of(s.abstract["params"], "")
    mu, nu = dtypes_of(s.abstract["opt_state"], ".mu."), dtypes_of(s.abstract["opt_state"], ".nu.")
    assert len(mu) == len(nu) == len(params) > 0
    assert set(params.values()) == set(mu.values()) == set(nu.values()) == {"float32"}


def test_bfloat16_moment_dtype_is_the_first_moment_only():
    config = smoke(dtype="bfloat16")
    config.train.moment_dtype = "bfloat16"
    s = setup(config)
    assert set(dtypes_of(s.abstract["opt_state"], ".mu.").values()) == {"bfloat16"}
    assert set(dtypes_of(s.abstract["opt_state"], ".nu.").values()) == {"float32"}
    assert set(dtypes_of(s.abstract["params"], "").values()) == {"float32"}


def equations(jaxpr):
    """Every equation of `jaxpr` and the jaxprs inside it (scans, conds, custom VJPs), but not
    inside Pallas kernels, whose dots are the kernel's own business."""
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name != "pallas_call":
            for sub in jaxprs_in_params(eqn.params):
                yield from equations(sub)


def dtypes(eqn):
    return tuple(str(v.aval.dtype) for v in eqn.invars[:2]), str(eqn.outvars[0].aval.dtype)


def forward(config):
    """The jaxpr of the training loss of `config`'s model on one batch."""
    s = setup(config)
    tokens = jnp.zeros((2, config.data.seq_len + 1), jnp.int32)
    return jax.make_jaxpr(lambda p: state.loss_fn(p, s.graphdef, tokens, jax.random.key(0),
                                                  config.train))(s.abstract["params"]).jaxpr


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_bfloat16_compute_keeps_router_norms_logits_and_loss_in_float32(dispatch):
    config = smoke(dtype="bfloat16", dispatch=dispatch)
    num_experts, vocab = config.model.num_experts, config.model.vocab_size
    jaxpr = forward(config)
    eqns = list(equations(jaxpr))
    dots = [e for e in eqns if e.primitive.name in ("dot_general", "ragged_dot_general")]
    kinds = Counter()
    for e in dots:
        (a, b), out = dtypes(e)
        width = e.outvars[0].aval.shape[-1]
        if (a, b) == ("float32", "float32"):
            assert width == num_experts, f"a float32 matmul that is not the router: {e}"
            kinds["router"] += 1
        else:
            assert (a, b) == ("bfloat16", "bfloat16"), e
            kinds["logits" if width == vocab and out == "float32" else out] += 1
    # bfloat16 out: q, kv, out projections, attention context, the two expert matmuls at
    # least. Attention scores come out float32 (jax's attention takes its softmax there).
    assert kinds["router"] >= 1 and kinds["logits"] == 1 and kinds["bfloat16"] >= 6, kinds
    for e in eqns:  # norm statistics, every softmax and the loss's log-softmax
        if e.primitive.name in ("rsqrt", "exp", "log", "logistic"):
            if e.primitive.name == "logistic" and dtypes(e)[1] == "bfloat16":
                continue  # SiLU inside the experts' activation: compute, not a probability
            assert dtypes(e)[1] == "float32", e
    assert [str(v.aval.dtype) for v in jaxpr.outvars][0] == "float32"  # the loss


def test_float32_compute_is_float32_throughout():
    eqns = equations(forward(smoke()))
    assert {d for e in eqns if e.primitive.name == "dot_general" for d in dtypes(e)[0]} == {
        "float32"}


def test_moment_dtype_is_validated():
    config = tiny.get_config()
    config.train.moment_dtype = "float16"
    with pytest.raises(config_lib.ConfigError, match=r"^train.moment_dtype='float16': unknown; "
                       r"allowed: float32, bfloat16$"):
        config_lib.validate(config, 8)


def test_runs_saved_before_the_precision_keys_read_with_their_defaults(tmp_path):
    saved = tiny.get_config().to_dict()
    for group, key in (("model", "quantization"), ("model", "quantize_dense"),
                       ("train", "moment_dtype")):
        del saved[group][key]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = config_lib.run_config(str(tmp_path))
    assert (config.model.quantization, config.model.quantize_dense,
            config.train.moment_dtype) == ("none", False, "float32")
    config_lib.validate(config, 8)
