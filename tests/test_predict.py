"""plan --target (moejax/plan/predict.py): each part of the predicted step by hand, which
link a collective crosses, and planted changes moving the prediction the right way."""

import dataclasses
import functools

import numpy as np
import pytest

from configs import tiny
from moejax.config_ranges import ConfigError
from moejax.plan import attention_cost, estimate, hardware, predict
from moejax.plan.collectives import first_group
from moejax.plan.load import dropped_at_least, read_load

H100 = hardware.TARGETS["h100"]


def test_first_group_of_every_replica_group_form():
    assert first_group("replica_groups=[2,4]<=[8], to_apply=%add", 8) == [0, 1, 2, 3]
    # [2,4] transposed: groups are the columns of [[0..3], [4..7]]
    assert first_group("replica_groups=[4,2]<=[2,4]T(1,0), x", 8) == [0, 4]
    assert first_group("replica_groups={{2,3},{0,1}}", 8) == [2, 3]
    assert first_group("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}", 8) == [0, 4]
    assert first_group("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}", 8) == [0, 1, 2, 3]
    assert first_group("replica_groups={}", 4) == [0, 1, 2, 3]


def test_a_collective_inside_a_node_takes_nvlink_one_across_nodes_the_network():
    records = [{"op": "all-gather", "count": 2, "payload": 0, "wire": 450e9, "group": [0, 7]},
               {"op": "all-to-all", "count": 1, "payload": 0, "wire": 50e9, "group": [0, 8]}]
    mesh = {"data": 1, "fsdp": 2, "expert": 8, "context": 1, "tensor": 1}
    t = predict.collective_times(records, H100, mesh)
    lat = predict.COLLECTIVE_LATENCY_S
    assert t["all-gather", "overlapped"] == {"scale-up": 1.0 + 2 * lat, "scale-out": 0.0}
    assert t["all-to-all", "exposed"] == {"scale-up": 0.0, "scale-out": 1.0 + lat}


def test_tensor_collectives_are_exposed_fsdp_ones_overlapped():
    """On fsdp 2 x expert 2 x tensor 2 (ids row-major, tensor innermost): a group {0, 1}
    varies tensor, {0, 4} fsdp, {0, 2} expert."""
    mesh = {"data": 1, "fsdp": 2, "expert": 2, "context": 1, "tensor": 2}
    assert predict.axes_of([0, 1], mesh) == {"tensor"}
    assert predict.axes_of([0, 4], mesh) == {"fsdp"}
    assert predict.axes_of([0, 2, 4, 6], mesh) == {"fsdp", "expert"}

    def rec(op, group):
        return {"op": op, "group": group}

    assert not predict.overlapped(rec("all-reduce", [0, 1]), mesh)
    assert predict.overlapped(rec("all-reduce", [0, 4]), mesh)
    assert predict.overlapped(rec("all-gather", [0, 2, 4, 6]), mesh)
    assert not predict.overlapped(rec("all-to-all", [0, 2]), mesh)


def synthetic(**changes) -> dict:
    """A plan as estimate.plan returns it, by hand: 8 devices, 1M tokens, 1 GFLOP per token."""
    p = {"devices": 8, "tokens_per_step": 2**20, "flops_per_token": 1e9, "remat": "full",
         "grad_accum": 1, "steps": 1000, "state": {"params": 2e9, "opt_state": 4e9},
         "activation_offload": 0, "layer_inputs": 3e9,
         "model": {"expert_active": 1e8, "layers": 10, "d_model": 1000, "act_bytes": 2,
                   "quantization": "none", "attention_flops_per_token": 1e8, "moe_layers": 5,
                   "head_dim": 128, "attention_padding": 1.0, "num_heads": 8,
                   "seq_len": 4096, "attention_sinks": False, "documents": False,
                   "num_experts": 64, "top_k": 4,
                   "d_ff": 500, "dropless": False},
         "mesh": {"data": 1, "fsdp": 1, "expert": 8, "context": 1, "tensor": 1},
         "alltoall_min": {"dropless": False, "effective_cf": 1.25, "ragged_forward": 0,
                          "expert": 8, "passes": 3, "token_shards": 8, "moe_layers": 10},
         "collective_records": [
             {"op": "all-to-all", "count": 10, "payload": 0, "wire": 4.5e9, "group": [0, 1]},
             {"op": "all-gather", "count": 10, "payload": 0, "wire": 9e9, "group": [0, 4]}]}
    p.update(changes)
    return p


