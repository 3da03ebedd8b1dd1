"""The planner's report: memory per device, the fit verdict and what would fit, the precision
tables, collectives and the all-to-all minimum, from estimate.plan's numbers."""

from moejax.plan.estimate import GiB, MiB, device_peak, fit, offload


def report(p: dict, title: str = "", hbm_gib: float = 80.0, devices_per_host: int = 8) -> str:
    mem, st, n = p["memory"], p["state"], p["devices"]
    mesh = " x ".join(f"{a}={s}" for a, s in p["mesh"].items())
    unit, scale = ("GiB", GiB) if mem["peak"] >= GiB else ("MiB", MiB)
    lines = [
        f"plan: {title + ', ' if title else ''}mesh {mesh} ({n} simulated devices), "
        f"remat={p['remat']}, compiled in {p['compile_s']:.0f} s",
        f"parameters      {p['params_total'] / 1e6:,.1f}M total, "
        f"{p['params_active'] / 1e6:,.1f}M active per token",
        f"train FLOPs     {p['flops_per_token'] / 1e6:,.1f} MFLOP per token; "
        f"{p['tokens_per_step']:,} tokens per step ({p['tokens_per_step'] // n:,} per device, "
        f"grad_accum {p['grad_accum']})",
        "",
        f"memory per device (XLA:CPU)                 {unit}",
        f"  parameters                       {st['params'] / scale:12,.2f}",
        f"  optimizer state                  {st['opt_state'] / scale:12,.2f}",
        f"  arguments (state + batch)        {mem['arguments'] / scale:12,.2f}",
        f"  outputs not aliased to donated   {(mem['outputs'] - mem['aliased']) / scale:12,.2f}",
        f"  activations and temporaries      {mem['temp'] / scale:12,.2f}",
        f"    one attention-score buffer     {p['attention_scores'] / scale:12,.2f}"
        + ("  ([B, heads, S, 512] f32 at a time: the target's fused kernel, stood in for by "
           "moejax's blockwise flash attention in XLA)" if p.get("fused_attention") else
           "  ([B, heads, S, S] f32 on XLA:CPU; with context > 1 [B, heads, S / context, 512],"
           " blockwise: not flash attention's)"),
        f"  peak                             {mem['peak'] / scale:12,.2f}",
    ]
    if p["activation_offload"]:
        lines += [
            f"    of it in host memory           {p['activation_offload'] / scale:12,.2f}"
            "  (remat=offload: each layer's input, from the forward to its backward)",
            f"  peak on the device               {device_peak(p) / scale:12,.2f}"]
    if p["offload"]:
        lines += offload_lines(p, unit, scale, devices_per_host)
    lines += precision_lines(p, hbm_gib)
    lines += verdict(p, hbm_gib)
    lines += ["", "collectives per step, per device   count   payload MiB     wire MiB"]
    for op, c in p["collectives"].items():
        if c["count"]:
            lines.append(f"  {op:<30} {c['count']:>7} {c['payload'] / MiB:13,.2f}"
                         f" {c['wire'] / MiB:12,.2f}")
    lines += ["  payload = the operands a device hands to the op; wire = what leaves the device:",
              "  (n-1)/n of the payload for all-to-all, 2(n-1)/n for ring all-reduce, n per group"]
    if a := p["alltoall_min"]:
        lines += alltoall_lines(p, a)
    if u := p["optimizer_update"]:
        lines += muon_lines(p, u)
    return "\n".join(lines)


def flop(x: float) -> str:
    return f"{x / 1e12:,.2f} TFLOP" if x >= 1e12 else f"{x / 1e9:,.2f} GFLOP"


def muon_lines(p: dict, u: dict) -> list[str]:
    """Newton-Schulz's share of the step: its FLOPs beside the model's, and what the update
    (compiled alone, also counted in the step's collectives above) moves."""
    model = p["flops_per_token"] * p["tokens_per_step"] / p["devices"]
    ns = u["newton_schulz_flops"]
    lines = ["", f"Muon: Newton-Schulz {flop(ns)} per step over all matrices; per device "
             f"{flop(u['per_device'])} (each matrix whole on the devices holding its layer "
             f"and expert), {u['per_device'] / model:.1%} of the model's {flop(model)} "
             "(forward and backward)",
             "  update's collectives per device  count   payload MiB     wire MiB"]
    moved = [(op, c) for op, c in u["collectives"].items() if c["count"]]
    lines += [f"  {op:<30} {c['count']:>7} {c['payload'] / MiB:13,.2f} {c['wire'] / MiB:12,.2f}"
              for op, c in moved] or ["  none: every matrix Muon trains is whole on its device"]
    return lines


