"""The MoE layer against the all-experts NumPy reference, and across mesh layouts.

Capacity group: a contiguous 1/num_groups slice of the flattened batch. The tests fix
num_groups = 8, so the single-device run (8 groups on one device) and every 8-device mesh
(one group per device, devices in (data, expert) order) route and drop the same tokens.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import parallel
from moejax.moe import cpu, experts, layer
from moejax.moe.dropless import ragged_ffn
from moejax.moe.layer import MoE, MoEConfig
from moejax.run.params import bytes_per_device, param_counts
from tests import reference

D, F = 16, 32


def make(num_experts, top_k, cf, *, mesh=None, activation="swiglu", renormalize=False, groups=8,
         dispatch="capacity"):
    cfg = MoEConfig(num_experts=num_experts, top_k=top_k, capacity_factor=cf,
                    eval_capacity_factor=cf, min_capacity=1, renormalize=renormalize,
                    jitter_eps=0.0, num_groups=groups, dispatch=dispatch)
    model = MoE(D, F, cfg, activation, mesh=mesh, rngs=nnx.Rngs(0))
    if mesh is not None:
        place(model, mesh)
    return model


def apply(model, x, *, train, rng=None):
    """The layer's forward pass, jitted as every job runs it (eager, above all on a mesh, it
    dispatches op by op, many times slower)."""
    return nnx.jit(lambda m, x, rng: m(x, train=train, rng=rng))(model, x, rng)


def place(model, mesh):
    """Lay every variable of `model` out on `mesh` as parallel.RULES asks."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, parallel.variable_shardings(state, mesh)))


def f64(p):
    return np.asarray(p[...], np.float64)


def flat(w_in):
    """w_in [..., d, g, f] -> [..., d, g*f]: the reference's [w_gate | w_lin] columns."""
    w = f64(w_in)
    return w.reshape(*w.shape[:-2], -1)


def tokens(batch=16, seq=8):
    return jax.random.normal(jax.random.key(1), (batch, seq, D))


def reference_run(model, x, cf):
    cfg = model.cfg
    n = x.shape[0] * x.shape[1]
    from moejax.moe.router import capacity

    cap = capacity(n // cfg.num_groups, cfg.num_experts, cfg.top_k, cf, cfg.min_capacity)
    return reference.moe(np.asarray(x).reshape(n, D), f64(model.router), flat(model.w_in),
                         f64(model.w_out), k=cfg.top_k, capacity=cap,
                         renormalize=cfg.renormalize, activation=model.activation,
                         num_groups=cfg.num_groups)


@pytest.mark.parametrize("top_k,renormalize,activation,cf", [
    (1, False, "swiglu", 8.0),  # capacity = all tokens: nothing can be dropped
    (2, False, "swiglu", 8.0),
    (2, True, "relu", 8.0),
    (2, False, "gelu", 8.0),
    (2, False, "swiglu", 1.0),  # tight capacity: the reference drops the same assignments
    (1, True, "swiglu", 0.5),
])
def test_layer_equals_all_experts_reference(top_k, renormalize, activation, cf):
    model = make(4, top_k, cf, activation=activation, renormalize=renormalize)
    x = tokens()
    y, aux = apply(model, x, train=True)
    want_y, want_balance, want_z = reference_run(model, x, cf)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want_y, atol=1e-5)
    np.testing.assert_allclose(aux["balance_loss"], want_balance, atol=1e-5)
    np.testing.assert_allclose(aux["z_loss"], want_z, rtol=1e-5)
    if cf >= 8.0:
        assert float(aux["dropped_frac"]) == 0.0
    else:
        assert float(aux["dropped_frac"]) > 0.0


def loss_and_grads(model, x):
    ct = jax.random.normal(jax.random.key(2), x.shape)

    def loss(model, x):
        y, aux = model(x, train=True)
        return jnp.sum(y * ct) + aux["balance_loss"] + aux["z_loss"], (y, aux)

    (value, (y, aux)), grads = jax.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        model, x)
    return value, y, aux, grads