def test_each_part_by_hand():
    p = synthetic()
    r = predict.predict(p, H100)
    tokens = 2**20 / 8
    model = 1e9 * tokens
    expert = 6 * 1e8 * tokens * 1.25  # capacity slots
    hardware_flops = (model + 6 * 1e8 * tokens * 0.25) * 8 / 6  # + padding, remat=full
    assert r["flops"]["model"] == pytest.approx(model)
    assert r["flops"]["hardware"] == pytest.approx(hardware_flops)
    attention = 1e8 * tokens * 8 / 6  # the scores and values, at their own efficiency
    matmul = ((hardware_flops - attention) / (989e12 * predict.MATMUL_EFFICIENCY)
              + attention / (989e12 * attention_cost.ATTENTION_EFFICIENCY))
    assert r["parts"]["matmul"] == pytest.approx(matmul)
    assert expert * 8 / 6 == pytest.approx(r["flops"]["expert"])
    # per MoE layer and assignment: a row gathered and scattered, the activation's 3 x d_ff;
    # forward, backward twice, recomputed once
    experts = 5 * 4 * (2 * 1000 + 3 * 500) * 4
    hbm = (3 * 2e9 + 2 * 4e9
           + (predict.ACTIVATION_PASSES * 10 * 1000 + experts) * tokens * 2) / 3350e9
    assert r["parts"]["memory-bound"] == pytest.approx(hbm)
    lat = 10 * predict.COLLECTIVE_LATENCY_S
    assert r["parts"]["exposed collectives"] == pytest.approx(4.5e9 / 450e9 + lat)
    gather = 9e9 / 450e9 + lat  # hidden under the matmuls, which last longer
    assert gather < matmul and r["parts"]["overlapped collectives beyond the matmuls"] == 0
    step = matmul + hbm + 4.5e9 / 450e9 + lat
    assert r["step_s"] == pytest.approx(step)
    assert r["mfu"] == pytest.approx(model / (step * 989e12))
    # the reservation: 1,000 steps of it on 8 chips
    hours = 1000 * step / 3600
    text = "\n".join(predict.prediction_lines(p, H100))
    assert f"{hours / 24:,.1f} days on 8 chips, {hours * 8:,.0f} chip-hours" in text
    # and what to budget by the model's record: those days over the checked runs' median
    # and least achieved share of their predictions
    least, median, _ = predict.achieved()
    assert (f"{hours / 24 / median:,.1f} days at the median, {hours / 24 / least:,.1f} at the "
            "least") in text


def test_the_record_is_the_checked_runs_achieved_over_predicted():
    """(least, median, most) of published / predicted, by hand on made-up runs."""
    made_up = {"x": (50, 100), "y": (90, 100), "z": (110, 100), "w": (80, 100)}
    assert predict.achieved(made_up) == pytest.approx((0.5, 0.85, 1.1))
    least, median, most = predict.achieved()
    assert least == pytest.approx(14796 / 30037) and most == pytest.approx(3038 / 3013)
    assert median == pytest.approx(1862 / 2194)  # (i), the 6th of 11


