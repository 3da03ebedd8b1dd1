"""DeepSeek-V3's group-limited routing (issue 32, item 3) against a plain NumPy reference.

The experts form n_group groups of consecutive ids; a group ranks by the sum of its two best
selection scores (scores + bias); a token picks its k experts from its topk_group best groups,
the scores of the other groups set to 0.0 as transformers' DeepseekV3TopkRouter sets them.
Gates are the unbiased scores, renormalized if asked, then times routed_scaling_factor.
Ties, of groups and of experts, go to the lower id, as jax.lax.top_k breaks them (torch.topk,
which transformers calls with sorted=False, promises no order); the k choices come best first.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import cli, config_lib, parallel
from moejax.moe import router
from moejax.moe.layer import MoE, MoEConfig
from tests.test_layer import D, F, apply, place, tokens


def best(values, n):
    """Indices of the n largest values, largest first; ties: the lower index."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:n]


def reference_route(logits, k, *, score, bias, n_group, topk_group, renormalize, scale):
    """Token by token in float64, written for obviousness. Returns expert ids [T, k], gates
    [T, k] and how many tokens had a tie decide their groups or experts."""
    logits = np.asarray(logits, np.float64)
    num_tokens, num_experts = logits.shape
    if score == "softmax":
        e = np.exp(logits - logits.max(-1, keepdims=True))
        s = e / e.sum(-1, keepdims=True)
    else:
        s = 1.0 / (1.0 + np.exp(-logits))
    size = num_experts // n_group
    ids, gates, ties = [], [], 0
    for t in range(num_tokens):
        choice = [s[t, e] + (0.0 if bias is None else bias[e]) for e in range(num_experts)]
        group_scores = [sum(sorted(choice[g * size:(g + 1) * size], reverse=True)[:2])
                        for g in range(n_group)]
        kept = best(group_scores, topk_group)
        choice = [c if e // size in kept else 0.0 for e, c in enumerate(choice)]
        chosen = best(choice, k)
        ties += (tie_at(group_scores, topk_group) and n_group > topk_group) or tie_at(choice, k)
        g = np.array([s[t, e] for e in chosen])
        if renormalize:
            g = g / g.sum()
        ids.append(chosen)
        gates.append(g * scale)
    return np.array(ids), np.array(gates), ties


def tie_at(values, n):
    """Whether the n-th largest value equals the (n+1)-th: the order of ids decided."""
    ranked = sorted(values, reverse=True)
    return n < len(ranked) and ranked[n - 1] == ranked[n]


_route = jax.jit(router.route, static_argnums=(1, 2, 3, 4, 6, 7, 8))


def run_route(logits, k, *, score, bias, n_group, topk_group, renormalize, scale):
    r = _route(jnp.asarray(logits, jnp.float32), k, len(logits), renormalize, score,
               None if bias is None else jnp.asarray(bias, jnp.float32), n_group, topk_group,
               scale)
    return np.asarray(r.expert_ids), np.asarray(r.gates)


# (E, n_group, topk_group, k, score, bias, renormalize, routed_scaling_factor)
CONFIGS = [
    (8, 4, 2, 2, "sigmoid", False, False, 1.0),
    (8, 4, 2, 4, "sigmoid", True, True, 2.5),
    (16, 8, 4, 4, "sigmoid", True, True, 2.5),  # DeepSeek-V3's 256/8/4/8, scaled down
    (32, 8, 4, 8, "sigmoid", True, True, 2.5),
    (16, 4, 1, 4, "softmax", False, False, 1.0),  # k = every expert of the one kept group
    (12, 3, 2, 3, "softmax", True, True, 1.0),
    (12, 6, 5, 2, "sigmoid", False, True, 0.5),
    (8, 2, 2, 2, "sigmoid", True, False, 1.0),  # every group kept: no limit
    (8, 1, 1, 2, "softmax", False, False, 1.0),  # the default: no limit
]


def case_id(c):
    e, groups, kept, k, score, bias, renormalize, scale = c
    return (f"E{e}-n_group{groups}-topk_group{kept}-k{k}-{score}" + ("-bias" if bias else "")
            + ("-renorm" if renormalize else "") + (f"-scale{scale}" if scale != 1 else ""))


def draw(num_experts, n_group, with_bias, seed, tokens=256):
    """Logits on a grid of quarters (so tokens hold many equal scores), with whole groups
    copied onto the next one for a quarter of the tokens (so groups tie too). The grid is off
    0 by 0.1, so no two of its points are x and -x: sigmoid(x) + sigmoid(-x) = 1 would make
    ties that rounding breaks, differently in float32 and float64."""
    rng = np.random.default_rng(seed)
    logits = np.round(rng.normal(0, 1.5, (tokens, num_experts)) * 4) / 4 + 0.1
    size = num_experts // n_group
    if n_group > 1:
        logits[: tokens // 4, size:2 * size] = logits[: tokens // 4, :size]
    # A bias of few distinct values, some experts pushed below 0 (their selection score can
    # then lose to the 0.0 of a group that was not kept, as in transformers).
    bias = rng.choice([-1.2, 0.0, 0.2], num_experts) if with_bias else None
    if bias is not None and n_group > 1:
        bias[size:2 * size] = bias[:size]
    return logits.astype(np.float32), bias


class TestRouterEqualsReference:
    @pytest.mark.parametrize("config", CONFIGS, ids=case_id)
    def test_random_configurations(self, config):
        num_experts, n_group, topk_group, k, score, with_bias, renormalize, scale = config
        kw = dict(score=score, n_group=n_group, topk_group=topk_group, renormalize=renormalize,
                  scale=scale)
        logits, bias = draw(num_experts, n_group, with_bias, seed=num_experts + k)
        want_ids, want_gates, ties = reference_route(logits, k, bias=bias, **kw)
        ids, gates = run_route(logits, k, bias=bias, **kw)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(gates, want_gates, atol=1e-6, rtol=0)
        assert ties >= 4  # ties really decided choices
        if topk_group < n_group:  # and the limit did: without it some tokens choose others
            free = reference_route(logits, k, bias=bias, **{**kw, "n_group": 1, "topk_group": 1})
            assert (free[0] != want_ids).any(1).sum() >= 3

    @pytest.mark.parametrize("bias,want", [
        (None, [0, 1]),  # groups 0, 1, 2 tie; 0 and 1 (lower ids) kept; experts 0..3 tie
        (-1.0, [4, 5]),  # every biased score < 0: the 0.0 of groups 2 and 3 wins, as in HF
    ], ids=["ties-go-to-lower-ids", "bias-below-zero-loses-to-masked-0.0"])
    def test_by_hand(self, bias, want):
        logits = np.array([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, -5.0]], np.float32)
        bias = None if bias is None else np.full(8, bias)
        ids, gates = run_route(logits, 2, score="sigmoid", bias=bias, n_group=4, topk_group=2,
                               renormalize=False, scale=2.5)
        assert ids.tolist() == [want]
        np.testing.assert_allclose(gates, [[2.5 / (1 + np.exp(-1.0))] * 2], atol=1e-6)


def grouped_layer(dispatch, mesh=None):
    """16 experts in 4 groups, 2 kept, top-4, sigmoid, a selection bias, renormalized, x2.5."""
    cfg = MoEConfig(num_experts=16, top_k=4, capacity_factor=1.0, eval_capacity_factor=1.0,
                    min_capacity=1, renormalize=True, num_groups=8, dispatch=dispatch,
                    router_score="sigmoid", bias_rate=0.1, n_group=4, topk_group=2,
                    routed_scaling_factor=2.5)
    model = MoE(D, F, cfg, "swiglu", mesh=mesh, rngs=nnx.Rngs(0))
    model.router_bias[...] = jnp.linspace(-0.2, 0.2, 16)
    if mesh is not None:
        place(model, mesh)
    return model


class TestLayerOnAMesh:
    @pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
    def test_one_device_equals_fsdp2_expert4(self, dispatch):
        x = tokens()
        y0, aux0 = apply(grouped_layer(dispatch), x, train=True)
        mesh = parallel.make_mesh({"fsdp": 2, "expert": 4})
        xs = jax.device_put(x, parallel.token_sharding(mesh))
        y, aux = apply(grouped_layer(dispatch, mesh), xs, train=True)
        np.testing.assert_allclose(y, y0, atol=1e-5)
        for key in ("balance_loss", "z_loss", "dropped_frac", "tokens_per_expert"):
            np.testing.assert_allclose(aux[key], aux0[key], atol=1e-5, err_msg=key)
        if dispatch == "capacity":
            assert float(aux0["dropped_frac"]) > 0.05  # dropping is really exercised
        # The layer routes with the group limit: its load is the reference's choices counted,
        # which differ from those without the limit.
        model = grouped_layer(dispatch)
        logits = np.asarray(x, np.float64).reshape(-1, D) @ np.asarray(model.router[...])
        kw = dict(score="sigmoid", bias=np.asarray(model.router_bias[...], np.float64),
                  renormalize=True, scale=2.5)
        ids = reference_route(logits, 4, n_group=4, topk_group=2, **kw)[0]
        np.testing.assert_array_equal(aux0["tokens_per_expert"], np.bincount(ids.ravel(), None, 16))
        free = reference_route(logits, 4, n_group=1, topk_group=1, **kw)[0]
        assert (np.sort(free, 1) != np.sort(ids, 1)).any(1).mean() > 0.25


SMOKE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny.py:smoke")


class TestConfigChecks:
    """Refused in one line before anything compiles (configs/tiny.py:smoke: 8 experts, top-2)."""

    @pytest.mark.parametrize("overrides,error", [
        (["n_group=3"], "model.n_group=3: must divide num_experts=8 into groups of >= 2 "
         "experts (a group ranks by its two best); 1 = no group limit"),
        (["n_group=8"], "model.n_group=8: must divide num_experts=8 into groups of >= 2 "
         "experts (a group ranks by its two best); 1 = no group limit"),
        (["n_group=4", "topk_group=5"], "model.topk_group=5: must be in 1..model.n_group=4"),
        (["n_group=4", "topk_group=1", "top_k=3"], "model.top_k=3: must be at most topk_group "
         "x num_experts / n_group = 2 (the experts of the kept groups)"),
        (["routed_scaling_factor=0.0"], "model.routed_scaling_factor=0.0: must be > 0"),
        (["routing=experts", "n_group=2", "topk_group=1"], "model.routing='experts': allowed "
         "with model.n_group > 1 or routed_scaling_factor != 1: tokens (expert choice has "
         "neither)"),
    ], ids=["n_group=3-does-not-divide-8", "n_group=8-groups-of-one", "topk_group=5>n_group=4",
            "top_k=3>one-group-of-2", "routed_scaling_factor=0", "expert-choice-with-groups"])
    def test_refused(self, overrides, error):
        config = cli.load(SMOKE, [f"--config.model.{o}" for o in overrides])
        with pytest.raises(config_lib.ConfigError) as e:
            config_lib.validate(config, 8)
        assert str(e.value) == error

    def test_deepseek_v3_values_pass(self):
        config = cli.load(SMOKE, ["--config.model.num_experts=16", "--config.model.top_k=4",
                                  "--config.model.n_group=8", "--config.model.topk_group=4",
                                  "--config.model.routed_scaling_factor=2.5",
                                  "--config.model.router_score=sigmoid"])
        config_lib.validate(config, 8)