LAYOUTS = [  # (data, fsdp, expert, tensor) over the 8 devices: each set of split axes once
    (8, 1, 1, 1), (2, 1, 4, 1), (1, 1, 8, 1),  # data x expert
    (1, 8, 1, 1), (1, 4, 2, 1),  # FSDP, FSDP x EP
    (1, 1, 4, 2), (2, 1, 2, 2), (1, 2, 2, 2), (2, 2, 1, 2),  # with tensor
]
# One layout per way of splitting the layer: tokens only, experts only, weights gathered
# (FSDP x EP), experts and their columns (data x EP x TP), no expert axis (data x FSDP x TP).
EACH_SPLIT = [(8, 1, 1, 1), (1, 1, 8, 1), (1, 4, 2, 1), (2, 1, 2, 2), (2, 2, 1, 2)]


def portable_on_cpu(monkeypatch, path):
    """Make this CPU process run what a GPU or TPU runs for `path`: the capacity experts as a
    batched matmul instead of cpu.py's scan, dropless across devices by ragged all-to-all
    (through the stand-in of test_dropless.py) instead of the ring XLA:CPU runs."""
    from tests.test_dropless import emulated_ragged_all_to_all

    if path == "capacity_portable":
        monkeypatch.setattr(cpu, "experts_ffn", lambda x, w_in, w_out, activation, *_:
                            experts.batched_experts(x, w_in, w_out, activation))
    if path == "dropless_ragged":
        monkeypatch.setattr(layer, "ring_ffn", lambda *args: ragged_ffn(
            *args, ragged_all_to_all=emulated_ragged_all_to_all))
    return {"capacity_portable": "capacity", "dropless_ragged": "dropless"}.get(path, path)


# Each way assignments reach their experts. What a GPU or TPU runs (the portable capacity
# path, dropless by ragged all-to-all) is checked on every set of split axes; what only this
# CPU runs on one layout per way of splitting; several experts per device (16) on those that
# split the experts (with one expert axis, 16 experts are 8 more of the same on each device).
CASES = ([("capacity_portable", 8, layout) for layout in LAYOUTS]
         + [("dropless_ragged", 8, layout) for layout in LAYOUTS]
         + [(path, 8, layout) for path in ("capacity", "dropless_ring") for layout in EACH_SPLIT]
         + [("capacity", 16, layout) for layout in EACH_SPLIT if layout[2] > 1])
_ONE_DEVICE = {}  # (path, num_experts) -> the single-device run every layout is held to


@pytest.mark.parametrize("path,num_experts,layout", CASES,
                         ids=lambda c: "d{}f{}e{}t{}".format(*c) if isinstance(c, tuple) else c)