def test_attention_runs_slower_at_narrow_heads():
    """Head dim 64 runs the kernel at 476 / 638 of head dim 128's throughput (FlashAttention-3's
    published figures), so the attention part of the step grows by 638 / 476 and nothing else
    moves; a width between two of the table's takes the wider one's (192: 256's 612 / 638)."""
    wide = predict.predict(synthetic(), H100)
    attention = 1e8 * 2**20 / 8 * 8 / 6 / (989e12 * 0.5)
    for head_dim, factor in ((64, 638 / 476), (32, 638 / 476), (192, 638 / 612)):
        p = synthetic()
        p["model"] = {**p["model"], "head_dim": head_dim}
        narrow = predict.predict(p, H100)
        assert narrow["parts"]["matmul"] - wide["parts"]["matmul"] == pytest.approx(
            attention * (factor - 1))
        assert narrow["parts"]["memory-bound"] == wide["parts"]["memory-bound"]


def test_attention_is_priced_as_moejax_runs_it_on_the_target():
    """Sinks on a GPU: cuDNN's kernel, its rows rescaled (model/cudnn_attention); with
    documents (the packed layout) plus a second q.k in XLA for the normalizer, float32
    einsums over every [S, S] logit at half the bf16 rate, written and read once per
    forward, twice under remat=full; under context parallelism no fused kernel takes sinks,
    so XLA's attention, its scores [S, S] per head through HBM, 14 passes under remat=full.
    On a TPU splash takes sinks (fused), unless 128 does not divide the sequence. MLA's
    kernel computes its padded width: attention_padding times the counted FLOPs."""
    plain = predict.predict(synthetic(), H100)
    assert plain["fused_attention"] and plain["parts"]["attention logits through HBM "
                                                     "(XLA's einsums)"] == 0
    p = synthetic()
    p["model"] = {**p["model"], "attention_sinks": True}
    assert predict.predict(p, H100)["step_s"] == plain["step_s"]
    tokens = 2**20 / 8
    p["model"]["documents"] = True
    r = predict.predict(p, H100)
    assert r["fused_attention"]
    logits = 2 * 10 * tokens * 8 * 4096  # two forwards, 10 layers, 8 heads, 4,096 keys
    assert r["parts"]["matmul"] - plain["parts"]["matmul"] == pytest.approx(
        2 * 128 * logits / (989e12 / 2) / predict.MATMUL_EFFICIENCY)
    assert r["parts"]["attention logits through HBM (XLA's einsums)"] == pytest.approx(
        8 * logits / 3350e9)
    windowed = {**p, "model": {**p["model"], "windows": [128, 0] * 5}}  # band_lse: 2 tiles
    assert attention_cost.sink_normalizer(windowed, H100)[1] == pytest.approx(
        8 * logits * (5 * 256 + 5 * 4096) / (10 * 4096))
    p["mesh"] = {**p["mesh"], "context": 2}
    r = predict.predict(p, H100)
    assert not r["fused_attention"]
    attention = 1e8 * tokens * 8 / 6
    fused_time = attention / (989e12 * attention_cost.ATTENTION_EFFICIENCY)
    xla_time = attention / (989e12 / 2) / predict.MATMUL_EFFICIENCY
    assert r["parts"]["matmul"] - plain["parts"]["matmul"] == pytest.approx(
        xla_time - fused_time)
    scores = 4 * (4 + 4 + 6) * 10 * tokens * 8 * 4096 / 3350e9
    assert r["parts"]["attention logits through HBM (XLA's einsums)"] == pytest.approx(scores)
    p["mesh"] = {**p["mesh"], "context": 1}
    tpu = dataclasses.replace(H100, platform="tpu")
    assert predict.predict(p, tpu)["fused_attention"]
    p["model"] = {**p["model"], "seq_len": 4000}
    assert not predict.predict(p, tpu)["fused_attention"]
    mla = synthetic()
    mla["model"] = {**mla["model"], "attention_padding": 1.2}
    flops = predict.hardware_flops(mla, H100)
    base = predict.hardware_flops(synthetic(), H100)
    assert flops["attention"] == pytest.approx(1.2 * base["attention"])
    assert flops["hardware"] - base["hardware"] == pytest.approx(0.2 * base["attention"])


