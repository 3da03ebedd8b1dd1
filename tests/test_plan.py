"""The planner against what a real run on the 8 simulated CPU devices does."""

import ctypes
import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from moejax import parallel, plan, train
from moejax.model import Transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def measured_step_memory(config, mesh, steps=2) -> list[int]:
    """Per-device memory of real train steps, state and step as train.py makes them: live bytes
    on device 0 before the step + growth of the process's peak RSS during the step / devices.
    (XLA:CPU keeps no allocator statistics; every simulated device lives in this process.)"""
    mc = config.model
    tx, lr = train.make_optimizer(config.train)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(mc, mesh=mesh,
                                                               rngs=nnx.Rngs(config.seed))))
    state = train.init_state(config, mesh, tx)
    shape = (config.data.batch_size, config.data.seq_len + 1)
    batch = jax.device_put(np.random.default_rng(0).integers(0, mc.vocab_size, shape, np.int32),
                           parallel.token_sharding(mesh))
    step_fn = jax.jit(functools.partial(train.train_step, graphdef=graphdef, tx=tx, lr=lr,
                                        config=config), donate_argnums=0)
    out = []
    for step in range(steps):
        compiled = step_fn.lower(state, batch, jnp.int32(step)).compile()  # not measured
        live = train.bytes_on_device(state) + train.bytes_on_device(batch)
        before = rss_peak_reset()
        state, metrics = compiled(state, batch, jnp.int32(step))
        jax.block_until_ready((state, metrics))
        out.append(live + (rss()["VmHWM"] - before) // mesh.size)
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_planned_memory_within_15_percent_of_a_real_run():
    # One layer to compile fast, a batch of 128 so that activations, not the few MiB a real
    # process adds around them, make up most of the peak.
    config = config_with(**{"model.num_layers": 1, "data.batch_size": 128})
    p = plan.plan(config, (2, 4))
    first, later = measured_step_memory(config, parallel.make_mesh(2, 4))
    planned_first, planned = p["memory"]["first_step_peak"], p["memory"]["peak"]
    print(f"per device: planned {planned / 2**20:.1f} MiB, measured {later / 2**20:.1f} MiB "
          f"(first step: planned {planned_first / 2**20:.1f}, measured {first / 2**20:.1f})")
    assert planned_first > planned  # train.py's first step runs on a replicated optimizer state
    assert abs(planned - later) <= 0.15 * later
    assert abs(planned_first - first) <= 0.15 * first


def mesh_config(**overrides):
    # 8 groups of 64 tokens; cf 1.1 gives C = ceil(17.6) = 18, so rounding C up matters.
    return config_with("smoke", **{"model.num_experts": 8, "model.capacity_factor": 1.1,
                                   **overrides})


@pytest.mark.filterwarnings("ignore:dropless MoE")  # it runs at C = group size, as warned
@pytest.mark.parametrize("overrides", [{}, {"model.dtype": "bfloat16"},
                                       {"model.routing": "experts"}, {"model.dropless": True}],
                         ids=["float32", "bfloat16", "expert_choice", "dropless"])
def test_forward_all_to_all_moves_the_minimum(overrides):
    config = mesh_config(**overrides)
    mesh = parallel.make_mesh(2, 4)
    model, state, _, _ = plan.abstract_state(config, mesh)
    tokens = jax.ShapeDtypeStruct((16, 33), jnp.int32, sharding=parallel.token_sharding(mesh))

    def forward(params, tokens):
        return train.loss_fn(params, nnx.graphdef(model), tokens, jax.random.key(0),
                             config.train)[0]

    hlo = jax.jit(forward).lower(state["params"], tokens).compile().as_text()
    moved = plan.collective_bytes(hlo, 8)["all-to-all"]
    bound = plan.alltoall_minimum(config, 8)
    if not config.model.dropless:  # dropless: C = all 64 tokens of a group
        assert bound["capacity"] == 18
    assert bound["forward"] > bound["moe_layers"] * bound["nominal_per_layer"]
    print(f"forward all-to-all {moved['payload'] * 8} B over all devices, "
          f"minimum {bound['forward']} B")
    assert moved["count"] == 2 * bound["moe_layers"]  # dispatch and return, every MoE layer
    assert moved["payload"] * 8 <= bound["forward"]
    assert moved["payload"] * 8 == bound["forward"]  # and not a byte less: the bound is tight
    if config.model.dropless:  # a GPU runs ragged all-to-alls instead
        gpu = jax.jit(forward).trace(state["params"], tokens).lower(
            lowering_platforms=("cuda",)).as_text()
        calls = re.findall(r"@ragged_all_to_all\(.*\} : \(tensor<(\d+)x(\d+)xf32>.*"
                           r"-> tensor<(\d+)x\d+xf32>", gpu)
        assert len(calls) == 2 * bound["moe_layers"]
        # Out, the device's sorted rows; back, into a buffer of that size: every row once
        # each way (the other side is the receive buffer, sized for the worst case).
        rows = [min(int(sent), int(into)) for sent, _, into in calls]
        assert rows == [16 * 32 * 2 // 8] * len(calls)  # tokens x k / devices
        assert sum(r * int(c[1]) * 4 for r, c in zip(rows, calls, strict=True)) * 8 == \
            bound["ragged_forward"]


def test_train_step_all_to_all_with_grad_accum():
    p = plan.plan(mesh_config(**{"train.grad_accum": 2, "model.num_layers": 1}), (2, 4))
    moved, bound = p["collectives"]["all-to-all"], p["alltoall_min"]
    # 2 micro-batches in a while loop x (dispatch + return) x (forward + backward) per layer
    assert moved["count"] == 2 * 2 * 2 * bound["moe_layers"]
    assert moved["payload"] * 8 == bound["step"]
    assert moved["wire"] == pytest.approx(moved["payload"] * 3 / 4)  # 1 of 4 blocks stays home


def test_collective_bytes_reads_both_replica_group_forms():
    hlo = """HloModule m
ENTRY %main (p: f32[4,8]) -> f32[4,8] {
  %p = f32[4,8]{1,0} parameter(0)
  %a = f32[4,8]{1,0} all-reduce(%p), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add
  ROOT %b = f32[4,8]{1,0} all-to-all(%a), channel_id=2, replica_groups={{0,1},{2,3}}
}
"""
    out = plan.collective_bytes(hlo, 8)
    assert out["all-reduce"] == {"count": 1, "payload": 128, "wire": 128 * 2 * 3 / 4}
    assert out["all-to-all"] == {"count": 1, "payload": 128, "wire": 64}


def test_parse_mesh():
    assert plan.parse_mesh("data=16,expert=16") == {"data": 16, "expert": 16}
    with pytest.raises(ValueError):
        plan.parse_mesh("data=x")


def test_cli_prints_the_report():
    # 4 devices, not conftest's 8: the planner sets the device count from --mesh.
    out = subprocess.run(
        [sys.executable, "-m", "moejax.plan", "--config", "configs/tiny.py:smoke",
         "--mesh", "data=2,expert=2", "--config.train.grad_accum=2"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for line in ["mesh data=2 x expert=2 (4 simulated devices)", "parameters", "train FLOPs",
                 "grad_accum 2", "peak, every step after the first", "all-to-all",
                 "all-reduce", "per device, forward + backward"]:
        assert line in out.stdout, line
    assert re.search(r"compiled / minimum \(payload\) +1\.000\n", out.stdout)