def test_same_numbers_on_every_mesh(path, num_experts, layout, monkeypatch):
    dispatch = portable_on_cpu(monkeypatch, path)
    x = tokens()
    if (path, num_experts) not in _ONE_DEVICE:
        _ONE_DEVICE[path, num_experts] = loss_and_grads(
            make(num_experts, 2, 1.0, dispatch=dispatch), x)
    _, y0, aux0, (g0, gx0) = _ONE_DEVICE[path, num_experts]
    if dispatch == "capacity":
        assert float(aux0["dropped_frac"]) > 0.05  # dropping is really exercised

    sizes = dict(zip(("data", "fsdp", "expert", "tensor"), layout, strict=True))
    mesh = parallel.make_mesh(sizes)
    model = make(num_experts, 2, 1.0, mesh=mesh, dispatch=dispatch)
    want = [a if sizes.get(a, 1) > 1 else None for a in ("expert", "fsdp", None, "tensor")]
    assert list(model.w_in[...].sharding.spec) == want  # [E, d, g, f] really split
    xs = jax.device_put(x, parallel.token_sharding(mesh))
    _, y, aux, (g, gx) = loss_and_grads(model, xs)

    np.testing.assert_allclose(y, y0, atol=1e-5)
    for key in ("balance_loss", "z_loss", "dropped_frac", "tokens_per_expert"):
        np.testing.assert_allclose(aux[key], aux0[key], atol=1e-5, err_msg=key)
    np.testing.assert_allclose(gx, gx0, atol=1e-5)
    flat0, flat = nnx.to_flat_state(nnx.state(g0)), nnx.to_flat_state(nnx.state(g))
    assert len(flat) == len(flat0) == 3
    for (path, v0), (_, v) in zip(flat0, flat, strict=True):
        np.testing.assert_allclose(v[...], v0[...], atol=1e-5, err_msg=str(path))


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_equals_reference_and_padded_path(top_k):
    x = tokens()
    model = make(4, top_k, 0.5, dispatch="dropless")
    model.router[...] = model.router[...].at[:, 0].add(0.5)  # skewed: capacity would drop
    assert float(apply(make(4, top_k, 0.5), x, train=True)[1]["dropped_frac"]) > 0.2
    _, y, aux, (g2, gx2) = loss_and_grads(model, x)  # the forward of check 1, grads of check 2
    assert float(aux["dropped_frac"]) == 0.0

    # Independent check 1: every expert on every token, nothing dropped (capacity = T).
    n = x.shape[0] * x.shape[1]
    want_y, want_balance, _ = reference.moe(
        np.asarray(x).reshape(n, D), f64(model.router), flat(model.w_in), f64(model.w_out),
        k=top_k, capacity=n, renormalize=False, activation="swiglu", num_groups=8)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want_y, atol=1e-5)
    np.testing.assert_allclose(aux["balance_loss"], want_balance, atol=1e-5)

    # Independent check 2: gradients equal the padded capacity path with room for everything.
    padded = make(4, top_k, 4.0 / top_k)
    nnx.update(padded, nnx.state(model))
    _, y1, _, (g1, gx1) = loss_and_grads(padded, x)
    np.testing.assert_allclose(y, y1, atol=1e-5)
    np.testing.assert_allclose(gx2, gx1, atol=1e-5)
    for (path, v1), (_, v2) in zip(nnx.to_flat_state(nnx.state(g1)),
                                   nnx.to_flat_state(nnx.state(g2)), strict=True):
        np.testing.assert_allclose(v2[...], v1[...], atol=1e-5, err_msg=str(path))


def test_compiled_layer_uses_all_to_all_and_never_gathers_experts():
    mesh = parallel.make_mesh({"data": 2, "expert": 4})
    model = make(8, 2, 1.25, mesh=mesh)
    xs = jax.device_put(tokens(), parallel.token_sharding(mesh))
    graphdef, state = nnx.split(model)

    def loss(state, x):
        y, aux = nnx.merge(graphdef, state)(x, train=True)
        return jnp.sum(y**2) + aux["balance_loss"]

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, xs).compile().as_text()
    assert hlo.count("all-to-all(") >= 4  # dispatch and return, forward and backward
    # The one weight gathered is the router [d, E], split over expert like every non-expert
    # weight (parallel.RULES); the experts' weights never cross the expert axis.
    gathered = re.findall(r"= (\w+\[[\d,]*\])\S* all-gather\(", hlo)
    assert set(gathered) == {f"f32[{D},8]"} and len(gathered) == hlo.count("all-gather("), gathered


def test_eval_ignores_jitter_and_train_uses_it():
    cfg = MoEConfig(8, 2, 1.0, 1.0, min_capacity=1, jitter_eps=0.5, num_groups=8)
    model = MoE(D, F, cfg, "swiglu", mesh=None, rngs=nnx.Rngs(0))
    x = tokens()
    # Two keys through one program: eval's output is the same whatever the key.
    clean = apply(model, x, train=False, rng=jax.random.key(0))[0]
    np.testing.assert_array_equal(apply(model, x, train=False, rng=jax.random.key(3))[0],
                                  clean)
    noisy = apply(model, x, train=True, rng=jax.random.key(3))[0]
    assert not np.allclose(noisy, clean, atol=1e-3)


def test_param_counts_and_bytes():
    model = make(8, 2, 1.0)
    router, experts = D * 8, 3 * 8 * D * F  # w_in holds gate and linear halves
    assert param_counts(model, top_k=2, num_experts=8) == {
        "total": router + experts, "active": router + experts // 4, "expert": experts}
    place(model, parallel.make_mesh({"data": 2, "expert": 4}))
    assert bytes_per_device(nnx.state(model)) == 4 * (router + experts) // 4  # all over expert