def test_a_fused_kernel_skips_the_blocks_outside_a_window():
    """gpt-oss's pattern, a 128-token window on every other layer of 4,096 tokens: a GPU
    kernel computes 128 + 128 keys a query there (its tiles), a TPU's splash 128 + 512 (its
    blocks), against the 2,048 a causal layer averages; XLA's attention skips nothing."""
    p = synthetic()
    p["model"] = {**p["model"], "windows": [128, 0] * 5}
    base = predict.hardware_flops(synthetic(), H100)
    assert attention_cost.window_share(p, H100) == pytest.approx((256 / 2048 + 1) / 2)
    flops = predict.hardware_flops(p, H100)
    assert flops["attention"] == pytest.approx(base["attention"] * (256 / 2048 + 1) / 2)
    assert base["hardware"] - flops["hardware"] == pytest.approx(
        base["attention"] - flops["attention"])
    assert flops["model"] == base["model"]  # MFU's numerator counts as run/flops.py does
    tpu = dataclasses.replace(H100, platform="tpu")
    assert attention_cost.window_share(p, tpu) == pytest.approx((640 / 2048 + 1) / 2)
    p["model"]["act_bytes"] = 4  # float32: XLA's attention on a GPU
    assert attention_cost.window_share(p, H100) == 1.0


def test_dropless_is_priced_as_capacity_at_factor_one():
    """The same rows through one all-to-all: the capacity path with C = T k / E; a capacity
    config is priced as it is."""
    config = tiny.get_config()
    assert predict.as_priced(config) is config
    config.model.dispatch = "dropless"
    priced = predict.as_priced(config)
    assert (priced.model.dispatch, priced.model.capacity_factor, priced.model.min_capacity) == (
        "capacity", 1.0, 0)
    assert config.model.dispatch == "dropless"  # the user's config untouched


def test_dropless_grouped_matmuls_pay_their_partial_tiles():
    """Each device holds T k / grad_accum rows over its E / expert groups: megablox computes
    one more 512-row tile per group, a GPU grouped GEMM half a 128-row tile."""
    dropless = {**synthetic()["model"], "dropless": True}
    p = synthetic(model=dropless, grad_accum=2,
                  alltoall_min={**synthetic()["alltoall_min"], "dropless": True})
    rows = 2**20 / 8 / 2 * 4  # tokens per device and micro-batch, times k
    assert predict.group_waste(p, H100) == pytest.approx(64 / 8 * 64 / rows)
    v5p = hardware.TARGETS["v5p"]
    assert predict.group_waste(p, v5p) == pytest.approx(64 / 8 * 512 / rows)
    tokens = 2**20 / 8
    r = predict.predict(p, v5p)
    assert r["flops"]["expert"] == pytest.approx(
        6 * 1e8 * tokens * (1 + 64 / 8 * 512 / rows) * 8 / 6)
    assert predict.group_waste(synthetic(), v5p) == 0  # the capacity path: whole slots


def test_activation_offload_hides_behind_the_matmuls_up_to_their_time():
    """remat=offload: each micro-batch's layer inputs to the host and back over the chip's
    host link (64 GB/s on H100), in the step only where they outlast the matmuls."""
    base = predict.predict(synthetic(), H100)
    matmul = base["parts"]["matmul"]
    for seconds in (0.5 * matmul, 2 * matmul):  # bytes that take that long, both ways
        p = synthetic(activation_offload=seconds * 64e9 / 2 / 4, grad_accum=4)
        r = predict.predict(p, H100)
        assert r["host_s"] == pytest.approx(seconds)
        beyond = r["parts"]["activation offload beyond the matmuls"]
        assert beyond == pytest.approx(max(0.0, seconds - matmul))
        assert r["step_s"] == pytest.approx(base["step_s"] + beyond)


