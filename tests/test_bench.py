"""The benchmarks: the layer one times whole forward + backward passes; the train one runs."""

import jax.numpy as jnp
import pytest

from configs import tiny
from moejax import bench
from moejax.moe.experts import ffn


def test_fwd_bwd_runs_every_matmul_of_forward_and_backward():
    tokens, d, f = 64, 128, 192
    w = {"w_in": jnp.ones((d, 2, f)), "w_out": jnp.ones((f, d))}  # swiglu: gate, linear
    x = jnp.ones((tokens, d))
    fn = bench.fwd_bwd(lambda w, x: ffn(x, w["w_in"], w["w_out"], "swiglu"))
    cost = fn.lower(w, x, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    forward_matmuls = 2 * tokens * (d * 2 * f + f * d)
    # Backward matmuls are twice the forward's; without the loss value XLA drops x @ w_out.
    assert 3.0 <= cost["flops"] / forward_matmuls < 3.05  # plus the elementwise ops


def test_ratio_is_the_median_of_per_round_ratios():
    # Rounds 1 and 3 ran under load; per round the first function takes 2x, 1x, 3x the second.
    # The ratio of the medians (4 / 3) would mix rounds; the per-round median is 2.
    assert bench.median_ratio([2.0, 4.0, 9.0], [1.0, 4.0, 3.0]) == 2.0


@pytest.mark.slow
def test_bench_train_steps_the_moe_and_its_dense_twin():
    # The states come from moejax.state, born in the config's layout over the 8 test devices;
    # the step donates its state, so each call must get the one the previous call returned.
    r = bench.bench_train(tiny.get_config("smoke"), steps=2)
    for name in ("moe", "dense"):
        assert r[name]["step_ms"] > 0 and r[name]["tokens_per_s"] > 0
    assert r["ratio"] > 0


def test_compile_bench_compiles_each_depth():
    config = tiny.get_config("smoke")
    times = bench.bench_compile(config, [1, 3])
    assert list(times) == [1, 3] and all(t > 0 for t in times.values())
