"""Routers beyond Switch, each against the NumPy reference: sigmoid scores, a selection
bias (auxiliary-loss-free balancing), expert choice and shared experts."""

import jax
import numpy as np
import pytest
from flax import nnx

from moejax import parallel
from moejax.moe import router
from moejax.moe.layer import MoE, MoEConfig
from tests import reference
from tests.test_layer import apply, f64, flat, place

D, F, N = 16, 32, 128  # tokens = 16 x 8, in 8 groups of 16


def make(mesh=None, **kw):
    base = dict(num_experts=8, top_k=2, capacity_factor=1.0, eval_capacity_factor=1.0,
                min_capacity=1, renormalize=False, jitter_eps=0.0, num_groups=8)
    model = MoE(D, F, MoEConfig(**{**base, **kw}), "swiglu", mesh=mesh, rngs=nnx.Rngs(0))
    if mesh is not None:
        place(model, mesh)
    return model


def tokens():
    return jax.random.normal(jax.random.key(1), (16, 8, D))


def weights(model):
    return [f64(model.router), flat(model.w_in), f64(model.w_out)]


@pytest.mark.parametrize("score,renormalize", [("sigmoid", True), ("sigmoid", False),
                                               ("softmax", False)])
def test_sigmoid_scores_and_selection_bias_match_reference(score, renormalize):
    model = make(router_score=score, renormalize=renormalize, bias_rate=0.1)
    bias = np.linspace(-0.3, 0.3, 8)  # big enough to change many choices
    model.router_bias[...] = bias
    x = tokens()
    y, aux = apply(model, x, train=True)
    cap = router.capacity(N // 8, 8, 2, 1.0)
    want, want_balance, _ = reference.moe(np.asarray(x).reshape(N, D), *weights(model), k=2,
                                          capacity=cap, renormalize=renormalize,
                                          activation="swiglu", num_groups=8, score=score,
                                          bias=bias)
    np.testing.assert_allclose(np.asarray(y).reshape(N, D), want, atol=1e-5)
    np.testing.assert_allclose(aux["balance_loss"], want_balance, atol=1e-5)
    # The bias moved the selection (so the check above is not vacuous) ...
    model.router_bias[...] = np.zeros(8)
    assert not np.allclose(apply(model, x, train=True)[0], y, atol=1e-3)


def test_selection_bias_steers_choice_but_not_gates():
    logits = jax.random.normal(jax.random.key(0), (6, 4))
    r = router.route(logits, 1, capacity=6, renormalize=False, score="sigmoid",
                     bias=jax.numpy.array([0.0, 0.0, 0.0, 10.0]))
    np.testing.assert_array_equal(r.expert_ids[:, 0], 3)
    np.testing.assert_allclose(r.gates[:, 0], jax.nn.sigmoid(logits[:, 3]), rtol=1e-6)


def test_bias_update_moves_toward_the_mean_load():
    bias = jax.numpy.array([0.5, 0.0, 0.0, -0.5])
    new = router.bias_update(bias, jax.numpy.array([4, 0, 2, 2]), rate=0.01)  # mean 2
    np.testing.assert_allclose(new, [0.49, 0.01, 0.0, -0.5], atol=1e-7)


@pytest.mark.parametrize("cf,score", [(1.0, "softmax"), (2.0, "sigmoid"), (0.25, "softmax")])
def test_expert_choice_matches_reference(cf, score):
    model = make(routing="experts", capacity_factor=cf, router_score=score)
    x = tokens()
    y, aux = apply(model, x, train=True)
    cap = router.capacity(N // 8, 8, 2, cf)
    want = reference.expert_choice_moe(np.asarray(x).reshape(N, D), *weights(model),
                                       capacity=cap, activation="swiglu", num_groups=8,
                                       score=score)
    np.testing.assert_allclose(np.asarray(y).reshape(N, D), want, atol=1e-5)
    np.testing.assert_array_equal(aux["tokens_per_expert"], 8 * cap)
    assert 0.0 <= float(aux["dropped_frac"]) < 1.0


def test_expert_choice_same_on_expert_parallel_mesh():
    x = tokens()
    y0, aux0 = apply(make(routing="experts"), x, train=True)
    mesh = parallel.make_mesh({"data": 2, "expert": 4})
    y, aux = apply(make(mesh, routing="experts"),
                     jax.device_put(x, parallel.token_sharding(mesh)), train=True)
    np.testing.assert_allclose(y, y0, atol=1e-5)
    np.testing.assert_allclose(aux["dropped_frac"], aux0["dropped_frac"], atol=1e-6)


def test_shared_experts_add_a_dense_ffn():
    model = make(num_shared_experts=2, capacity_factor=4.0)
    x = tokens()
    y, _ = apply(model, x, train=True)
    xs = np.asarray(x).reshape(N, D)
    want, _, _ = reference.moe(xs, *weights(model), k=2, capacity=N, renormalize=False,
                               activation="swiglu", num_groups=8)
    want += reference.expert_ffn(xs, flat(model.shared_in), f64(model.shared_out), "swiglu")
    np.testing.assert_allclose(np.asarray(y).reshape(N, D), want, atol=1e-5)
    assert model.shared_in[...].shape == (D, 2, 2 * F)  # gated, 2 experts wide