def test_fp8_experts_run_at_the_fp8_peak():
    bf16 = predict.predict(synthetic(), H100)
    fp8 = predict.predict(synthetic(model={**synthetic()["model"], "quantization": "fp8"}),
                          H100)
    saved = bf16["flops"]["expert"] / predict.MATMUL_EFFICIENCY * (1 / 989e12 - 1 / 1979e12)
    assert bf16["parts"]["matmul"] - fp8["parts"]["matmul"] == pytest.approx(saved)


def natural_load() -> np.ndarray:
    """Two MoE layers of 64 experts, 8 to a rank: layer 0 uniform; in layer 1 rank 0's
    experts take 3/8 of the assignments (3x the mean rank's 1/8), the rest share 5/8."""
    load = np.full((2, 64), 1 / 64)
    load[1, :8], load[1, 8:] = 3 / 8 / 8, 5 / 8 / 56
    return load


def test_natural_routing_waits_for_the_busiest_rank():
    """Dropless: each layer waits for its busiest expert rank (layer 0: 1x, layer 1: 3x; 2x
    on average), so the experts' matmuls, their HBM traffic and the all-to-alls take twice
    as long and nothing else changes; one expert rank waits for nobody."""
    model = {**synthetic()["model"], "dropless": True}
    p = synthetic(model=model, alltoall_min={**synthetic()["alltoall_min"], "dropless": True})
    balanced, r = predict.predict(p, H100), predict.predict(p, H100, natural_load())
    assert r["imbalance"] == pytest.approx(2.0)
    tokens = 2**20 / 8
    expert = 6 * 1e8 * tokens * (1 + predict.group_waste(p, H100)) * 8 / 6
    assert r["parts"]["matmul"] - balanced["parts"]["matmul"] == pytest.approx(
        expert / (989e12 * predict.MATMUL_EFFICIENCY))
    experts_hbm = 5 * 4 * (2 * 1000 + 3 * 500) * 4 * tokens * 2 / 3350e9
    assert r["parts"]["memory-bound"] - balanced["parts"]["memory-bound"] == pytest.approx(
        experts_hbm)
    assert (r["parts"]["exposed collectives"] - balanced["parts"]["exposed collectives"]
            == pytest.approx(4.5e9 / 450e9 + 10 * predict.COLLECTIVE_LATENCY_S))
    line = predict.routing_line(p, H100, natural_load(), 300)
    assert line == (f"  routing as logged at step 300 (2 MoE layers): the busiest of 8 expert "
                    f"ranks takes 2.00x the mean rank's assignments, and every rank waits for "
                    f"it: +{(r['step_s'] - balanced['step_s']) * 1e3:,.1f} ms over balanced "
                    f"routing ({balanced['step_s'] * 1e3:,.1f} ms)")
    one_rank = synthetic(model=model, mesh={**p["mesh"], "fsdp": 8, "expert": 1})
    assert predict.predict(one_rank, H100, natural_load())["imbalance"] == 1.0


def test_the_capacity_path_drops_what_natural_routing_overfills():
    """Fixed-size buffers: the step's time is the balanced one; layer 1's rank-0 experts
    hold 3/64 each against capacity 1.25/64: (3 - 1.25) / 64 x 8 = 21.9% dropped there,
    none in layer 0, 10.9% at the least on average."""
    r = predict.predict(synthetic(), H100, natural_load())
    assert r["step_s"] == predict.predict(synthetic(), H100)["step_s"]
    assert dropped_at_least(natural_load(), 1.25) == pytest.approx(1.75 / 64 * 8 / 2)
    assert "the capacity path (factor 1.25) drops at least 10.9% of assignments" in "\n".join(
        predict.prediction_lines(synthetic(), H100, natural_load(), 300))


