"""The planner against what a real run on the 8 simulated CPU devices does."""

import ctypes
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from moejax import parallel
from moejax.plan import estimate
from moejax.plan.collectives import collective_bytes
from moejax.run import params, state
from moejax.run.params import bytes_per_device

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30


def config_with(variant=None, **overrides):
    config = tiny.get_config(variant)
    config.model.vocab_size = 257
    for key, value in overrides.items():
        group, name = key.split(".")
        config[group][name] = value
    return config


def rss_peak_reset() -> int:
    """Reset this process's peak RSS to its current RSS (Linux) and return that."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back first
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss()["VmRSS"]


def rss() -> dict:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def measured_step_memory(config, mesh, steps=2) -> tuple[int, int]:
    """Per-device peak memory of real train steps, state and step as train.py makes them: live
    bytes on device 0 before a step + growth of the process's peak RSS during it / devices,
    the largest over `steps` steps (a later step may reuse pages an earlier one left mapped).
    XLA:CPU keeps no allocator statistics; every simulated device lives in this process.
    Also returns the bytes of the state on device 0."""
    setup = state.setup(config, mesh)
    train_state = state.init(setup)
    shape = (config.data.batch_size, config.data.seq_len + 1)
    batch = jax.device_put(
        np.random.default_rng(0).integers(0, config.model.vocab_size, shape, np.int32),
        parallel.token_sharding(mesh))
    # One executable for every step: the state comes back in the layout it went in.
    compiled = state.train_step_fn(setup).lower(train_state, batch, jnp.int32(0)).compile()
    peak, state_bytes = 0, bytes_per_device(train_state)
    for step in range(steps):
        live = bytes_per_device(train_state) + bytes_per_device(batch)
        before = rss_peak_reset()
        train_state, metrics = compiled(train_state, batch, jnp.int32(step))
        jax.block_until_ready((train_state, metrics))
        peak = max(peak, live + (rss()["VmHWM"] - before) // mesh.size)
    return peak, state_bytes


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("mesh", [
    {"fsdp": 8}, pytest.param({"fsdp": 2, "expert": 4}, marks=pytest.mark.slow),
    pytest.param({"fsdp": 4, "expert": 2}, marks=pytest.mark.slow),  # 14-35 s each
], ids=["fsdp8", "fsdp2xep4", "fsdp4xep2"])
def test_planned_memory_within_10_percent_of_a_real_run(mesh):
    # One layer to compile fast, a batch of 256 so that activations, not the few MiB a real
    # process adds around them, make up most of the peak.
    config = config_with(**{"model.num_layers": 1, "data.batch_size": 256,
                            "mesh.data": 1})
    p = estimate.plan(config, mesh)
    measured, state_bytes = measured_step_memory(config, parallel.make_mesh(mesh))
    planned = p["memory"]["peak"]
    print(f"{parallel.describe(parallel.make_mesh(mesh))}: planned {planned / 2**20:.1f} MiB "
          f"per device (state {state_bytes / 2**20:.1f}), measured {measured / 2**20:.1f} "
          f"MiB ({(planned - measured) / measured:+.1%})")
    # The state is the same arrays either way: born in the layout the step keeps.
    assert p["state"]["params"] + p["state"]["opt_state"] == state_bytes
    assert abs(planned - measured) <= 0.10 * measured


def mesh_config(**overrides):
    # 8 groups of 64 tokens; cf 1.1 gives C = ceil(17.6) = 18, so rounding C up matters.
    return config_with("smoke", **{"model.num_experts": 8, "model.capacity_factor": 1.1,
                                   **overrides})


DATA_EP, FSDP_EP = {"data": 2, "expert": 4}, {"fsdp": 2, "expert": 4}


@pytest.mark.parametrize("mesh, overrides", [
    (DATA_EP, {}), (DATA_EP, {"model.dtype": "bfloat16"}), (DATA_EP, {"model.routing": "experts"}),
    (DATA_EP, {"model.dispatch": "dropless"}), (FSDP_EP, {}),
    (FSDP_EP, {"model.dispatch": "dropless"}),
], ids=["float32", "bfloat16", "expert_choice", "dropless", "fsdp_float32", "fsdp_dropless"])
def test_forward_all_to_all_moves_the_minimum(mesh, overrides):
    config = mesh_config(**overrides)
    setup = state.setup(config, parallel.make_mesh(mesh))
    tokens = jax.ShapeDtypeStruct((16, 33), jnp.int32,
                                  sharding=parallel.token_sharding(setup.mesh))

    def forward(params, tokens):
        return state.loss_fn(params, setup.graphdef, tokens, jax.random.key(0), config.train)[0]

    params = setup.abstract["params"]
    hlo = jax.jit(forward).lower(params, tokens).compile().as_text()
    moved = collective_bytes(hlo, 8)["all-to-all"]
    bound = estimate.alltoall_minimum(config, mesh)
    dropless = config.model.dispatch == "dropless"
    if dropless:  # XLA:CPU runs the ring instead: no all-to-all at all
        assert moved["count"] == bound["forward"] == 0
    else:
        assert bound["capacity"] == 18
        assert bound["forward"] > bound["moe_layers"] * bound["nominal_per_layer"]
        print(f"forward all-to-all {moved['payload'] * 8} B over all devices, "
              f"minimum {bound['forward']} B")
        assert moved["count"] == 2 * bound["moe_layers"]  # dispatch and return, every MoE layer
        assert moved["payload"] * 8 == bound["forward"]  # not a byte more or less: tight
    if dropless:  # a GPU runs ragged all-to-alls
        gpu = jax.jit(forward).trace(params, tokens).lower(
            lowering_platforms=("cuda",)).as_text()
        calls = re.findall(r"@ragged_all_to_all\(.*\} : \(tensor<(\d+)x(\d+)xf32>.*"
                           r"-> tensor<(\d+)x\d+xf32>", gpu)
        assert len(calls) == 2  # dispatch and return, in the body the MoE layers scan over
        # Out, the device's sorted rows; back, into a buffer of that size: every row once
        # each way (the other side is the receive buffer, sized for the worst case).
        rows = [min(int(sent), int(into)) for sent, _, into in calls]
        assert rows == [16 * 32 * 2 // 8] * len(calls)  # tokens x k / devices
        per_layer = sum(r * int(c[1]) * 4 for r, c in zip(rows, calls, strict=True)) * 8
        assert per_layer * bound["moe_layers"] == bound["ragged_forward"]


@pytest.mark.parametrize("mesh, remat", [(DATA_EP, "none"), (FSDP_EP, "none"), (FSDP_EP, "full")],
                         ids=["data2xep4", "fsdp2xep4", "fsdp2xep4_remat"])
def test_train_step_all_to_all_with_grad_accum(mesh, remat):
    config = mesh_config(**{"train.grad_accum": 2, "model.num_layers": 1,
                            "model.remat": remat})
    p = estimate.plan(config, mesh)
    moved, bound = p["collectives"]["all-to-all"], p["alltoall_min"]
    # 2 micro-batches in a loop x (dispatch + return) x (forward + backward, + the forward
    # again when remat recomputes it) per MoE layer
    assert bound["passes"] == (2 if remat == "none" else 3)
    assert moved["count"] == 2 * 2 * bound["passes"] * bound["moe_layers"]
    assert moved["payload"] * 8 == bound["step"]
    assert moved["wire"] == pytest.approx(moved["payload"] * 3 / 4)  # 1 of 4 blocks stays home


@pytest.mark.slow  # three compiles: 13 s of the fast suite's 10 minutes
def test_remat_policies_shrink_the_temporaries():
    # Sequences of 128 make activations most of the temporaries even at this size.
    config = config_with("smoke", **{"data.seq_len": 128, "data.batch_size": 8})
    temp = {}
    for remat in ("none", "matmuls", "full"):
        config.model.remat = remat
        temp[remat] = estimate.plan(config, {"data": 8})["memory"]["temp"]
    print({r: f"{t / 2**20:.2f} MiB" for r, t in temp.items()})
    assert temp["full"] < temp["matmuls"] < temp["none"]


def test_fit_is_arithmetic_on_the_plan():
    # 8 devices; per device 10 GiB of params (and as much gradient), 20 of moments, 10 more.
    rows = [{"bytes": {"total": t * GiB}} for t in (40, 35, 20)]
    p = {"state": {"params": 10 * GiB, "opt_state": 20 * GiB}, "state_global": 240 * GiB,
         "params_global": 80 * GiB, "memory": {"peak": 50 * GiB}, "precision": {"train": rows},
         "moments": 20 * GiB, "offload": False, "activation_offload": 0}
    f = estimate.fit(p, 40 * GiB)
    assert not f["fits"] and (f["sharded"], f["rest"]) == (40 * GiB, 10 * GiB)
    # remat=offload's layer inputs (in the compiled peak: XLA:CPU has no host memory apart)
    assert estimate.fit({**p, "activation_offload": 10 * GiB}, 40 * GiB)["fits"]
    assert f["devices"] == 11  # 320 GiB of state and gradients over N, next to 10: ceil(320 / 30)
    assert f["precision"] == [50 * GiB, 45 * GiB, 30 * GiB]  # each row's state + the rest
    # Offloaded: 30 GiB at rest, but the update holds params, gradients, old and new moments.
    assert f["offload_opt"] == 60 * GiB
    assert estimate.fit(p, 50 * GiB)["fits"]
    assert estimate.fit(p, 10 * GiB)["devices"] is None  # the rest alone fills it


def test_collective_bytes_reads_every_replica_group_form():
    hlo = """HloModule m
