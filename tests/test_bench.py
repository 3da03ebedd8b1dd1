"""The benchmarks: the layer one times whole forward + backward passes; the train one runs
every MoE path asked for beside the dense twin and reports MFU against the model's FLOPs."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import moe_1b, tiny
from moejax import bench, parallel
from moejax.config_lib import ConfigError
from moejax.moe import router
from moejax.moe.ffn import ffn
from moejax.moe.layer import MoE, MoEConfig
from moejax.run import state

# tiny.py:smoke by hand: d_model 32, 2 layers of 2 heads x 16, d_ff 64, 8 experts, top-2,
# byte vocabulary (257, tied), sequences of 32, batch 16.
SMOKE_ATTN = 2 * 32 * 16 + 2 * 2 * 32 * 16 + 2 * 16 * 32  # q, k and v, out
SMOKE_LAYER = SMOKE_ATTN + 2 * 32 + 32 * 8 + 2 * (32 * 2 * 64 + 64 * 32)  # norms, router, 2 of 8
SMOKE_ACTIVE = 257 * 32 + 32 + 2 * SMOKE_LAYER  # embedding, final norm, layers
SMOKE_DENSE = 257 * 32 + 32 + 2 * (SMOKE_ATTN + 2 * 32 + 32 * 2 * 128 + 128 * 32)


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


def smoke_model(num_experts=8):
    c = bench.resolve(tiny.get_config("smoke"))
    c.model.num_experts = num_experts
    return c, state.setup(c, parallel.make_mesh(parallel.mesh_sizes(c.mesh, 1))).model


def test_train_numbers_match_a_hand_computation():
    config, model = smoke_model()
    config.train.peak_tflops = 0.001  # 1 GFLOP/s per device
    r = bench.train_numbers(config, model, step_s=0.5, num_devices=8, device_kind="cpu")
    assert SMOKE_ACTIVE == 41_664 and r["active_params"] == SMOKE_ACTIVE
    # 6 per active matmul weight (the tied embedding once, as the output projection) plus
    # causal attention, 6 x layers x heads x head_dim x seq_len; 16 x 32 tokens per step.
    flops_per_step = (6 * SMOKE_ACTIVE + 6 * 2 * 2 * 16 * 32) * 16 * 32
    assert flops_per_step == 134_283_264
    assert r["step_ms"] == pytest.approx(500.0)
    assert r["tokens_per_s"] == pytest.approx(1024.0)
    assert r["tflops_per_device"] == pytest.approx(flops_per_step / 0.5 / 8 / 1e12)
    assert r["mfu"] == pytest.approx(0.033570816)  # 33.57 GFLOP/s of 1 per device
    config.train.peak_tflops = 0.0  # the table then: an H200, 989 TFLOP/s; a CPU, none
    h200 = bench.train_numbers(config, model, 0.5, 8, "NVIDIA H200")
    assert h200["mfu"] == pytest.approx(flops_per_step / 0.5 / (8 * 989e12))
    assert bench.train_numbers(config, model, 0.5, 8, "cpu")["mfu"] is None


def fake_steps(monkeypatch):
    """bench_train without compiling a step: records each state's config; a step takes ~1 ms."""
    seen = []

    def stepping(s):
        seen.append(s.config)
        return lambda tokens, step: jax.block_until_ready(jnp.zeros(()) + step)

    monkeypatch.setattr(bench, "stepping", stepping)
    return seen