def test_the_expert_load_is_read_from_a_runs_log(tmp_path):
    """What train's metrics.Writer logged last, from the workdir or its metrics.jsonl; an
    expert count other than the config's is one line."""
    from moejax.run.metrics import Writer

    old, new = np.full((2, 64), 1 / 64), natural_load()
    w = Writer(str(tmp_path), 0)
    w.expert_load(10, [1, 3], old, np.zeros(2))
    w.expert_load(20, [1, 3], new, np.zeros(2))
    w.scalars(21, {"loss": 1.0})
    w.close()
    for path in (tmp_path, tmp_path / "metrics.jsonl"):
        step, load = read_load(str(path), 64)
        assert step == 20 and load == pytest.approx(new)
    with pytest.raises(ConfigError, match=r": 64 experts logged; allowed: a run with the "
                       r"config's model.num_experts=8$"):
        read_load(str(tmp_path), 8)


@functools.cache
def tiny_plan(batch: int) -> dict:
    config = tiny.get_config()
    config.model.vocab_size = 257
    config.data.batch_size = batch
    return estimate.plan(config, {"fsdp": 2, "expert": 2, "tensor": 2})


def test_twice_the_link_bandwidth_shortens_communication():
    p = tiny_plan(32)
    fast = dataclasses.replace(H100, scaleup_gb_per_s=2 * H100.scaleup_gb_per_s)
    slow, quick = predict.predict(p, H100), predict.predict(p, fast)
    wire = sum(r["wire"] for r in p["collective_records"])
    assert wire > 0
    slow_comm = sum(sum(v.values()) for v in slow["collectives"].values())
    quick_comm = sum(sum(v.values()) for v in quick["collectives"].values())
    assert quick_comm < slow_comm
    # the bandwidth term halves, the latency term stays
    assert slow_comm - quick_comm == pytest.approx(wire / (2 * 450e9))
    assert quick["step_s"] < slow["step_s"]


def test_twice_the_batch_raises_the_compute_share():
    one, two = (predict.predict(tiny_plan(b), H100) for b in (32, 64))
    assert two["flops"]["model"] == pytest.approx(2 * one["flops"]["model"])
    share = [r["parts"]["matmul"] / r["step_s"] for r in (one, two)]
    assert share[1] > share[0]


def test_prediction_lines_name_the_chip_and_the_bound():
    text = "\n".join(predict.prediction_lines(tiny_plan(32), H100))
    assert "predicted step on 8 x NVIDIA H100 SXM5 80GB" in text
    assert "-bound" in text and "all-to-all" in text


def test_an_unknown_target_is_one_line():
    with pytest.raises(ConfigError, match=r"^--target='a100': unknown chip; allowed: h100, "):
        hardware.target("a100")


# ---- plan --search ---------------------------------------------------------------------------

def test_search_meshes_divide_what_they_split():
    """tiny: 8 experts, 4 heads (4 kv heads), 32 rows: on 8 H100s every fsdp x expert x tensor
    of 8 with tensor <= 4 (the heads); on a 2-GPU scale-up domain tensor <= 2."""
    from moejax.plan.search import meshes

    config = tiny.get_config()
    got = {(m["fsdp"], m["expert"], m["tensor"]) for m in meshes(config, 8, H100)}
    assert got == {(8, 1, 1), (4, 1, 2), (2, 1, 4), (4, 2, 1), (2, 2, 2), (1, 2, 4),
                   (2, 4, 1), (1, 4, 2), (1, 8, 1)}
    pair = dataclasses.replace(H100, scaleup_chips=2)
    assert max(m["tensor"] for m in meshes(config, 8, pair)) == 2