def verdict(p: dict, hbm_gib: float) -> list[str]:
    f, hbm = fit(p, hbm_gib * GiB), hbm_gib * GiB
    name = {"adamw": "AdamW", "muon": "Muon"}[p["precision"]["setting"]["optimizer"]]
    if f["fits"]:
        return [f"verdict: {name} training fits {hbm_gib:g} GiB per device "
                f"({(hbm - f['peak']) / GiB:,.1f} GiB spare)"]
    why = ("with the optimizer state offloaded (above)" if p["offload"] else
           f"= state and gradients {f['sharded'] / GiB:,.1f} + the rest {f['rest'] / GiB:,.1f}")
    out = [f"verdict: {name} training does not fit {hbm_gib:g} GiB per device: peak "
           f"{f['peak'] / GiB:,.1f} {why}. What would, from these numbers:"]
    whole = (p["state_global"] + p["params_global"]) / GiB
    if f["devices"]:
        out.append(f"  {f['devices']} devices, state and gradients split over all (fsdp x "
                   f"expert x context), tokens per device as now: {whole:,.1f} / ({hbm_gib:g} - "
                   f"{f['rest'] / GiB:,.1f}) GiB")
    else:
        out.append(f"  no device count: the rest alone is {f['rest'] / GiB:,.1f} GiB; "
                   "fewer tokens per device would shrink it")
    for row, peak in zip(p["precision"]["train"], f["precision"], strict=True):
        if not row["own"]:
            ok = "fits" if peak <= hbm else "does not fit"
            out.append(f"  {setting_name(row):<54} {peak / GiB:8,.1f} GiB: {ok}")
    if not p["offload"]:  # else the config's own peak, above
        ok = "fits" if f["offload_opt"] <= hbm else "does not fit"
        out.append(f"  {'moments on the host (train.offload_optimizer)':<54} "
                   f"{f['offload_opt'] / GiB:8,.1f} GiB: {ok}")
    if p["remat"] != "full":
        out.append("  or rerun with --config.model.remat=full (recompute the blocks' forward)")
    return out


def offload_lines(p: dict, unit: str, scale: float, devices_per_host: int) -> list[str]:
    """train.offload_optimizer: what the device holds without the moments, the update's
    transient, the host's share and the host<->device bytes per step."""
    o = offload(p)
    per_host = o["moments"] * min(devices_per_host, p["devices"])
    return [
        "",
        f"optimizer state in host memory (train.offload_optimizer; {unit} per device)",
        f"  moments, in host memory at rest  {o['moments'] / scale:12,.2f}"
        f"  ({per_host / GiB:,.2f} GiB pinned per host of {devices_per_host} devices)",
        f"  peak without them (fwd + bwd)    {o['at_rest'] / scale:12,.2f}"
        "  (the compiled peak - the moments)",
        f"  update: params + grads + 2 x mom {o['update'] / scale:12,.2f}"
        "  (the whole state comes in at once; old and new moments live together)",
        f"  peak with offload                {o['peak'] / scale:12,.2f}",
        f"  host<->device per step           {o['transfer'] / scale:12,.2f}"
        f"  ({o['moments'] / scale:,.2f} in, {o['moments'] / scale:,.2f} out)",
    ]


SHORT = {"float32": "fp32", "bfloat16": "bf16"}
TRAIN_NOTE = """\
  * this config. Total: with the optimizer's step counts. Peak est.: the compiled peak with
  the row's state and gradients for this config's, against {hbm:g} GiB. Neither model.dtype
  (activations) nor model.quantization (int8 / fp8 QAT: float master weights, quantized
  only inside the matmuls) changes these bytes.
"""
INFERENCE_NOTE = """\
  * this config's parameter dtype. Experts: the routed ones (shared ones count as other);
  int8: one fp32 scale per output channel; int4: two to a byte, one fp32 scale per 128 inputs
  of a channel; other weights bf16 (routers fp32); the training layout. Scales / experts:
  {over}
"""


def setting_name(row: dict) -> str:
    return f"params {SHORT[row['params']]}, mu {SHORT[row['mu']]}, nu {SHORT[row['nu']]}"