def test_bench_train_has_one_row_per_dispatch_and_routing_and_the_dense_twin(monkeypatch):
    seen = fake_steps(monkeypatch)
    r = bench.bench_train(tiny.get_config("smoke"), 2, ["capacity", "dropless"])
    assert list(r) == ["moe:capacity/natural", "moe:capacity/balanced", "moe:dropless/natural",
                       "moe:dropless/balanced", "dense"]
    assert [(c.model.num_experts, c.model.dispatch, c.model.routing) for c in seen] == [
        (8, "capacity", "tokens"), (8, "capacity", "balanced"), (8, "dropless", "tokens"),
        (8, "dropless", "balanced"), (0, "capacity", "tokens")]
    assert [row["active_params"] for row in r.values()] == [SMOKE_ACTIVE] * 4 + [SMOKE_DENSE]
    assert r["dense"]["vs_dense"] == 1.0 and all(row["mfu"] is None for row in r.values())
    assert [row["routing"] for row in r.values()] == ["natural", "balanced"] * 2 + [None]
    # The imbalance tax: natural's median per-round step time over balanced's, where both ran.
    assert [name for name, row in r.items() if "vs_balanced" in row] == [
        "moe:capacity/natural", "moe:dropless/natural"]
    assert all(row["vs_balanced"] > 0 for row in r.values() if "vs_balanced" in row)
    # The default: the config's own dispatch, both routings; or one routing asked for.
    assert list(bench.bench_train(tiny.get_config("smoke"), 1)) == [
        "moe:capacity/natural", "moe:capacity/balanced", "dense"]
    only = bench.bench_train(tiny.get_config("smoke"), 1, routings=["balanced"])
    assert list(only) == ["moe:capacity/balanced", "dense"]
    assert "vs_balanced" not in only["moe:capacity/balanced"]


def run_main(monkeypatch, capsys, *argv) -> str:
    monkeypatch.setattr(bench.hostmem, "keep_freed_memory", lambda: False)  # this process's
    monkeypatch.setattr("sys.argv", ["bench", *argv])
    bench.main()
    return capsys.readouterr().out


def test_bench_train_prints_mfu_na_without_a_peak_and_takes_overrides(monkeypatch, capsys):
    fake_steps(monkeypatch)
    out = run_main(monkeypatch, capsys, "train", "--config", "configs/tiny.py:smoke",
                   "--dispatch=capacity,dropless", "--repeats", "2", "--batch_size",
                   "8", "--seq_len", "16", "--vocab_size", "300")
    lines = out.splitlines()
    assert lines[0].startswith("device: cpu x8;")
    assert "batch 8 x 16 tokens, vocab 300, median of 2 steps" in lines[0]
    assert lines[1].startswith("MFU n/a")
    assert lines[2].split() == ["model", "routing", "active", "M", "step", "ms", "tokens/s",
                                "TFLOP/s/dev", "MFU", "/", "dense"]
    rows = [line.split() for line in lines[3:8]]
    assert [row[:2] for row in rows] == [
        ["moe:capacity", "natural"], ["moe:capacity", "balanced"], ["moe:dropless", "natural"],
        ["moe:dropless", "balanced"], ["dense", "-"]]
    assert all(row[6] == "n/a" for row in rows)
    # 300 x 32 more embedding weights than the byte vocabulary's 257.
    assert float(rows[0][2]) == pytest.approx((SMOKE_ACTIVE + 43 * 32) / 1e6, abs=5e-6)
    tax = lines[8:]
    assert [line.split(": natural")[0] for line in tax] == [
        "imbalance tax, moe:capacity", "imbalance tax, moe:dropless"]
    assert all(re.fullmatch(r"imbalance tax, moe:\w+: natural routing's step takes "
                            r"\d+\.\d\dx the forced-balanced one's", line) for line in tax)


def test_bench_train_reads_the_default_config_with_config_overrides(monkeypatch, capsys):
    seen = fake_steps(monkeypatch)
    out = run_main(monkeypatch, capsys, "train", "--config.model.num_experts=4",
                   "--config.model.num_layers=2", "--repeats=1")
    assert "; configs/tiny.py: batch" in out.splitlines()[0]  # the default, overridden
    assert [(c.model.num_experts, c.model.num_layers) for c in seen] == [(4, 2)] * 2 + [(0, 2)]