def test_search_tries_what_can_help_and_ranks_the_fitting_first(monkeypatch):
    """Per mesh: remat=matmuls only where full fits; more micro-batches only while none fits
    and the peak still falls. Fitting rows first, fastest first, ties to less communication;
    the rest by their peak. Candidates made up here (tensor 1: one-GPU scale-up domains):
    expert 1 and 8 fit at once, expert 2 from 2 micro-batches, expert 4 never, its peak flat
    from 2 micro-batches on."""
    from moejax.plan import search

    def candidate(config, mesh, chip, load=None):
        e, remat, micro = mesh["expert"], config.model.remat, config.train.grad_accum
        fits = e in (1, 8) or (e == 2 and micro >= 2)
        peak = 100.0 / min(micro, 2) + e
        return {"mesh": mesh, "remat": remat, "grad_accum": micro, "fits": fits, "peak": peak,
                "step_s": {1: 2.0, 2: 3.0, 4: 5.0, 8: 1.0}[e] - (remat == "matmuls") / 2,
                "comm_s": 0.0, "choice": {"option": "as configured", "peak": peak},
                "mfu": 0.5, "bound": "compute"}

    monkeypatch.setattr(search, "candidate", candidate)
    config = tiny.get_config()
    rows = search.search(config, dataclasses.replace(H100, scaleup_chips=1), 8,
                         log=lambda text: None, workers=1)
    tried = [(r["mesh"]["expert"], r["remat"], r["grad_accum"]) for r in rows]
    # fitting, by step: matmuls saves half a second; then by peak (ties in search order)
    assert tried == [(8, "matmuls", 1), (8, "full", 1), (1, "matmuls", 1), (1, "full", 1),
                     (2, "matmuls", 2), (2, "full", 2),
                     (4, "full", 2), (4, "full", 4), (2, "full", 1), (2, "matmuls", 1),
                     (4, "full", 1)]
    assert [r["fits"] for r in rows] == [True] * 6 + [False] * 5


@pytest.mark.slow  # 4 compiles twice, 2 of them in spawned processes: about 40 s
def test_search_in_parallel_processes_equals_one_process():
    """The meshes compiled by two spawned workers (their own jax, the parent's simulated
    devices) price every candidate as one process does, in the same order."""
    from moejax.plan import search

    config = tiny.get_config()
    config.data.batch_size = 8
    chip = dataclasses.replace(H100, scaleup_chips=1)  # tensor 1: meshes fsdp 2 and expert 2
    rows = {w: search.search(config, chip, 2, log=lambda text: None, workers=w) for w in (1, 2)}
    assert len(rows[1]) == 4
    for one, two in zip(rows[1], rows[2], strict=True):
        assert (one["mesh"], one["remat"], one["grad_accum"], one["fits"]) == (
            two["mesh"], two["remat"], two["grad_accum"], two["fits"])
        assert one["step_s"] == pytest.approx(two["step_s"], rel=1e-9)


def test_search_takes_the_cheapest_memory_option_that_fits():
    """As compiled when it fits; else mu in bf16; else the moments on the host (their host
    link time added); else nothing."""
    from moejax.plan.search import choose

    p = tiny_plan(32)
    f = estimate.fit(p, 1e12)
    own = next(i for i, r in enumerate(p["precision"]["train"]) if r["own"])
    mu16 = next(i for i, r in enumerate(p["precision"]["train"])
                if r["params"] == p["precision"]["train"][own]["params"]
                and r["mu"] == "bfloat16")
    compiled, bf16, host = f["peak"], f["precision"][mu16], estimate.offload(p)["peak"]
    assert host < bf16 < compiled  # tiny's activations are small: the state decides

    def chip(gib):
        return dataclasses.replace(H100, hbm_gib=gib)

    gib = 2**30
    assert choose(p, chip(compiled / gib))["option"] == "as configured"
    assert choose(p, chip(bf16 / gib))["option"] == "train.moment_dtype=bfloat16"
    offloaded = choose(p, chip(host / gib))
    assert offloaded["option"] == "train.offload_optimizer=True"
    assert offloaded["extra_s"] == pytest.approx(p["moments"] / 64e9)
    assert choose(p, chip(0.99 * host / gib)) is None


