"""gpt-oss's MoE pieces (model.moe_bias, activation clamped_swiglu): a learned bias on the
router's logits, a bias on each expert's two projections, and the clamped SwiGLU, against a
NumPy reference written from transformers' GptOssTopKRouter and GptOssExperts, on every
dispatch path, across mesh layouts, quantized, and in the parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx
from ml_collections import ConfigDict

from moejax import parallel
from moejax.moe import cpu, experts, ffn, layer
from moejax.moe.dropless import ragged_ffn
from moejax.moe.layer import MoE, MoEConfig
from moejax.run import params
from tests.test_layer import place

D, F, E, K = 16, 32, 8, 2
LIMIT, ALPHA = 7.0, 1.702


def np_clamped_swiglu(gate, up, limit=LIMIT):
    """transformers' GptOssExperts._apply_gate on gate and up already split."""
    gate = np.minimum(gate, limit)
    up = np.clip(up, -limit, limit)
    return (up + 1) * gate / (1 + np.exp(-ALPHA * gate))


def np_moe(x, p, *, capacity, num_groups, limit=LIMIT):
    """x: [N, d] in `num_groups` contiguous groups; p: the layer's arrays in float64.
    logits = x W + b; top-k of the logits; a softmax over the k chosen; in each group every
    token's 1st choice (in token order) before any 2nd choice takes a slot, at most
    `capacity` per expert; y = sum over kept choices of gate * (act(x W_in + b_in) W_out +
    b_out). Returns y, the raw gate and up pre-activations [E, N, f] and the kept mask."""
    n = x.shape[0]
    gates, ids = np_gates(x, p)
    keep = np.zeros((n, K), bool)
    for g in range(num_groups):
        taken = np.zeros(E, int)
        for j in range(K):
            for t in range(g * n // num_groups, (g + 1) * n // num_groups):
                keep[t, j] = taken[ids[t, j]] < capacity
                taken[ids[t, j]] += 1
    gate_pre = np.einsum("nd,edf->enf", x, p["w_in"][:, :, 0]) + p["in_bias"][:, None, 0]
    up_pre = np.einsum("nd,edf->enf", x, p["w_in"][:, :, 1]) + p["in_bias"][:, None, 1]
    out = (np.einsum("enf,efd->end", np_clamped_swiglu(gate_pre, up_pre, limit), p["w_out"])
           + p["out_bias"][:, None])
    y = np.zeros_like(x)
    for t in range(n):
        for j in range(K):
            if keep[t, j]:
                y[t] += gates[t, j] * out[ids[t, j], t]
    return y, gate_pre, up_pre, keep


def cfg_of(cf, dispatch="capacity", **kw):
    return MoEConfig(num_experts=E, top_k=K, capacity_factor=cf, eval_capacity_factor=cf,
                     min_capacity=1, renormalize=True, num_groups=8, dispatch=dispatch,
                     moe_bias=True, **kw)


def randomized(cfg, *, mesh=None, seed=0, w_in_scale=3.0):
    """A layer whose biases are random and nonzero and whose pre-activations reach well past
    the clamp (|x W_in + b_in| up to ~15 against a limit of 7)."""
    model = MoE(D, F, cfg, "clamped_swiglu", mesh=mesh, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(seed)
    model.w_in[...] = model.w_in[...] * w_in_scale
    model.router_logit_bias[...] = jnp.asarray(rng.normal(0, 1.0, (E,)), jnp.float32)
    model.in_bias[...] = jnp.asarray(rng.normal(0, 3.0, (E, 2, F)), jnp.float32)
    model.out_bias[...] = jnp.asarray(rng.normal(0, 1.0, (E, D)), jnp.float32)
    if mesh is not None:
        place(model, mesh)
    return model


def arrays(model):
    """The layer's arrays in float64, the router's logit bias as "logit_bias"."""
    names = {"router": "router", "logit_bias": "router_logit_bias", "w_in": "w_in",
             "w_out": "w_out", "in_bias": "in_bias", "out_bias": "out_bias"}
    return {ours: np.asarray(getattr(model, name)[...], np.float64)
            for ours, name in names.items()}


def np_gates(x, p):
    """[N, k] gates and expert ids: a softmax over the top-k logits (GptOssTopKRouter)."""
    logits = x @ p["router"] + p["logit_bias"]
    ids = np.argsort(-logits, axis=-1, kind="stable")[:, :K]
    chosen = np.take_along_axis(logits, ids, -1)
    return np.exp(chosen) / np.exp(chosen).sum(-1, keepdims=True), ids


def tokens(batch=16, seq=8):
    return jax.random.normal(jax.random.key(1), (batch, seq, D))


def forward(model, x):
    return nnx.jit(lambda m, x: m(x, train=True))(model, x)


def batched_on_cpu(monkeypatch):
    """The capacity experts as GPU and TPU run them (every slot of the buffer, empty ones
    too, biases and all) instead of cpu.py's filled rows."""
    monkeypatch.setattr(cpu, "experts_ffn", lambda x, w_in, w_out, act, _, __, b_in, b_out:
                        experts.batched_experts(x, w_in, w_out, act, None, b_in, b_out))


# (a) the layer against the NumPy reference: capacity with room for all, capacity that drops
# (on cpu.py's filled rows and on every slot as GPU and TPU run it), dropless.
@pytest.mark.parametrize("dispatch,cf,portable", [
    ("capacity", 8.0, False), ("capacity", 0.5, False), ("capacity", 0.5, True),
    ("dropless", 0.5, False)])
def test_layer_equals_numpy_reference(dispatch, cf, portable, monkeypatch):
    if portable:
        batched_on_cpu(monkeypatch)
    model = randomized(cfg_of(cf, dispatch))
    x = tokens()
    y, aux = forward(model, x)
    n = x.shape[0] * x.shape[1]
    group = n // 8  # router.capacity, by hand: 16 (cf 8: all of a group), 2 (cf 0.5)
    cap = group if dispatch != "capacity" else min(group, int(np.ceil(cf * group * K / E)))
    want, gate_pre, up_pre, keep = np_moe(np.asarray(x, np.float64).reshape(n, D),
                                          arrays(model), capacity=cap, num_groups=8)
    # The clamp bites on both halves, so a missing or misplaced clamp shows.
    assert (gate_pre > LIMIT).mean() > 0.02 and (up_pre < -LIMIT).mean() > 0.02
    got = np.asarray(y, np.float64).reshape(n, D)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    if keep.all():
        assert float(aux["dropped_frac"]) == 0.0
    else:  # a token whose every choice was dropped gets nothing, not a bias
        dropped = ~keep.any(-1)
        assert float(aux["dropped_frac"]) > 0.1 and dropped.sum() >= 3
        np.testing.assert_array_equal(got[dropped], 0.0)


# (b) loss and every gradient (the biases' included) on a mesh equal the one-device run.
def loss_and_grads(model, x):
    ct = jax.random.normal(jax.random.key(2), x.shape)

    def loss(model, x):
        y, aux = model(x, train=True)
        return jnp.sum(y * ct) + aux["balance_loss"] + aux["z_loss"], y

    (value, y), grads = jax.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        model, x)
    return value, y, grads


def on_device(path, monkeypatch):
    """The dispatch of `path`, with what a GPU or TPU would run patched in where asked."""
    if path == "capacity_portable":
        batched_on_cpu(monkeypatch)
    if path == "dropless_ragged":
        from tests.test_dropless import emulated_ragged_all_to_all

        monkeypatch.setattr(layer, "ring_ffn", lambda *args: ragged_ffn(
            *args, ragged_all_to_all=emulated_ragged_all_to_all))
    return {"capacity_portable": "capacity", "dropless_ragged": "dropless"}.get(path, path)


SLOW = pytest.mark.slow
LAYOUTS = [  # (path, quantization, (data, fsdp, expert, tensor)); the fast suite runs two
    pytest.param("capacity", "none", (2, 1, 4, 1), marks=SLOW),  # expert
    ("capacity", "none", (1, 2, 2, 2)),  # fsdp x expert x tensor
    pytest.param("capacity_portable", "none", (1, 4, 2, 1), marks=SLOW),  # fsdp x expert
    # fsdp x tensor (sorted rows, all experts here)
    pytest.param("dropless", "none", (1, 2, 1, 4), marks=SLOW),
    pytest.param("dropless_ring", "none", (1, 1, 8, 1), marks=SLOW),  # expert
    ("dropless_ragged", "none", (2, 1, 2, 2)),  # data x expert x tensor
    # Qwix QAT, where `tensor` would scale each rank's hidden units alone (test_quant.py)
    pytest.param("dropless_ragged", "int8", (2, 1, 4, 1), marks=SLOW),  # data x expert
    pytest.param("capacity", "int8", (1, 2, 4, 1), marks=SLOW),  # fsdp x expert
]
_ONE_DEVICE = {}


@pytest.mark.parametrize("path,quantization,layout", LAYOUTS,
                         ids=lambda c: "d{}f{}e{}t{}".format(*c) if isinstance(c, tuple) else c)
def test_same_loss_and_gradients_on_every_mesh(path, quantization, layout, monkeypatch):
    dispatch = on_device(path, monkeypatch)
    cfg = cfg_of(1.0, dispatch, quantization=quantization)
    x = tokens()
    key = (path.split("_")[0] if dispatch != "capacity" else path, quantization)
    if key not in _ONE_DEVICE:
        _ONE_DEVICE[key] = loss_and_grads(randomized(cfg), x)
    value0, y0, (g0, gx0) = _ONE_DEVICE[key]

    sizes = dict(zip(("data", "fsdp", "expert", "tensor"), layout, strict=True))
    mesh = parallel.make_mesh(sizes)
    model = randomized(cfg, mesh=mesh)
    split = [a if sizes[a] > 1 else None for a in ("expert", "tensor")]
    assert list(model.in_bias[...].sharding.spec) == [split[0], None, split[1]]
    assert list(model.out_bias[...].sharding.spec) == [split[0], "fsdp" if sizes["fsdp"] > 1
                                                       else None]
    value, y, (g, gx) = loss_and_grads(model, jax.device_put(x, parallel.token_sharding(mesh)))
    tol = 1e-4 if quantization == "none" else 2e-3
    np.testing.assert_allclose(value, value0, rtol=tol)
    np.testing.assert_allclose(y, y0, atol=tol)
    np.testing.assert_allclose(gx, gx0, atol=tol)
    flat0, flat = nnx.to_flat_state(nnx.state(g0)), nnx.to_flat_state(nnx.state(g))
    names = [str(path[-1]) for path, _ in flat]
    assert set(names) == {"router", "router_logit_bias", "w_in", "w_out", "in_bias",
                          "out_bias"}, names
    for (name, v0), (_, v) in zip(flat0, flat, strict=True):
        assert np.abs(np.asarray(v0[...])).max() > 1e-3, name  # every gradient really flows
        np.testing.assert_allclose(v[...], v0[...], rtol=tol, atol=tol, err_msg=str(name))


@pytest.mark.parametrize("dispatch,layout", [("capacity", (1, 2, 2, 2)),
                                             ("dropless", (1, 2, 1, 4))])
def test_output_bias_counts_once_with_columns_split_over_tensor(dispatch, layout):
    """W_out = 0: each expert's output is its b_out, so y = sum of gate_j b_out[e_j] over the
    kept choices and d loss / d b_out[e] = sum over kept assignments to e of gate * ct. With
    w_out's rows over tensor = 2 or 4, a b_out that every tensor rank added before the
    partial sums are reduced would come out 2 or 4 times. (Two of LAYOUTS: their programs
    are compiled already.)"""
    mesh = parallel.make_mesh(dict(zip(("data", "fsdp", "expert", "tensor"), layout,
                                       strict=True)))
    model = randomized(cfg_of(1.0, dispatch), mesh=mesh)
    model.w_out[...] = jnp.zeros_like(model.w_out[...])
    assert model.w_out[...].sharding.spec[1] == "tensor"
    x = tokens()
    _, y, (g, _) = loss_and_grads(model, jax.device_put(x, parallel.token_sharding(mesh)))

    p = arrays(model)
    xs = np.asarray(x, np.float64).reshape(-1, D)
    want, *_, keep = np_moe(xs, p, capacity=4 if dispatch == "capacity" else 16, num_groups=8)
    assert keep.mean() < (0.95 if dispatch == "capacity" else 1.01)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want, rtol=1e-5, atol=1e-5)
    gates, ids = np_gates(xs, p)
    ct = np.asarray(jax.random.normal(jax.random.key(2), x.shape), np.float64).reshape(-1, D)
    want_grad = np.zeros((E, D))
    np.add.at(want_grad, ids.reshape(-1),
              (keep[..., None] * gates[..., None] * ct[:, None]).reshape(-1, D))
    np.testing.assert_allclose(g.out_bias[...], want_grad, rtol=1e-5, atol=1e-5)


