"""train.optimizer=muon (moejax/run/optim.py): two steps of the update against NumPy written
from Muon's definition (Nesterov momentum as optax has it, the quintic Newton-Schulz iteration
on each matrix of each layer and expert, the shape scale, decoupled weight decay) and AdamW's
on the other leaves; the same update on other layouts; which leaves each optimizer trains;
and a short run whose loss falls."""

import functools
import re

import jax
import numpy as np
import pytest
from flax import nnx

from configs import deepseek_v3, gpt_oss_20b, tiny
from moejax import parallel
from moejax.config_ranges import ConfigError
from moejax.run import optim, state
from moejax.run.checkpoint import path_name
from moejax.train import train_and_evaluate

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, optax's default
BETA = 0.95  # Muon's momentum
EPS = 1e-8  # optax's: Muon's Frobenius normalization and AdamW's denominator


def small_config(scale="consistent_rms"):
    """tiny:smoke with 8 experts (the stack [2 layers, 8 experts, 32, 2, 64]) under Muon; no
    warmup, so the first step's learning rate is the peak."""
    config = tiny.get_config("smoke")
    config.model.vocab_size = 64
    config.train.update(optimizer="muon", muon_lr_scale=scale, warmup_steps=0,
                        weight_decay=0.1, grad_clip=1.0)
    return config


