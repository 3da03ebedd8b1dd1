"""The step time of a plan on a target chip (`plan --target NAME`): a roofline of the train
step that estimate.plan compiled, each part priced on the chip of plan/hardware.py.

- Matmuls: the step's FLOPs per device as the hardware runs them (the model's 6N + attention,
  the forward once more under remat=full, the experts' capacity slots padded, a dropless
  grouped matmul's partial tiles), at MATMUL_EFFICIENCY of the chip's dense peak (fp8 for the
  experts under fp8 QAT); attention's scores and values at ATTENTION_EFFICIENCY.
- Memory-bound work: what must cross HBM besides the matmuls: the optimizer update (it reads
  parameters, gradients and moments and writes parameters and moments), the activations'
  elementwise passes (ACTIVATION_PASSES reads or writes of a [tokens, d_model] array per layer
  and step) and the experts' own per assignment (MoE layers: k rows of d_model gathered and
  scattered, the activation's 3 of d_ff), at the chip's HBM bandwidth.
- Collectives: every collective of the compiled step (collectives.collective_records: the
  bytes each device sends, its group's device ids; dropless compiled as the capacity path at
  factor 1, as_priced), each over the scale-up link
  (NVLink, ICI) when its group lies inside one scale-up domain, else over the scale-out
  network, each op also paying COLLECTIVE_LATENCY_S.
- Overlap, stated: XLA runs collectives asynchronously; the weight gathers and gradient
  reductions of FSDP and context parallelism's ring passes hide behind the matmuls up to
  their time; the MoE all-to-alls (each waits on the router and feeds the experts) and the
  collectives over `tensor` (each between two matmuls of one layer) do not (`overlapped`).
  Memory-bound work does not overlap the matmuls.

Routing: balanced, unless a run's logged expert load is given (`--expert_load`, plan/load.py):
then each MoE layer of a dropless step waits for its busiest expert-parallel rank, whose
experts compute, read and receive `imbalance` times the mean rank's rows (rank_imbalance:
the trainer's own moe/ep_imbalance, worked out for the plan's expert axis); the capacity
path's buffers have a fixed size, so there the load costs dropped tokens, not time.

MFU counts the model's FLOPs (run/flops.py: 6 per active weight + causal attention), not the
recomputed or padded ones, against the dense bf16 peak, as MaxText and Megatron-Core report it.
"""

import numpy as np

from moejax.model import kernels
from moejax.model.transformer import FORWARD_AGAIN
from moejax.parallel import AXES
from moejax.plan import attention_cost
from moejax.plan.attention_cost import attention_efficiency, sink_normalizer, window_share
from moejax.plan.load import dropped_at_least, rank_imbalance

# Achieved fraction of the dense peak on the large, well-shaped matmuls of these models: a
# little under the GPUs' measured best-shape ceilings (docs/performance.md has them).
MATMUL_EFFICIENCY = 0.75
# Rows a dropless grouped matmul computes in vain per expert group and call. Megablox (TPU)
# computes the row tile a group boundary falls in once for each group in it: one 512-row
# tile (moe/experts._row_tile) per group. A GPU grouped GEMM pads each group to whole
# 128-row tiles: half a tile on average.
GROUP_WASTE_ROWS = {"tpu": 512, "gpu": 64}
# Reads or writes of a [tokens, d_model] activation per layer in forward and backward together:
# norms, residual adds, rotary, softmax statistics.
ACTIVATION_PASSES = 40
COLLECTIVE_LATENCY_S = 10e-6  # per collective op launched
# The model's record: each published run moejax can lay out (docs/performance.md, "Against
# published runs", the same letters), as (published, predicted) tokens/s per chip. Every
# prediction says what a reservation should budget by it (budget_line); a test keeps this
# and the doc's table the same.
CHECKED = {"a": (3038, 3013), "l": (2070, 2106), "n": (7626, 8393), "j": (12040, 13735),
           "h": (1326, 1549), "i": (1862, 2194), "g": (3897, 4701), "e": (542, 668),
           "m": (13058, 17948), "f": (1322, 1825), "k": (14796, 30037)}