def test_qat_adds_the_output_bias_in_float():
    """Under Qwix QAT (int8 matmul operands) the output bias adds exactly its float value:
    the difference it makes is sum_j gate_j b_out[e_j], however the matmuls round."""
    x = tokens()
    for dispatch in ("capacity", "dropless"):
        model = randomized(cfg_of(8.0, dispatch, quantization="int8"))
        y, _ = forward(model, x)
        want, *_ = np_moe(np.asarray(x, np.float64).reshape(-1, D), arrays(model),
                          capacity=128, num_groups=8)
        got = np.asarray(y, np.float64).reshape(-1, D)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2  # int8's rounding
        p = arrays(model)
        zeroed = randomized(cfg_of(8.0, dispatch, quantization="int8"))
        zeroed.out_bias[...] = jnp.zeros_like(zeroed.out_bias[...])
        y_zeroed, _ = forward(zeroed, x)
        gates, ids = np_gates(np.asarray(x, np.float64).reshape(-1, D), p)
        np.testing.assert_allclose(np.asarray(y - y_zeroed).reshape(-1, D),
                                   np.einsum("nk,nkd->nd", gates, p["out_bias"][ids]),
                                   atol=1e-5)


# (c) weight-only int8 experts: the weights quantized, the biases left in float.
@pytest.mark.parametrize("dispatch,layout", [("capacity", None),
                                             ("dropless", {"fsdp": 2, "expert": 2,
                                                           "tensor": 2})])