def test_vocab_is_the_byte_tokenizers_or_given():
    assert bench.resolve(tiny.get_config("smoke")).model.vocab_size == 257
    with pytest.raises(ConfigError, match="--vocab_size"):  # gpt2's size is not guessed
        bench.resolve(moe_1b.get_config())
    c = bench.resolve(moe_1b.get_config(), vocab=50257, batch_size=8, seq_len=1024)
    assert (c.model.vocab_size, c.data.batch_size, c.data.seq_len) == (50257, 8, 1024)


def test_bench_train_without_the_vocab_it_needs_exits_with_one_line(monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, capsys, "train", "--config", "configs/moe_1b.py")
    message = str(e.value.code)
    assert "\n" not in message and message.startswith("error: configs/moe_1b.py: ")
    assert "tokenizer 'gpt2'" in message and message.endswith("pass --vocab_size N")


def test_layer_bench_bf16_dropless_row(monkeypatch, capsys):
    dtypes = {}  # each timed function's activations
    round_robin = bench.round_robin

    def spy(fns, repeats):
        dtypes.update({name: str(args[1].dtype) for name, (fn, args) in fns.items()})
        return round_robin(fns, repeats)

    monkeypatch.setattr(bench, "round_robin", spy)
    out = run_main(monkeypatch, capsys, "layer", "--experts", "4", "--tokens", "64",
                   "--d_model", "16", "--d_ff", "32", "--repeats", "1", "--dtype", "bfloat16",
                   "--dispatch=dropless")
    assert dtypes == {"moe": "bfloat16", "dense": "bfloat16"}  # no expert buffers to time
    header, columns, row = out.splitlines()
    assert header.endswith("fwd+bwd, bfloat16, median of 1")
    assert columns.split()[-1] == "dispatch"
    e, c, moe_ms, experts_ms, dense_ms, ratio, routing, dispatch = row.split()
    assert (e, dispatch) == ("4", "dropless")
    assert c == experts_ms == routing == "-"  # no capacity, no buffers, so no routing share
    assert float(moe_ms) > 0 and float(dense_ms) > 0 and float(ratio) > 0


def test_layer_table_has_a_row_per_expert_count_and_dispatch(monkeypatch, capsys):
    def bench_layer(e, tokens, d_model, d_ff, top_k, cf, repeats, dispatch, dtype):
        # What bench_layer returns, without the seconds of compiling.
        if dispatch == "dropless":
            return {"E": e, "C": None, "moe": 3.0, "experts": None, "dense": 2.0, "ratio": 1.5,
                    "routing": None}
        return {"E": e, "C": 10 * e, "moe": 3.0, "experts": 2.5, "dense": 2.0, "ratio": 1.5,
                "routing": 0.25}

    monkeypatch.setattr(bench, "bench_layer", bench_layer)
    columns = (f"{'E':>5} {'C':>5} {'moe ms':>9} {'experts ms':>11} {'dense ms':>9} "
               f"{'ratio':>6} {'routing':>8}")
    # The default (capacity, float32) keeps the columns the CPU regression guard reads.
    out = run_main(monkeypatch, capsys, "layer", "--experts=8,64")
    assert out.splitlines()[1:] == [columns, f"{8:>5} {80:>5} {3.0:>9.1f} {2.5:>11.1f} "
                                    f"{2.0:>9.1f} {1.5:>6.2f} {0.25:>8.2f}",
                                    f"{64:>5} {640:>5} {3.0:>9.1f} {2.5:>11.1f} "
                                    f"{2.0:>9.1f} {1.5:>6.2f} {0.25:>8.2f}"]
    out = run_main(monkeypatch, capsys, "layer", "--experts=8,64",
                   "--dispatch=capacity,dropless")
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [(r[0], r[1], r[-1]) for r in rows] == [
        ("8", "80", "capacity"), ("8", "-", "dropless"),
        ("64", "640", "capacity"), ("64", "-", "dropless")]