def table(title: str, columns: tuple, rows: list, names: list, tails: list) -> list[str]:
    """One line per row, bytes in the unit that the largest total needs."""
    top = max(r["bytes"]["total"] for r in rows)
    unit, scale = next((u, s) for u, s in (("GiB", GiB), ("MiB", MiB), ("KiB", 2**10), ("B", 1))
                       if top >= s)
    out = [f"{title + ', ' + unit:<34}" + "".join(f"{c:>11}" for c in columns)]
    for row, name, tail in zip(rows, names, tails, strict=True):
        out.append(f"  {'*' if row['own'] else ' '} {name:<30}"
                   + "".join(f"{row['bytes'][c] / scale:11,.2f}" for c in columns) + tail)
    return out


def precision_lines(p: dict, hbm_gib: float) -> list[str]:
    pr, hbm, s = p["precision"], hbm_gib * GiB, p["precision"]["setting"]
    peaks = fit(p, hbm)["precision"]
    rows = [{**r, "bytes": {**r["bytes"], "peak est.": q}}
            for r, q in zip(pr["train"], peaks, strict=True)]
    lines = ["", f"precision: params {s['params']}, moments mu {s['mu']} / nu {s['nu']}, "
             f"compute {s['compute']}, quantization {s['quantization']}"]
    lines += table("train state per device", ("params", "grads", "mu", "nu", "total",
                                              "peak est."), rows,
                   [setting_name(r) for r in rows], [f"  {'fits' if q <= hbm else 'over'}"
                                                     for q in peaks])
    lines += TRAIN_NOTE.format(hbm=hbm_gib).splitlines() + [""]
    rows = pr["inference"]
    fp32, q = rows[0]["bytes"]["experts"], {r["name"]: r["bytes"] for r in rows}
    lines += table("inference weights per device", ("experts", "scales", "other", "total"), rows,
                   [r["name"] + (" weight-only" if r["bytes"]["scales"] else "") for r in rows],
                   [f"  experts 1/{fp32 / r['bytes']['experts']:.2f} of fp32"
                    if fp32 else "" for r in rows])
    over = ", ".join(f"{n} +{q[n]['scales'] / q[n]['experts']:.2%}" for n in ("int8", "int4")
                     if fp32)
    return lines + INFERENCE_NOTE.format(over=over or "-").splitlines() + [""]


def alltoall_lines(p: dict, a: dict) -> list[str]:
    ep, shards = a["expert"], a["token_shards"]
    if ep == 1:
        return ["", "all-to-all: none, mesh.expert = 1 (every token stays on its device)"]
    measured = p["collectives"]["all-to-all"]["payload"]
    if a["dropless"]:
        lines = ["", "all-to-all: none, dropless (compiled here: the ring, all-gather and "
                 "reduce-scatter over expert)"]
    else:
        lines = [
            "",
            f"all-to-all minimum: {a['moe_layers']} MoE layers, {a['groups']} groups of "
            f"{a['tokens_per_group']:,} tokens, C = {a['capacity']} "
            f"(cf {a['effective_cf']:.3f} once rounded up), exchanged within expert={ep}",
            f"  one layer's forward, all shards  {a['per_layer'] / MiB:12,.2f} MiB   "
            f"(2 x tokens x k x cf x d x bytes: {a['nominal_per_layer'] / MiB:,.2f})",
            f"  per device, forward              {a['forward'] / shards / MiB:12,.2f} MiB payload, "
            f"{a['forward'] / shards * (ep - 1) / ep / MiB:,.2f} wire",
            f"  per device, step ({a['passes']} passes)      {a['step'] / shards / MiB:12,.2f} MiB "
            f"payload, "
            f"{a['step'] / shards * (ep - 1) / ep / MiB:,.2f} wire",
            f"  compiled / minimum (payload)     {measured / (a['step'] / shards):12.3f}",
        ]
    if a["ragged_forward"]:
        # A device's rows, one way, per MoE layer and micro-batch; it receives for ep.
        rows = a["ragged_forward"] / (2 * a["moe_layers"] * shards * p["grad_accum"])
        lines += [
            "  dropless on GPU/TPU (ragged all-to-all, not compiled here): "
            f"{a['ragged_forward'] / shards / MiB:,.2f} MiB payload per device forward;",
            f"  its receive buffers hold {ep} devices' rows, {rows * ep / MiB:,.2f} MiB "
            "per MoE layer and device",
        ]
    return lines
