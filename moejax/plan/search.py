"""`plan --search`: the fastest predicted layout of a config that fits a target chip.

Over the mesh (fsdp x expert x tensor on the devices the config's mesh has), remat (full;
matmuls where full fits) and micro-batches (train.grad_accum x 1, 2, 4: more only while
nothing fits and the peak still falls), each candidate compiled as `plan` compiles it
(dropless as predict.as_priced says) and priced by predict.py; the first-moment dtype and
optimizer offload by the planner's arithmetic on the same compile (estimate.fit, offload),
cheapest first: as configured, then mu in bf16, then (from remat=full) the layer inputs in
host memory (remat=offload: the same program, its copies' time beyond the matmuls added),
then the moments in host memory (their host link time added). The answer is the fastest
that fits, with the runners-up; where none fits, why. Meshes compile in parallel processes,
one per core (at most WORKERS). With a run's logged expert load, each layout's dropless step
waits for its own busiest expert-parallel rank (predict.py).
"""

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed

from moejax.plan.estimate import GiB, fit, offload
from moejax.plan.predict import budget_line, plan_priced, predict, run_line

REMATS = ("full", "matmuls")
MICRO = (1, 2, 4)
# Compiles at once: one per core, at most 8 (a large model's compile for hundreds of simulated
# devices holds a few GiB of host memory).
WORKERS = min(os.cpu_count() or 1, 8)