def axes_of(group: list[int], mesh: dict) -> set:
    """The mesh axes along which a group's devices differ (ids are row-major mesh positions)."""
    coords = np.unravel_index(group, [mesh[a] for a in AXES])
    return {a for a, c in zip(AXES, coords, strict=True) if len(set(c.tolist())) > 1}


def overlapped(record: dict, mesh: dict) -> bool:
    """Whether XLA can hide this collective behind the matmuls: the weight gathers and
    gradient reductions of FSDP (over data, fsdp, expert) and context parallelism's ring
    passes, yes; the MoE all-to-alls and tensor parallelism's collectives (over `tensor`:
    each waits on the matmul before it and feeds the one after), no."""
    return record["op"] != "all-to-all" and "tensor" not in axes_of(record["group"], mesh)


def group_waste(p: dict, chip) -> float:
    """A dropless grouped matmul's wasted rows over its real ones (0 for the capacity path,
    whose experts are one batched matmul of whole slots): each device holds its share of
    the micro-batch's assignments, T k, spread over its E / expert groups (balanced)."""
    m = p["model"]
    if not m["dropless"] or not m["num_experts"]:
        return 0.0
    rows = (p["tokens_per_step"] / p["devices"] / p["grad_accum"] * m["top_k"]
            * p["mesh"]["tensor"])
    return m["num_experts"] / p["mesh"]["expert"] * GROUP_WASTE_ROWS[chip.platform] / rows


def hardware_flops(p: dict, chip) -> dict:
    """{'model', 'hardware', 'expert', 'attention'} FLOPs per device per step: the model's
    (MFU's numerator) and what the chip executes: the forward again under remat=full (2 of
    the 6 per weight, and the attention's forward third), the routed experts' share times the
    slots the capacity path computes per assignment (its effective capacity factor; dropless:
    1 plus its partial tiles, group_waste); 'expert' and 'attention' are the executed parts
    priced apart."""
    tokens = p["tokens_per_step"] / p["devices"]
    model = p["flops_per_token"] * tokens
    expert = 6 * p["model"]["expert_active"] * tokens
    a = p["alltoall_min"]
    slots = a["effective_cf"] if a and not a["dropless"] else 1.0
    slots += group_waste(p, chip)
    recompute = 8 / 6 if p["remat"] in FORWARD_AGAIN else 1.0
    # MLA's kernel computes its narrower width padded to the wider (attention_padding); a
    # fused kernel skips the key blocks outside a layer's window (window_share).
    attention = p["model"]["attention_flops_per_token"] * tokens
    executed = attention * p["model"]["attention_padding"] * window_share(p, chip)
    return {"model": model,
            "hardware": (model + expert * (slots - 1) + executed - attention) * recompute,
            "expert": expert * slots * recompute, "attention": executed * recompute}


def memory_bytes(p: dict, imbalance: float = 1.0) -> float:
    """HBM bytes per device per step outside the matmuls: the optimizer update (reads params,
    gradients, moments; writes params and moments), the activations' elementwise passes, and
    per MoE layer and assignment the experts' gather and scatter of a row (2 d) and their
    activation (reads 2 d_ff, writes d_ff): forward, twice in the backward, and once more
    recomputed under remat=full; the experts' part `imbalance` times over on the busiest
    rank."""
    m, st = p["model"], p["state"]
    update = 3 * st["params"] + 2 * st["opt_state"]  # params read and written, grads read
    tokens = p["tokens_per_step"] / p["devices"]
    passes = 3 + (p["remat"] in FORWARD_AGAIN)
    experts = (m["moe_layers"] * m["top_k"] * (2 * m["d_model"] + 3 * m["d_ff"]) * passes
               * imbalance)
    return update + (ACTIVATION_PASSES * m["layers"] * m["d_model"] + experts) * tokens * (
        m["act_bytes"])