def test_weight_only_int8_keeps_biases_in_float(dispatch, layout):
    mesh = None if layout is None else parallel.make_mesh(layout)
    model = randomized(cfg_of(8.0, dispatch), mesh=mesh)
    x = tokens() if mesh is None else jax.device_put(tokens(), parallel.token_sharding(mesh))
    want, _ = forward(model, x)
    before = {n: np.asarray(getattr(model, n)[...]) for n in ("in_bias", "out_bias")}
    params.quantize_experts(model, "int8")
    for name in ("w_in", "w_out"):
        assert isinstance(getattr(model, name).get_value(), qwix.QArray)
    for name, value in before.items():
        got = getattr(model, name).get_value()
        assert not isinstance(got, qwix.QArray) and got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), value)
    y, _ = forward(model, x)
    err = np.linalg.norm(np.asarray(y) - np.asarray(want)) / np.linalg.norm(np.asarray(want))
    assert 0 < err < 1e-2, err  # int8 rounds each weight to 1/254 of its channel's range


# (d) the activation itself, and the dense FFN with it.
def test_clamped_swiglu_is_gpt_oss_gate():
    h = np.random.default_rng(0).normal(0, 8.0, (64, 2 * F)).astype(np.float32)
    gate, up = np.split(h.astype(np.float64), 2, -1)
    assert (gate > LIMIT).any() and (gate < -LIMIT).any() and (np.abs(up) > LIMIT).any()
    got = np.asarray(ffn.activate(jnp.asarray(h), "clamped_swiglu"), np.float64)
    np.testing.assert_allclose(got, np_clamped_swiglu(gate, up), rtol=1e-5, atol=1e-5)
    # By hand: gate 10 -> 7, up -10 -> -7: (-7 + 1) * 7 * sigmoid(1.702 * 7)
    one = ffn.activate(jnp.asarray([[10.0, -10.0]]), "clamped_swiglu")
    np.testing.assert_allclose(one, [[-42.0 / (1 + np.exp(-11.914))]], rtol=1e-6)
    three = ffn.activate(jnp.asarray(h), ffn.Activation("clamped_swiglu", 3.0))
    np.testing.assert_allclose(three, np_clamped_swiglu(gate, up, 3.0), rtol=1e-5, atol=1e-5)
    model_config = ConfigDict({"activation": "clamped_swiglu", "swiglu_limit": 3.0})
    assert ffn.activation_of(model_config) == ffn.Activation("clamped_swiglu", 3.0)
    assert ffn.activation_of(ConfigDict({"activation": "swiglu"})) == ffn.Activation("swiglu")
    assert ffn.is_gated("clamped_swiglu") and not ffn.zero_at_zero("clamped_swiglu")

    w_in = np.random.default_rng(1).normal(0, 1.0, (D, 2, F))
    w_out = np.random.default_rng(2).normal(0, 0.2, (F, D))
    x = np.asarray(tokens(2, 8).reshape(-1, D), np.float64)
    y = ffn.ffn(jnp.asarray(x, jnp.float32), jnp.asarray(w_in, jnp.float32),
                jnp.asarray(w_out, jnp.float32), "clamped_swiglu")
    want = np_clamped_swiglu(x @ w_in[:, 0], x @ w_in[:, 1]) @ w_out
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_moe_reads_its_limit():
    model = randomized(cfg_of(8.0, "dropless", swiglu_limit=2.0))
    x = tokens()
    y, _ = forward(model, x)
    want, *_ = np_moe(np.asarray(x, np.float64).reshape(-1, D), arrays(model), capacity=128,
                      num_groups=8)
    assert not np.allclose(np.asarray(y).reshape(-1, D), want, atol=1e-2)  # limit 7's numbers
    want, *_ = np_moe(np.asarray(x, np.float64).reshape(-1, D), arrays(model), capacity=128,
                      num_groups=8, limit=2.0)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want, rtol=1e-4, atol=1e-4)