def test_search_puts_the_layer_inputs_on_the_host_before_the_moments():
    """From remat=full, the same program with each layer's input in host memory
    (remat=offload) fits where only that much is missing; its copies cost nothing while the
    matmuls outlast them."""
    from moejax.plan.search import choose

    p = {**tiny_plan(32), "remat": "full"}
    f = estimate.fit(p, 1e12)
    rows = p["precision"]["train"]
    own = next(r for r in rows if r["own"])
    mu16 = next(peak for r, peak in zip(rows, f["precision"], strict=True)
                if r["params"] == own["params"] and r["mu"] == "bfloat16")
    need = f["peak"] - p["layer_inputs"]
    assert need < mu16  # the layer inputs weigh more than half the first moments
    got = choose(p, dataclasses.replace(H100, hbm_gib=need / 2**30))
    assert (got["option"], got["peak"]) == ("model.remat=offload", need)
    matmul = predict.predict(p, H100)["parts"]["matmul"]
    host = 2 * p["layer_inputs"] / 64e9
    assert got["extra_s"] == pytest.approx(max(0.0, host - matmul), abs=1e-12)


def test_search_answer_says_what_the_reservation_takes(monkeypatch):
    """The answer's layout, its step and the whole run: train.steps at that step, in days
    and chip-hours on the mesh's chips (tiny_plan's compile, shared)."""
    from moejax.plan import search

    monkeypatch.setattr(search, "plan_priced", lambda config, mesh, chip=None: tiny_plan(32))
    config = tiny.get_config()
    roomy = dataclasses.replace(H100, hbm_gib=1000.0)
    row = search.candidate(config, {"fsdp": 2, "expert": 2, "tensor": 2}, roomy)
    hours = config.train.steps * row["step_s"] / 3600
    text = "\n".join(search.search_lines([row], roomy, 8))
    assert "answer: fsdp=2 x expert=2 x tensor=2, remat=none, grad_accum=1" in text
    assert f"{hours / 24:,.1f} days on 8 chips, {hours * 8:,.0f} chip-hours" in text
    # a logged load reaches each candidate: dropless, expert 0 of 8 with half the assignments
    # puts rank 0 (experts 0-3) at 1/2 + 3/14 of them, 1.43x the mean rank's half
    dropless = {**tiny_plan(32), "model": {**tiny_plan(32)["model"], "dropless": True}}
    monkeypatch.setattr(search, "plan_priced", lambda config, mesh, chip=None: dropless)
    load = np.array([[1 / 2] + [1 / 14] * 7])
    natural = search.candidate(config, {"fsdp": 2, "expert": 2, "tensor": 2}, roomy, load)
    r = predict.predict(dropless, roomy, load)
    assert r["imbalance"] == pytest.approx((1 / 2 + 3 / 14) * 2)
    assert natural["step_s"] == pytest.approx(r["step_s"])
    assert r["step_s"] > predict.predict(dropless, roomy)["step_s"]
    assert "1 fit, routing as logged at step 7" in "\n".join(
        search.search_lines([natural], roomy, 8, load, 7))


def test_a_fused_kernel_target_is_compiled_with_a_fused_kernels_memory():
    """For a target whose attention is a fused kernel the planner compiles XLA:CPU's attention
    as blockwise flash attention (keys 512 at a time): about the same predicted step, and
    less memory at 2,048 tokens, where XLA's [S, S] scores dominate."""
    config = tiny.get_config()
    config.model.vocab_size = 257
    config.model.dtype = "bfloat16"  # cuDNN's: a float32 model has no fused kernel on GPU
    config.data.update(batch_size=8, seq_len=2048)
    mesh = {"fsdp": 2, "expert": 2, "tensor": 2}
    dense, fused = estimate.plan(config, mesh), predict.plan_priced(config, mesh, H100)
    assert fused["fused_attention"] and not dense["fused_attention"]
    assert fused["memory"]["temp"] < dense["memory"]["temp"] - 3 * fused["attention_scores"]
    assert dense["attention_scores"] == 2048 / 512 * fused["attention_scores"]
    # XLA partitions the two attentions' neighbours a little differently (one gather of
    # half the bytes here); the step the planner prices moves by well under 1%.
    assert predict.predict(fused, H100)["step_s"] == pytest.approx(
        predict.predict(dense, H100)["step_s"], rel=0.01)