def link_of(group: list[int], chip) -> str:
    """'scale-up' when every device of the group is in one scale-up domain (an NVLink node or
    rack, a TPU slice), else 'scale-out'. Device ids are mesh positions, a domain's devices
    consecutive: the mesh's last axes (tensor, context, expert) innermost, as launchers lay
    them so that the chattiest axes stay on NVLink. A collective on a domain gets all of the
    chip's links (NVSwitch gives every GPU its full NVLink bandwidth; a TPU collective over a
    whole torus slice uses every ICI port)."""
    domain = chip.scaleup_chips * chip.devices_per_chip
    return "scale-up" if len({d // domain for d in group}) == 1 else "scale-out"


def collective_time(record: dict, chip) -> tuple[str, float]:
    """(the link, seconds): the op's wire bytes over its link's bandwidth per device and
    direction, plus the per-op latency."""
    link = link_of(record["group"], chip)
    gbps = chip.scaleup_gb_per_s if link == "scale-up" else chip.network_gb_per_s
    return link, (record["wire"] / (gbps * 1e9 / chip.devices_per_chip)
                  + record["count"] * COLLECTIVE_LATENCY_S)


def collective_times(records: list[dict], chip, mesh: dict, imbalance: float = 1.0) -> dict:
    """{(op, 'overlapped' | 'exposed'): {'scale-up': s, 'scale-out': s}}; the all-to-alls
    last until the busiest rank has its `imbalance` times the mean rows."""
    out = {}
    for r in records:
        link, t = collective_time(r, chip)
        t *= imbalance if r["op"] == "all-to-all" else 1.0
        key = (r["op"], "overlapped" if overlapped(r, mesh) else "exposed")
        out.setdefault(key, {"scale-up": 0.0, "scale-out": 0.0})[link] += t
    return out


def as_priced(config):
    """The config whose compiled step predict() prices: a dropless one as the capacity path
    with C = T k / E. On a GPU or TPU dropless sends every assignment's row once through a
    ragged all-to-all; XLA:CPU cannot compile one and runs dropless as a ring of gathers over
    the expert axis instead, which no accelerator would. The capacity path at factor 1 sends
    the same bytes through a plain all-to-all and computes the same FLOPs (balanced)."""
    if config.model.dispatch == "capacity" or not config.model.num_experts:
        return config
    priced = config.copy_and_resolve_references()
    with priced.unlocked():
        priced.model.update(dispatch="capacity", capacity_factor=1.0, min_capacity=0)
    return priced


def target_fused(config, mesh: dict | None, chip) -> bool:
    """Whether `chip` runs config's attention as a fused kernel (kernels.fused): what
    estimate.plan's fused_attention wants, so the compiled memory is the target's."""
    return kernels.fused(chip.platform, config.model.dtype,
                         bool(config.model.get("attention_sinks")), config.data.seq_len,
                         (mesh or {}).get("context", config.mesh.get("context", 1)))


def plan_priced(config, mesh: dict | None = None, chip=None) -> dict:
    """estimate.plan of the config predict() prices (as_priced), knowing it was dropless;
    with `chip`, its attention compiled as the chip runs it (target_fused)."""
    from moejax.plan.estimate import plan

    fused = chip is not None and target_fused(config, mesh, chip)
    p = plan(as_priced(config), mesh, fused_attention=fused)
    p["model"]["dropless"] = config.model.dispatch != "capacity"
    return p


def predict(p: dict, chip, load: np.ndarray | None = None) -> dict:
    """The predicted step of plan `p` on `chip` (seconds), its parts, MFU and the bound;
    `load` ([MoE layers, E], load.read_load): a dropless step paced by its busiest rank."""
    flops, share = hardware_flops(p, chip), 1 / chip.devices_per_chip  # a JAX device's part
    wait = (rank_imbalance(load, p["mesh"]["expert"])
            if load is not None and p["model"]["dropless"] else 1.0)
    peak = chip.bf16_tflops * 1e12 * share
    expert_peak = (chip.fp8_tflops if p["model"]["quantization"] == "fp8" else
                   chip.bf16_tflops) * 1e12 * share
    rest = flops["hardware"] - flops["expert"] - flops["attention"]
    hbm = chip.hbm_gb_per_s * 1e9 * share
    attention, scores = attention_cost.times(p, chip, flops["attention"], peak,
                                             MATMUL_EFFICIENCY, hbm)
    matmul = (rest / peak + wait * flops["expert"] / expert_peak) / MATMUL_EFFICIENCY + attention
    memory = memory_bytes(p, wait) / hbm
    comm = collective_times(p["collective_records"], chip, p["mesh"], wait)
    hidden = sum(sum(v.values()) for (_, how), v in comm.items() if how == "overlapped")
    exposed = sum(sum(v.values()) for (_, how), v in comm.items() if how == "exposed")
    overlap_left = max(0.0, hidden - matmul)
    # remat=offload: each micro-batch's layer inputs go to the host and come back over the
    # host link, asynchronous copies hidden behind the matmuls up to their time.
    host = 2 * p["activation_offload"] * p["grad_accum"] / (chip.host_gb_per_s * 1e9 * share)
    step = matmul + memory + scores + exposed + overlap_left + max(0.0, host - matmul)
    parts = {"matmul": matmul, "memory-bound": memory,
             "attention logits through HBM (XLA's einsums)": scores,
             "exposed collectives": exposed,
             "overlapped collectives beyond the matmuls": overlap_left,
             "activation offload beyond the matmuls": max(0.0, host - matmul)}
    mfu = flops["model"] / (step * peak)
    return {"step_s": step, "parts": parts, "collectives": comm, "hidden": hidden, "host_s": host,
            "flops": flops, "mfu": mfu, "imbalance": wait,
            "tflops_per_chip": flops["model"] / step / 1e12 * chip.devices_per_chip,
            "tokens_per_s": p["tokens_per_step"] / step,
            "fused_attention": attention_cost.attention_fused(p, chip),
            "bound": max(("compute", matmul), ("memory", memory + scores),
                         ("communication", exposed + hidden), key=lambda kv: kv[1])[0]}


def run_line(p: dict, step_s: float, chips: int) -> str:
    """What the reservation takes: train.steps at the predicted step, in days and chip-hours
    (no evaluation, checkpointing or restarts counted)."""
    hours = p["steps"] * step_s / 3600
    return (f"  train.steps = {p['steps']:,} ({p['steps'] * p['tokens_per_step'] / 1e9:,.1f}B "
            f"tokens): {hours / 24:,.1f} days on {chips} chips, {hours * chips:,.0f} chip-hours "
            "(steps only: no evaluation, checkpoints or restarts)")


def achieved(checked: dict = CHECKED) -> tuple[float, float, float]:
    """What the checked runs achieved over their predicted throughput: (least, median, most)."""
    ratios = [published / predicted for published, predicted in checked.values()]
    return min(ratios), float(np.median(ratios)), max(ratios)


def budget_line(p: dict, step_s: float) -> str:
    """The run's days were it to fall as short of its prediction as the checked published
    runs did at their median and at their worst (the model is a best case, not a promise)."""
    least, median, most = achieved()
    days = p["steps"] * step_s / 86400
    return (f"  budget by the model's record: {len(CHECKED)} published runs ran at "
            f"{least:.2f}x-{most:.2f}x their predicted throughput (median {median:.2f}x; "
            f"docs/performance.md): {days / median:,.1f} days at the median, "
            f"{days / least:,.1f} at the least")


def routing_line(p: dict, chip, load: np.ndarray, step: int) -> str:
    """What the logged load at `step` does to this step: the dropless wait for the busiest
    rank, or the capacity path's drops."""
    ep, m = p["mesh"]["expert"], p["model"]
    head = f"  routing as logged at step {step:,} ({len(load)} MoE layers): "
    if not m["dropless"]:
        cf = p["alltoall_min"]["effective_cf"] if p["alltoall_min"] else 1.0
        return (head + f"the capacity path (factor {cf:.2f}) drops at least "
                f"{dropped_at_least(load, cf):.1%} of assignments; its time is the balanced "
                "one (fixed-size buffers)")
    r, balanced = predict(p, chip, load), predict(p, chip)
    return (head + f"the busiest of {ep} expert ranks takes {r['imbalance']:.2f}x the mean "
            f"rank's assignments, and every rank waits for it: "
            f"+{(r['step_s'] - balanced['step_s']) * 1e3:,.1f} ms over balanced routing "
            f"({balanced['step_s'] * 1e3:,.1f} ms)")


def attention_line(p: dict, chip, r: dict) -> str:
    """How the prediction prices attention: the fused kernel's rate at its head dim, or
    XLA's einsums and why moejax has no fused kernel there."""
    m = p["model"]
    if r["fused_attention"]:
        extra = (", and a second q.k in XLA for the sinks' normalizer on the packed layout"
                 if sink_normalizer(p, chip)[0] else "")
        share = window_share(p, chip)
        windows = f", {share:.0%} of the causal work (windows)" if share < 1 else ""
        return (f"attention {attention_efficiency(m['head_dim']):.0%} at head dim "
                f"{m['head_dim']}: a fused kernel{windows}{extra}")
    why = ("sinks under context parallelism: no fused kernel takes them on GPU, float32 "
           "einsums" if m["attention_sinks"] and chip.platform == "gpu" else
           "no fused kernel for this dtype or sequence")
    return f"attention XLA's, its scores through HBM ({why})"


def prediction_lines(p: dict, chip, load: np.ndarray | None = None,
                     step: int = 0) -> list[str]:
    """The prediction as `plan --target` prints it; with `load` (load.read_load, logged at
    `step`), priced at that load and said what it costs."""
    r = predict(p, chip, load)
    ms = 1e3
    chips = p["devices"] // chip.devices_per_chip
    lines = ["", f"predicted step on {chips} x {chip.name}: {r['step_s'] * ms:,.1f} ms, "
             f"MFU {r['mfu']:.1%} ({r['tflops_per_chip']:,.0f} TFLOP/s per chip of "
             f"{chip.bf16_tflops:,.0f}), {r['tokens_per_s']:,.0f} tokens/s; {r['bound']}-bound",
             *([] if load is None else [routing_line(p, chip, load, step)]),
             run_line(p, r["step_s"], chips), budget_line(p, r["step_s"]),
             f"  matmuls at {MATMUL_EFFICIENCY:.0%} of peak ({attention_line(p, chip, r)}), "
             f"{r['flops']['hardware'] / 1e12:,.1f} TFLOP per device "
             f"({r['flops']['model'] / 1e12:,.1f} of them the model's, "
             f"{r['flops']['attention'] / 1e12:,.1f} attention's)"]
    if waste := group_waste(p, chip):
        lines.append(f"  dropless grouped matmuls compute {waste:.1%} more expert rows than "
                     f"assigned (partial tiles: {GROUP_WASTE_ROWS[chip.platform]} rows per "
                     "expert group and call)")
    for name, t in r["parts"].items():
        lines.append(f"  {name:<44} {t * ms:10,.1f} ms")
    if p["activation_offload"]:
        sent = 2 * p["activation_offload"] * p["grad_accum"] / 2**30
        lines.append(f"  activation offload: {sent:,.1f} GiB per device to the host and back, "
                     f"{r['host_s'] * ms:,.1f} ms at {chip.host_gb_per_s:,.0f} GB/s per chip")
    lines.append(f"  collectives (ms), scale-up {chip.scaleup_gb_per_s:,.0f} GB/s, scale-out "
                 f"{chip.network_gb_per_s:,.0f} GB/s per chip and direction:")
    for (op, how), t in sorted(r["collectives"].items()):
        lines.append(f"    {op:<22} scale-up {t['scale-up'] * ms:9,.1f}  scale-out "
                     f"{t['scale-out'] * ms:9,.1f}  ({how})")
    return lines