# (e) parameter counts by hand, and the keys as configs give them.
def test_param_counts_and_config_keys():
    model = randomized(cfg_of(8.0))
    router = D * E + E  # weight and logit bias: every token runs them
    per_expert = D * 2 * F + F * D + 2 * F + D  # w_in (gate, up), w_out, in_bias, out_bias
    assert params.param_counts(model, top_k=K, num_experts=E) == {
        "total": router + E * per_expert, "active": router + K * per_expert,
        "expert": E * per_expert}
    # D, E, F, k = 16, 8, 32, 2: router 128 + 8; an expert 1024 + 512 + 64 + 16 = 1616
    assert params.param_counts(model, top_k=K, num_experts=E) == {
        "total": 136 + 8 * 1616, "active": 136 + 2 * 1616, "expert": 8 * 1616}

    keys = {f: getattr(cfg_of(1.0), f) for f in MoEConfig.__dataclass_fields__}
    old = ConfigDict({k: v for k, v in keys.items() if k not in ("moe_bias", "swiglu_limit")})
    assert MoEConfig.from_config(old).moe_bias is False
    assert MoEConfig.from_config(old).swiglu_limit == 7.0
    new = ConfigDict(keys | {"swiglu_limit": 5.0})
    assert MoEConfig.from_config(new).moe_bias is True
    assert MoEConfig.from_config(new).swiglu_limit == 5.0


def test_lowers_for_tpu_megablox_with_biases():
    """The dropless gradient with biases as a TPU runs it (megablox, ragged all-to-all),
    lowered on this CPU: the bias rows' gather and its transpose have a TPU form."""
    mesh = parallel.make_mesh({"expert": 4, "tensor": 2})
    graphdef, state = nnx.split(randomized(cfg_of(1.0, "dropless"), mesh=mesh))

    def loss(state, x):
        y, aux = nnx.merge(graphdef, state)(x, train=True)
        return jnp.sum(y**2) + aux["balance_loss"]

    unstable = [jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]
    module = jax.export.export(jax.jit(jax.grad(loss)), platforms=("tpu",),
                               disabled_checks=unstable)(
        state, jax.device_put(tokens(), parallel.token_sharding(mesh))).mlir_module()
    assert "megablox/gmm.py" in module and "moejax/moe/cpu.py" not in module