def flat(tree) -> dict:
    return {path_name(p): np.asarray(x, np.float64)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@functools.cache
def params_and_grads():
    """One device: the init params and the gradients of two batches (float32)."""
    config = small_config()
    s = state.setup(config, parallel.make_mesh({}))
    params = state.init(s)["params"]
    grad = jax.jit(jax.grad(lambda p, tokens: state.loss_fn(p, s.graphdef, tokens, None,
                                                            config.train)[0]))
    rng = np.random.default_rng(0)
    grads = [grad(params, rng.integers(0, 64, (8, 33)).astype(np.int32)) for _ in range(2)]
    return params, grads


def two_steps(config, sizes=None):
    """The updates of two steps (the second from the first's state and params) on a mesh of
    `sizes`, and the optimizer state after them, each array laid out as state.setup says."""
    s = state.setup(config, parallel.make_mesh(sizes or {}))
    params, grads = params_and_grads()
    params, *grads = (jax.device_put(t, s.shardings["params"]) for t in (params, *grads))
    init = jax.jit(s.tx.init, out_shardings=s.shardings["opt_state"])
    update = jax.jit(s.tx.update, out_shardings=(s.shardings["params"], s.shardings["opt_state"]))
    opt_state = init(params)
    first, opt_state = update(grads[0], opt_state, params)
    params = jax.jit(optax_apply, out_shardings=s.shardings["params"])(params, first)
    second, opt_state = update(grads[1], opt_state, params)
    return (flat(first), flat(second)), opt_state, s


def optax_apply(params, updates):
    return jax.tree.map(lambda p, u: p + u, params, updates)


# ---- the NumPy reference ------------------------------------------------------------------

def newton_schulz(m: np.ndarray) -> np.ndarray:
    """m: [fan_in, fan_out] -> about the nearest semi-orthogonal matrix: the wide way round,
    divided by its Frobenius norm, five steps of X <- a X + (b A + c A^2) X, A = X X^T."""
    wide = m.shape[0] <= m.shape[1]
    x = m if wide else m.T
    x = x / (np.linalg.norm(x) + EPS)
    a, b, c = NS_COEFFS
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


def scale_of(fan_in: int, fan_out: int, scale: str) -> float:
    if scale == "consistent_rms":
        return 0.2 * np.sqrt(max(fan_in, fan_out))
    return np.sqrt(max(1.0, fan_out / fan_in)) if scale == "width" else 1.0


def orthogonalized(name: str, m: np.ndarray, scale: str) -> np.ndarray:
    """Each matrix of a stacked tiny leaf (leading axis: layers) orthogonalized and scaled, as
    the layer uses it: q [d, heads x head_dim], kv one of each for key and value, out
    [heads x head_dim, d], w_in one [d, f] for the gate and one for the linear half of each
    expert, w_out [f, d] of each expert."""
    out = np.empty_like(m)

    def put(index, matrix):  # matrix: the [fan_in, fan_out] view of m[index]
        o = newton_schulz(matrix) * scale_of(*matrix.shape, scale)
        out[index] = o.reshape(m[index].shape)

    for layer in range(m.shape[0]):
        w = m[layer]
        if name == "q":  # [d, heads, head_dim]
            put(layer, w.reshape(w.shape[0], -1))
        elif name == "kv":  # [d, key | value, kv_heads, head_dim]
            for j in range(2):
                put((layer, slice(None), j), w[:, j].reshape(w.shape[0], -1))
        elif name == "out":  # [heads, head_dim, d]
            put(layer, w.reshape(-1, w.shape[-1]))
        elif name == "w_in":  # [experts, d, gate | linear, f]
            for e in range(w.shape[0]):
                for j in range(2):
                    put((layer, e, slice(None), j), w[e, :, j])
        elif name == "w_out":  # [experts, f, d]
            for e in range(w.shape[0]):
                put((layer, e), w[e])
        else:
            raise AssertionError(name)
    return out


def reference_steps(config) -> tuple[dict, dict]:
    """The two steps' updates in float64 NumPy, from the definitions."""
    tc = config.train
    params, grads = params_and_grads()
    p, grads = flat(params), [flat(g) for g in grads]
    lr = [float(state.setup(config, parallel.make_mesh({})).lr(k)) for k in range(2)]
    names = {n: n.rsplit(".", 1)[-1] for n in p}
    muon = {n for n, last in names.items() if last in ("q", "kv", "out", "w_in", "w_out")}
    decays = {n for n, last in names.items() if last in ("embed", "router")} | muon
    mu = {n: np.zeros_like(x) for n, x in p.items()}
    nu = {n: np.zeros_like(x) for n, x in p.items()}
    steps = []
    for t, g in enumerate(grads, 1):
        norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
        g = {n: x * min(1.0, tc.grad_clip / norm) for n, x in g.items()}
        u = {}
        for n in p:
            if n in muon:
                mu[n] = BETA * mu[n] + (1 - BETA) * g[n]
                nesterov = (BETA * mu[n] / (1 - BETA ** (t + 1))
                            + (1 - BETA) * g[n] / (1 - BETA ** t))
                direction = orthogonalized(names[n], nesterov, tc.muon_lr_scale)
            else:
                mu[n] = tc.b1 * mu[n] + (1 - tc.b1) * g[n]
                nu[n] = tc.b2 * nu[n] + (1 - tc.b2) * g[n] ** 2
                direction = ((mu[n] / (1 - tc.b1 ** t))
                             / (np.sqrt(nu[n] / (1 - tc.b2 ** t)) + EPS))
            decay = tc.weight_decay * p[n] if n in decays else 0.0
            u[n] = -lr[t - 1] * (direction + decay)
        p = {n: p[n] + u[n] for n in p}
        steps.append(u)
    return tuple(steps)


@functools.cache
def one_device(scale="consistent_rms"):
    return two_steps(small_config(scale))[0]


@pytest.mark.parametrize("scale", optim.MUON_LR_SCALES)
def test_two_steps_match_numpy(scale):
    """Every leaf, both steps: Muon's on the five hidden matrices (the expert stack per layer,
    per expert, gate and linear apart), AdamW's on the rest."""
    config = small_config(scale)
    for step, (got, want) in enumerate(zip(one_device(scale), reference_steps(config),
                                           strict=True), 1):
        assert got.keys() == want.keys()
        for name in want:
            peak = np.abs(want[name]).max()
            assert peak > 0, name
            np.testing.assert_allclose(got[name], want[name], rtol=2e-4, atol=1e-4 * peak,
                                       err_msg=f"step {step}: {name}")


# ---- layouts --------------------------------------------------------------------------------

def check_layout(sizes):
    want = one_device()
    got, opt_state, s = two_steps(small_config(), sizes)
    for step in range(2):
        for name, w in want[step].items():
            # float32 Newton-Schulz, its sums split and ordered otherwise
            np.testing.assert_allclose(got[step][name], w, rtol=1e-4,
                                       atol=3e-5 * np.abs(w).max(), err_msg=f"{step}: {name}")
    # Every moment lies as its parameter does (the live arrays, not only the plan).
    layout = {n: x.spec for n, x in flat_arrays(s.shardings["params"]).items()}
    moments = 0
    for name, x in flat_arrays(opt_state).items():
        param = re.sub(r"^.*\.(mu|nu)\.", "", name)
        if param in layout:
            assert x.sharding.spec == layout[param], name
            moments += 1
        else:  # step counts and Newton-Schulz coefficients
            assert x.size <= 3 * 2, name
    assert moments == 2 * 5 + 5  # AdamW's mu and nu of five leaves, Muon's mu of five


def flat_arrays(tree) -> dict:
    return {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_fsdp_expert_tensor_matches_one_device():
    check_layout({"fsdp": 2, "expert": 2, "tensor": 2})


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [
    {"expert": 8},
    {"fsdp": 8},
    {"data": 2, "tensor": 4},
    {"fsdp": 4, "tensor": 2},
    {"fsdp": 2, "expert": 4},
    {"data": 2, "fsdp": 2, "expert": 2},
    {"context": 2, "expert": 2, "tensor": 2},
], ids=lambda s: "x".join(f"{a}{n}" for a, n in s.items()))
def test_layouts_match_one_device(sizes):
    check_layout(sizes)


def test_experts_stay_split():
    """On expert=8 each device orthogonalizes its own expert: no collective of the update
    holds a whole layer's experts (optax merges a leaf's batch axes into one, which under the
    leading layer axis would gather them all; optim.over_layers keeps the experts leading)."""
    config = small_config()
    s = state.setup(config, parallel.make_mesh({"expert": 8}))
    abstract = s.abstract
    hlo = jax.jit(s.tx.update).lower(abstract["params"], abstract["opt_state"],
                                     abstract["params"]).compile().as_text()
    one_expert = 32 * 2 * 64  # elements of one expert's w_in
    for shape in re.findall(r"= f32\[([\d,]*)\][^ ]* (?:all-gather|all-to-all)\(", hlo):
        assert np.prod([int(d) for d in shape.split(",") if d]) < 8 * one_expert, shape


# ---- which optimizer trains what ------------------------------------------------------------

def labels_of(config) -> dict:
    config.model.vocab_size = config.model.vocab_size or 64
    config.train.optimizer = "muon"
    s = state.setup(config, parallel.make_mesh({}))
    return flat_labels(optim.labels(nnx.state(s.model)))


def flat_labels(tree) -> dict:
    return {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_tiny_leaves():
    layer = "stacks.0.blocks.0."
    want = {"embed": "adamw", "final_norm.scale": "adamw",
            **{layer + n: "muon_layers_2" for n in ("attn.q", "attn.kv", "attn.out",
                                                    "ffn.w_in", "ffn.w_out")},
            **{layer + n: "adamw" for n in ("attn_norm.scale", "ffn_norm.scale",
                                            "ffn.router")}}
    assert labels_of(tiny.get_config("smoke")) == want


def test_deepseek_v3_leaves():
    """MLA's five projections, dense and shared and routed FFNs, the MTP projection: Muon;
    the dense first layer's stack of 1 and the MoE stack of 3 apart, the MTP block unstacked.
    Embeddings, unembedding, norms, routers and their biases: AdamW."""
    got = labels_of(deepseek_v3.get_config("smoke"))
    attn = ("attn.q_down", "attn.q_up", "attn.kv_down", "attn.kv_up", "attn.out")
    muon = {**{f"stacks.0.blocks.0.{n}": "muon_layers_1" for n in attn
               + ("ffn.w_in", "ffn.w_out")},
            **{f"stacks.1.blocks.0.{n}": "muon_layers_3" for n in attn
               + ("ffn.w_in", "ffn.w_out", "ffn.shared_in", "ffn.shared_out")},
            **{f"mtp.0.block.{n}": "muon" for n in attn
               + ("ffn.w_in", "ffn.w_out", "ffn.shared_in", "ffn.shared_out")},
            "mtp.0.proj": "muon"}
    assert {n: v for n, v in got.items() if v != "adamw"} == muon
    adamw = sorted(n for n, v in got.items() if v == "adamw")
    assert adamw == sorted(["embed", "unembed", "final_norm.scale", "mtp.0.enorm.scale",
                            "mtp.0.hnorm.scale", "mtp.0.head_norm.scale"]
                           + [f"{b}.{n}" for b in ("stacks.0.blocks.0", "stacks.1.blocks.0",
                                                   "mtp.0.block")
                              for n in ("attn_norm.scale", "ffn_norm.scale",
                                        "attn.q_norm.scale", "attn.kv_norm.scale")]
                           + [f"{b}.ffn.{n}" for b in ("stacks.1.blocks.0", "mtp.0.block")
                              for n in ("router", "router_bias")])


def test_gpt_oss_biases_and_sinks_are_adamw():
    got = labels_of(gpt_oss_20b.get_config("smoke"))
    last = {n.rsplit(".", 1)[-1] for n, v in got.items() if v == "adamw"}
    assert last == {"embed", "unembed", "scale", "router", "router_logit_bias", "sinks",
                    "q_bias", "kv_bias", "out_bias", "in_bias"}


def test_a_parameter_without_a_rule_is_refused():
    params = {"gate_proj": nnx.Param(np.zeros((4, 4)), out_sharding=("embed", "mlp"),
                                     eager_sharding=False)}
    with pytest.raises(ValueError, match="no rule for parameter gate_proj"):
        optim.labels(nnx.State(params))


def test_config_values_checked():
    from moejax import config_lib

    for key, value in (("optimizer", "sgd"), ("muon_lr_scale", "spectral")):
        config = tiny.get_config("smoke")
        config.train[key] = value
        with pytest.raises(ConfigError, match=f"train.{key}='{value}': unknown"):
            config_lib.validate(config, 8)


# ---- training -------------------------------------------------------------------------------

@pytest.mark.slow  # three real runs; the update itself is checked fast above
def test_tiny_smoke_trains_and_resumes_exactly(tmp_path):
    """The real trainer with Muon: the loss falls, and a run stopped at step 4 and resumed
    from its checkpoint (Muon's momentum and AdamW's moments restored, the masked leaves
    neither saved nor lost) logs the same losses after it as the run that never stopped."""
    def run(workdir, stop_at=0):
        config = tiny.get_config("smoke")
        config.train.update(optimizer="muon", steps=8, stop_at=stop_at, eval_every=100,
                            ckpt_every=4)
        return train_and_evaluate(config, str(tmp_path / workdir))["train_loss"]

    straight = run("straight")
    assert straight[8] < straight[1] - 0.3, straight
    run("resumed", stop_at=4)
    resumed = run("resumed")
    for step in range(5, 9):
        np.testing.assert_allclose(resumed[step], straight[step], rtol=1e-6, err_msg=step)


# ---- the planner's view ---------------------------------------------------------------------

def test_newton_schulz_flops_by_hand():
    """tiny:smoke (d 32, 2 heads x 16, kv heads as many, 8 experts of f 64, 2 layers): per
    iteration an [m, n] matrix (m <= n) costs 4 m^2 n + 2 m^3."""
    config = small_config()
    s = state.setup(config, parallel.make_mesh({}))
    mc = config.model
    d, hd = mc.d_model, mc.num_heads * mc.head_dim
    kv = (mc.num_kv_heads or mc.num_heads) * mc.head_dim

    def one(a, b):
        m, n = sorted((a, b))
        return 5 * (4 * m * m * n + 2 * m ** 3)

    per_layer = (one(d, hd) + 2 * one(d, kv) + one(hd, d)
                 + mc.num_experts * (2 * one(d, mc.d_ff) + one(mc.d_ff, d)))
    assert optim.newton_schulz_flops(s.abstract["params"]) == mc.num_layers * per_layer


def test_planner_sees_the_experts_divided():
    """On expert=8 each device orthogonalizes its one expert of each layer and every attention
    matrix whole (split over expert as fsdp would: gathered): that share of Newton-Schulz's
    FLOPs (test_experts_stay_split: no expert crosses). On fsdp=8 every matrix is split
    inside: the update gathers at least each device's missing 7/8 of them, and each device
    does all the work."""
    from moejax.plan.estimate import optimizer_update

    config = small_config()
    everything = optim.newton_schulz_flops(state.setup(config, parallel.make_mesh({})).abstract[
        "params"])
    s = state.setup(config, parallel.make_mesh({"expert": 8}))
    u = optimizer_update(s)
    experts = nnx.State({"w_in": s.abstract["params"]["stacks"][0]["blocks"][0]["ffn"]["w_in"],
                         "w_out": s.abstract["params"]["stacks"][0]["blocks"][0]["ffn"]["w_out"]})
    ns_experts = optim.newton_schulz_flops(experts)
    assert u["newton_schulz_flops"] == everything
    assert u["per_device"] == everything - ns_experts + ns_experts // 8

    s = state.setup(config, parallel.make_mesh({"fsdp": 8}))
    u = optimizer_update(s)
    assert u["per_device"] == everything
    muon_bytes = sum(4 * x.size for n, x in flat_arrays(s.abstract["params"]).items()
                     if n.endswith(("q", "kv", "out", "w_in", "w_out")))
    assert u["collectives"]["all-gather"]["payload"] * 8 >= muon_bytes


def test_planner_state_bytes_under_muon():
    """Muon keeps one moment per matrix it trains, AdamW two for the rest: on one device,
    nu holds embed (64 x 32), the final norm (32), two norms (2 x 32) and a router (32 x 8)
    per layer, float32; mu every parameter; and the marked row is the state the step takes."""
    from moejax.run import params as params_lib
    from moejax.run.params import bytes_per_device

    config = small_config()
    s = state.setup(config, parallel.make_mesh({}))
    table = params_lib.precision_table(config, s)
    assert table["setting"]["optimizer"] == "muon"
    own = next(r for r in table["train"] if r["own"])["bytes"]
    every = sum(x.size for x in jax.tree.leaves(s.abstract["params"]))
    assert own["mu"] == 4 * every
    assert own["nu"] == 4 * (64 * 32 + 32 + 2 * (2 * 32 + 32 * 8))
    assert own["total"] == bytes_per_device(s.abstract) + own["grads"]


def test_planner_report_under_muon():
    from moejax.plan.estimate import plan
    from moejax.plan.report import report

    text = report(plan(small_config(), {"expert": 2, "fsdp": 2, "tensor": 2}))
    assert "verdict: Muon training fits 80 GiB" in text
    assert re.search(r"Muon: Newton-Schulz [\d.]+ GFLOP per step over all matrices; per "
                     r"device [\d.]+ GFLOP", text), text