@pytest.mark.slow
def test_bench_train_steps_each_moe_path_and_its_dense_twin():
    # The states come from moejax.state, born in the config's layout over the 8 test devices;
    # the step donates its state, so each call must get the one the previous call returned.
    r = bench.bench_train(tiny.get_config("smoke"), steps=2, dispatches=["capacity", "dropless"])
    assert list(r) == ["moe:capacity/natural", "moe:capacity/balanced", "moe:dropless/natural",
                       "moe:dropless/balanced", "dense"]
    for row in r.values():
        assert row["step_ms"] > 0 and row["tokens_per_s"] > 0 and row["tflops_per_device"] > 0
        assert row["vs_dense"] > 0


def test_compile_bench_compiles_each_depth():
    config = tiny.get_config("smoke")
    times = bench.bench_compile(config, [1, 3])
    assert list(times) == [1, 3] and all(t > 0 for t in times.values())


def test_bench_train_routing_flag_takes_one_and_refuses_others_in_one_line(monkeypatch,
                                                                          capsys):
    seen = fake_steps(monkeypatch)
    out = run_main(monkeypatch, capsys, "train", "--config", "configs/tiny.py:smoke",
                   "--routing=balanced", "--repeats=1")
    assert [line.split()[:2] for line in out.splitlines()[3:]] == [
        ["moe:capacity", "balanced"], ["dense", "-"]]  # no natural row, so no tax line
    assert [c.model.routing for c in seen] == ["balanced", "tokens"]
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, capsys, "train", "--routing=natural,even")
    message = str(e.value.code)
    assert "\n" not in message and "--routing" in message
    assert "allowed: comma-separated of natural, balanced" in message


@pytest.mark.parametrize("num_tokens, k, num_experts", [(16, 2, 8), (12, 3, 6), (8, 1, 8),
                                                        (64, 8, 256)])
def test_balanced_ids_give_every_expert_the_same_load(num_tokens, k, num_experts):
    ids = np.asarray(router.balanced_ids(num_tokens, k, num_experts))
    # Token t: (t * k + j) mod E, by hand for the first tokens of (16, 2, 8): [0 1] [2 3] ...
    assert ids[:, 0].tolist() == [t * k % num_experts for t in range(num_tokens)]
    assert all(len(set(row)) == k for row in ids.tolist())  # k distinct experts per token
    counts = np.bincount(ids.reshape(-1), minlength=num_experts)
    want = num_tokens * k // num_experts if num_tokens * k >= num_experts else None
    if want:  # 64 tokens x 8 over 256 experts: 2 each; fewer assignments than experts: 0 or 1
        assert counts.tolist() == [want] * num_experts
    else:
        assert set(counts.tolist()) <= {0, 1}


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_balanced_routing_loads_every_expert_equally_and_drops_nothing(dispatch):
    """model.routing=balanced in the MoE layer: 4 groups of 32 tokens, top-2 of 8 experts, so
    each expert gets exactly 4 x 32 x 2 / 8 = 32 assignments, and none is past capacity (1.0
    x 32 x 2 / 8 = 8 slots per group); gates are still the router's scores (a gradient)."""
    cfg = MoEConfig(num_experts=8, top_k=2, capacity_factor=1.0, min_capacity=1, num_groups=4,
                    dispatch=dispatch, routing="balanced")
    layer = MoE(16, 32, cfg, "swiglu", mesh=None, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (8, 16, 16))

    def loss(m, x):
        y, aux = m(x, train=True)
        return jnp.sum(y**2), aux

    (_, aux), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(layer, x)
    assert np.asarray(aux["tokens_per_expert"]).tolist() == [32] * 8
    assert float(aux["dropped_frac"]) == 0.0
    assert float(aux["balance_loss"]) == pytest.approx(1.0, abs=1e-5)  # E x sum_e P_e / E
    assert float(jnp.abs(grads.router[...]).sum()) > 0