def meshes(config, devices: int, chip) -> list[dict]:
    """Every fsdp x expert x tensor = devices whose sizes divide what they split: experts,
    heads and kv heads, the batch's rows; tensor within one scale-up domain."""
    mc, out = config.model, []
    kv_heads = mc.num_kv_heads or mc.num_heads
    domain = chip.scaleup_chips * chip.devices_per_chip
    for expert in (e for e in range(1, devices + 1) if devices % e == 0):
        if expert > 1 and (not mc.num_experts or mc.num_experts % expert):
            continue
        for tensor in (t for t in range(1, devices // expert + 1) if devices // expert % t == 0):
            if tensor > min(8, domain) or mc.num_heads % tensor or kv_heads % tensor:
                continue
            fsdp = devices // expert // tensor
            if config.data.batch_size % (fsdp * expert):
                continue
            out.append({"data": 1, "fsdp": fsdp, "expert": expert, "context": 1,
                        "tensor": tensor})
    return out


def choose(p: dict, chip) -> dict | None:
    """The cheapest memory option that fits `chip`: as compiled, mu in bf16, or the moments
    in host memory; None when none does."""
    hbm = chip.hbm_gib / chip.devices_per_chip * GiB
    f = fit(p, hbm)
    if f["fits"]:
        return {"option": "as configured", "peak": f["peak"], "extra_s": 0.0}
    rows = p["precision"]["train"]
    own = next(r for r in rows if r["own"])
    for row, peak in zip(rows, f["precision"], strict=True):
        if row["params"] == own["params"] and row["mu"] == "bfloat16" and peak <= hbm:
            return {"option": "train.moment_dtype=bfloat16", "peak": peak, "extra_s": 0.0}
    if p["remat"] == "full":  # the same program with each layer's input on the host
        q = {**p, "remat": "offload", "activation_offload": p["layer_inputs"]}
        if (peak := fit(q, hbm)["peak"]) <= hbm:
            return {"option": "model.remat=offload", "peak": peak,
                    "extra_s": predict(q, chip)["step_s"] - predict(p, chip)["step_s"]}
    o = offload(p)
    if o["peak"] <= hbm:  # in and out over the host link, not hidden behind the step
        return {"option": "train.offload_optimizer=True", "peak": o["peak"],
                "extra_s": o["moments"] / (chip.host_gb_per_s * 1e9 / chip.devices_per_chip)}
    return None


def search(config, chip, devices: int, log=print, load=None,
           workers: int = WORKERS) -> list[dict]:
    """Every candidate priced (compiles one per mesh, remat and micro-batch count), fastest
    fitting first, then the rest by their peak; `load`: predict's. The meshes compile in
    `workers` processes at once (XLA compiles on one core), each logged as it ends."""
    todo, results = meshes(config, devices, chip), []
    if min(workers, len(todo)) <= 1:
        for mesh in todo:
            results += mesh_rows(config, mesh, chip, load, log)
    else:  # spawned: each starts its own jax with the parent's simulated devices (XLA_FLAGS)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context) as pool:
            futures = [pool.submit(mesh_rows, config, mesh, chip, load) for mesh in todo]
            for future in as_completed(futures):
                for row in future.result():
                    log(line(row))
            results = [row for future in futures for row in future.result()]  # mesh order
    # Ties (compute-bound layouts) go to the one whose collectives leave the most slack.
    return sorted(results, key=lambda r: (not r["fits"], r["step_s"] if r["fits"] else r["peak"],
                                          r["comm_s"]))


def mesh_rows(config, mesh: dict, chip, load=None, log=lambda text: None) -> list[dict]:
    """One mesh's candidates: remat full, then matmuls where full fits; micro-batches x1,
    x2, x4 while none fits and the peak still falls."""
    rows = []
    for remat in REMATS:  # full first: matmuls keeps more, so is tried only where it fits
        if remat != REMATS[0] and not any(r["fits"] for r in rows):
            break
        last = None
        for times in MICRO:
            c = config.copy_and_resolve_references()
            with c.unlocked():
                c.model.remat = remat
                c.train.grad_accum = config.train.grad_accum * times
            if c.data.batch_size % (c.train.grad_accum * mesh["fsdp"] * mesh["expert"]):
                break
            row = candidate(c, mesh, chip, load)
            rows.append(row)
            log(line(row))
            # More micro-batches only repeat the weight gathers: stop once one fits, or
            # once halving the activations no longer lowers the peak (the state sets it).
            if row["fits"] or (last is not None and row["peak"] >= 0.99 * last):
                break
            last = row["peak"]
    return rows


def candidate(config, mesh: dict, chip, load=None) -> dict:
    p = plan_priced(config, mesh, chip)
    r, choice = predict(p, chip, load), choose(p, chip)
    step = r["step_s"] + (choice["extra_s"] if choice else 0.0)
    f = fit(p, chip.hbm_gib / chip.devices_per_chip * GiB)
    return {"mesh": mesh, "remat": config.model.remat, "grad_accum": config.train.grad_accum,
            "fits": choice is not None, "choice": choice, "peak": p["memory"]["peak"],
            "step_s": step, "mfu": r["mfu"] * r["step_s"] / step, "bound": r["bound"],
            "comm_s": r["hidden"] + r["parts"]["exposed collectives"],
            "run": run_line(p, step, p["devices"] // chip.devices_per_chip),
            "budget": budget_line(p, step),
            "why": {"sharded": f["sharded"], "rest": f["rest"], "devices": f["devices"],
                    "lowest option": min([*f["precision"], f["offload_opt"]])}}


def name(row: dict) -> str:
    m = row["mesh"]
    return (f"fsdp={m['fsdp']} x expert={m['expert']} x tensor={m['tensor']}, remat="
            f"{row['remat']}, grad_accum={row['grad_accum']}")


def line(row: dict) -> str:
    if not row["fits"]:
        return f"  {name(row):<58} does not fit (compiled peak {row['peak'] / GiB:,.1f} GiB)"
    c = row["choice"]
    return (f"  {name(row):<58} {row['step_s'] * 1e3:10,.0f} ms  MFU {row['mfu']:5.1%}  "
            f"{c['peak'] / GiB:7,.1f} GiB  {c['option']}, {row['bound']}-bound")


def search_lines(results: list[dict], chip, devices: int, load=None, step: int = 0) -> list[str]:
    fitting = [r for r in results if r["fits"]]
    routing = ("balanced routing" if load is None else
               f"routing as logged at step {step:,}")
    head = ["", f"search: {len(results)} layouts on {devices} devices of {chip.name}, "
            f"{len(fitting)} fit, {routing}"]
    if not fitting:
        best, hbm = results[0], chip.hbm_gib / chip.devices_per_chip
        w = best["why"]
        more = (f"{w['devices']} devices of this kind at these tokens per device"
                if w["devices"] else "fewer tokens per device first")
        return head + [
            f"answer: none fits {hbm:,.1f} GiB. The smallest peak: {name(best)}, "
            f"{best['peak'] / GiB:,.1f} GiB = state and gradients {w['sharded'] / GiB:,.1f} + "
            f"the rest {w['rest'] / GiB:,.1f}; its best of bf16 dtypes and host moments "
            f"{w['lowest option'] / GiB:,.1f}. What would: {more}"]
    best = fitting[0]
    lines = head + [f"answer: {name(best)}: {best['step_s'] * 1e3:,.0f} ms per step, MFU "
                    f"{best['mfu']:.1%}, {best['choice']['option']}", best["run"],
                    best["budget"], "runners-up:"]
    lines += [line(r) for r in fitting[1:6]]
    return lines