ENTRY %main (p: f32[4,8]) -> f32[4,8] {
  %p = f32[4,8]{1,0} parameter(0)
  %a = f32[4,8]{1,0} all-reduce(%p), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add
  %b = f32[4,8]{1,0} all-to-all(%a), channel_id=2, replica_groups={{0,1},{2,3}}
  %c = f32[4,8]{1,0} all-gather(%b), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}
  %d = f32[4,8]{1,0} all-reduce(%c), replica_groups={{0},{1},{2},{3}}, to_apply=%add
  %e = f32[4,8]{1,0} fusion(%d), kind=kLoop, calls=%narrowed
  ROOT %f = f32[4,8]{1,0} all-reduce(%e), replica_groups={{0,1}}, to_apply=%add
}
"""
    narrowed = """%narrowed (q: f32[4,8]) -> f32[4,8] {
  %q = f32[4,8]{1,0} parameter(0)
  %r = bf16[4,8]{1,0} convert(%q)
  %s = f32[4,8]{1,0} convert(%r)
  ROOT %t = f32[4,8]{0,1} copy(%s)
}
"""
    out = collective_bytes(narrowed + hlo, 8)
    # %d, over groups of one device, moves nothing; %f sends bf16 that XLA:CPU widened
    assert out["all-reduce"] == {"count": 2, "payload": 128 + 64, "wire": 128 * 2 * 3 / 4 + 64}
    assert out["all-to-all"] == {"count": 1, "payload": 128, "wire": 64}
    assert out["all-gather"] == {"count": 1, "payload": 128, "wire": 128 * 3}


@pytest.mark.slow  # a planner process: 12 s
def test_cli_prints_the_report():
    # 4 devices, not conftest's 8: the planner makes as many as --mesh needs, and the
    # config's data=-1 (the rest) is 1.
    out = subprocess.run(
        [sys.executable, "-m", "moejax.plan", "--config", "configs/tiny.py:smoke",
         "--mesh", "fsdp=2,expert=2", "--config.train.grad_accum=2"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for line in ["mesh data=1 x fsdp=2 x expert=2 x context=1 x tensor=1 (4 simulated devices)",
                 "parameters", "train FLOPs", "grad_accum 2", "optimizer state",
                 "activations and temporaries", "peak", "verdict: AdamW training fits 80 GiB",
                 "precision: params float32, moments mu float32 / nu float32, compute float32, "
                 "quantization none", "train state per device", "* params fp32, mu fp32, nu fp32",
                 "inference weights per device", "int4 weight-only", "experts 1/8.00 of fp32",
                 "all-to-all", "all-gather", "reduce-scatter", "per device, step (2 passes)"]:
        assert line in out.stdout, line
    assert re.search(r"compiled / minimum \(payload\) +1\.000\n", out.stdout)
    bad = subprocess.run([sys.executable, "-m", "moejax.plan", "--config",
                          "configs/tiny.py:smoke", "--mesh", "pipeline=2"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and bad.stderr.startswith("error: --mesh"), bad.stderr


# --- Bytes per device at each precision setting ---------------------------------------------

SMOKE_MESH = {"fsdp": 2, "expert": 4}


def smoke_elements() -> dict:
    """Per-device elements of tiny.py:smoke on fsdp=2 x expert=4, by hand from its sizes:
    experts split over expert and their d_model dim over fsdp; every other weight's d_model
    dim over fsdp and expert together (parallel.RULES)."""
    layers, d, f, e, heads, head_dim, vocab = 2, 32, 64, 8, 2, 16, 257
    fsdp, ep = 2, 4
    w_in = layers * e * d * 2 * f // (ep * fsdp)  # swiglu: [E, d, 2, f]
    w_out = layers * e * f * d // (ep * fsdp)
    router = layers * d * e // (fsdp * ep)
    other = (vocab * d + d  # tied embedding, final norm
             + layers * (d * 2 * heads * head_dim + 2 * heads * head_dim * d + 2 * d)
             ) // (fsdp * ep)
    return {"w_in": w_in, "w_out": w_out, "experts": w_in + w_out, "router": router,
            "other": other + router,
            # scales: the input dim of w_in (d) is split over fsdp: 16 per device, w_out's (f)
            # whole; a group of 128 covers either, so int4 has one per channel as int8 does.
            "channels": w_in // (d // fsdp) + w_out // f}


def precision_table(**overrides):
    config = config_with("smoke", **overrides)
    return params.precision_table(config, state.setup(config, parallel.make_mesh(SMOKE_MESH)))


def test_train_state_bytes_per_precision_by_hand():
    n = smoke_elements()
    total, router = n["experts"] + n["other"], n["router"]
    bf16 = (total - router) * 2 + router * 4  # the router stays float32
    table = precision_table()
    rows = {(r["params"], r["mu"]): r for r in table["train"]}
    assert len(rows) == 4 and [r["own"] for r in table["train"]] == [True, False, False, False]
    assert table["setting"] == {"params": "float32", "mu": "float32", "nu": "float32",
                                "compute": "float32", "quantization": "none",
                                "optimizer": "adamw"}
    counts = 8  # AdamW's and the schedule's int32 step counts
    for (p_dtype, mu_dtype), param_bytes in (
            (("float32", "float32"), 4 * total), (("float32", "bfloat16"), 4 * total),
            (("bfloat16", "float32"), bf16), (("bfloat16", "bfloat16"), bf16)):
        b = rows[p_dtype, mu_dtype]["bytes"]
        mu = total * (4 if mu_dtype == "float32" else 2)
        assert b == {"params": param_bytes, "grads": param_bytes, "mu": mu, "nu": param_bytes,
                     "rest": counts, "total": 3 * param_bytes + mu + counts}
        # bf16 mu halves mu exactly and nothing else
        if mu_dtype == "bfloat16":
            full = rows[p_dtype, "float32"]["bytes"]
            assert 2 * b["mu"] == full["mu"] and b["total"] == full["total"] - b["mu"]


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("moment_dtype", ["float32", "bfloat16"])
def test_marked_row_is_the_state_the_step_takes(param_dtype, moment_dtype):
    config = config_with("smoke", **{"model.param_dtype": param_dtype,
                                     "train.moment_dtype": moment_dtype})
    setup = state.setup(config, parallel.make_mesh(SMOKE_MESH))
    marked = [r for r in params.precision_table(config, setup)["train"] if r["own"]]
    assert [(r["params"], r["mu"]) for r in marked] == [(param_dtype, moment_dtype)]
    mu, nu = params.adam_moments(setup.abstract["opt_state"])
    b = marked[0]["bytes"]
    assert (b["params"], b["mu"], b["nu"]) == (bytes_per_device(setup.abstract["params"]),
                                               bytes_per_device(mu), bytes_per_device(nu))
    assert b["total"] == bytes_per_device(setup.abstract) + b["grads"]


def test_inference_bytes_per_precision_by_hand():
    n = smoke_elements()
    other_bf16 = (n["other"] - n["router"]) * 2 + n["router"] * 4
    table = precision_table(**{"model.param_dtype": "bfloat16"})
    rows = {r["name"]: r for r in table["inference"]}
    assert [r["name"] for r in table["inference"] if r["own"]] == ["bfloat16"]
    assert rows["float32"]["bytes"] == {"experts": 4 * n["experts"], "scales": 0,
                                        "other": 4 * n["other"], "total": 4 * (n["experts"]
                                                                              + n["other"])}
    fp32 = rows["float32"]["bytes"]["experts"]
    assert fp32 % 8 == 0  # so that // below is exact division
    for name, experts, scales in (("bfloat16", fp32 // 2, 0),
                                  ("int8", fp32 // 4, n["channels"] * 4),  # fp32 per channel
                                  ("int4", fp32 // 8, n["channels"] * 4)):  # fp32 per group
        assert rows[name]["bytes"] == {"experts": experts, "scales": scales,
                                       "other": other_bf16,
                                       "total": experts + scales + other_bf16}, name


def test_scales_per_group_of_128_inputs():
    mesh = parallel.make_mesh(SMOKE_MESH)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert", "fsdp"))
    # [E, d, 2, f]: one device holds [2, 256, 2, 256], its input slice two groups long
    w = jax.ShapeDtypeStruct((8, 512, 2, 256), jnp.float32, sharding=sharding)
    assert params.scale_elements([(w, 1)], "int8") == 2 * 2 * 256
    assert params.scale_elements([(w, 1)], "int4") == 2 * 2 * 256 * 2
    assert params.bytes_per_device([w], 4) == 2 * 256 * 2 * 256 // 2


def test_start_up_report_states_the_dtypes():
    config = config_with("smoke", **{"model.dtype": "bfloat16"})
    setup = state.setup(config, parallel.make_mesh(SMOKE_MESH))
    # The abstract state has the dtypes and sizes the live one has, without compiling init.
    assert params.precision_line(config, setup.abstract) == (
        "precision: params float32, moments mu float32 / nu float32, compute bfloat16, "
        "quantization none")
    bf16 = state.setup(config_with("smoke", **{"model.param_dtype": "bfloat16"}), setup.mesh)
    # the router's 2 x 32 x 8 of 115,392 elements stay float32
    assert params.dtype_mix(bf16.abstract["params"]) == "bfloat16 (float32: 0.44%)"
