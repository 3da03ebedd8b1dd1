"""Size a run before paying for it: compile its train step for simulated devices.

  python -m moejax.plan --config configs/X.py[:variant] [--mesh fsdp=8,expert=8]
      [--hbm_gib 80] [--config.model.remat=full]

Nothing is allocated and nothing runs. The state comes from `state.setup` (abstract arrays
with the trainer's shardings), the train step is `state.train_step_fn`, compiled by XLA:CPU
for exactly the mesh's number of host devices (`--xla_force_host_platform_device_count`), and
the report is read off the executable. `--mesh` names any of data, fsdp, expert, tensor;
the others keep the config's sizes, and a -1 ("the remaining devices") is 1 here.

Conventions (docs/memory.md checks them against a real run):
- Memory per device = arguments + outputs - outputs aliased to donated arguments + temporaries,
  from the compiled memory analysis. Parameters and optimizer state are exact for any backend
  (the step takes and returns them in one layout, donated). Temporaries are XLA:CPU's buffer
  assignment: GPU and TPU fuse differently (and have fused attention).
- Precision: the state and the inference weights at each dtype setting are arithmetic on the
  real shard shapes (`moejax/params.py`); only the config's own setting is compiled.
- Collectives: payload and wire bytes per device as `moejax/collectives.py` reads them off the
  optimized HLO.
- All-to-all minimum, per MoE layer forward: dispatch and return each move the [E*C, d] slot
  buffer of every capacity group, 2 x groups x E x C x d x bytes = 2 x tokens x k x cf x d x
  bytes, summed over token shards, with C rounded up as the router does. The backward pass
  moves the cotangents of both, the same again; with remat it first reruns the forward's.
"""

import math
import os
import re
import sys
import time

from moejax.collectives import collective_bytes

MiB, GiB = 2**20, 2**30


def parse_mesh(text: str) -> dict:
    """'fsdp=8,expert=8' -> {'fsdp': 8, 'expert': 8}; names are parallel.AXES."""
    from moejax.parallel import AXES  # imports jax, which reads XLA_FLAGS only when it starts

    mesh = {}
    for part in filter(None, text.split(",")):
        name, _, size = (s.strip() for s in part.partition("="))
        if name not in AXES or not size.isdigit() or int(size) < 1:
            raise ValueError(f"--mesh {text!r}: expected name=size with names from "
                             f"{', '.join(AXES)} and sizes >= 1")
        mesh[name] = int(size)
    return mesh


# --- The analytical all-to-all minimum --------------------------------------------------------

def alltoall_minimum(config, sizes: dict) -> dict:
    """Bytes the MoE all-to-alls must move per train step, summed over token shards (see the
    module docstring); `sizes` is {mesh axis: size}.

    Groups and capacity follow the layer: `model.num_groups` groups per micro-batch (0 = one per
    token shard, data x fsdp x expert devices), C = router.capacity(tokens per group);
    `grad_accum` micro-batches per step. The exchange runs within the expert axis. Expert
    choice fills the same [E*C, d] buffers, so the same bound holds. With remat (full or
    matmuls, which saves the combined output, not the buffers) the backward pass recomputes
    the forward's exchanges: three passes, not two."""
    import numpy as np

    from moejax.model import DTYPES, moe_layer_ids
    from moejax.moe.router import capacity
    from moejax.parallel import TOKEN_AXES

    mc, tc = config.model, config.train
    tokens = config.data.batch_size * config.data.seq_len
    token_shards = math.prod(sizes.get(a, 1) for a in TOKEN_AXES)
    groups = mc.num_groups or token_shards
    per_group = tokens // tc.grad_accum // groups
    # As moe_ffn sizes its buffers: capped at the group. Dropless has no buffers and no
    # all-to-all; its rows travel by ragged all-to-all (GPU, TPU) or the ring (moe/dropless.py).
    dropless = mc.dispatch != "capacity"
    cap = 0 if dropless else min(per_group, capacity(
        per_group, mc.num_experts, mc.top_k, mc.capacity_factor, mc.min_capacity))
    layers = len(moe_layer_ids(mc))
    itemsize = np.dtype(DTYPES[mc.dtype]).itemsize
    per_layer = 2 * tc.grad_accum * groups * mc.num_experts * cap * mc.d_model * itemsize
    # Ragged all-to-all: every assignment's row goes out and back once.
    ragged = 2 * tokens * mc.top_k * mc.d_model * itemsize if mc.dispatch == "dropless" else 0
    passes = 2 if mc.remat == "none" else 3
    return {"moe_layers": layers, "groups": groups, "tokens_per_group": per_group,
            "token_shards": token_shards, "expert": sizes.get("expert", 1), "passes": passes,
            "capacity": cap, "dropless": dropless,
            "effective_cf": mc.num_experts * cap / (per_group * mc.top_k),
            "nominal_per_layer": 2 * tokens * mc.top_k * mc.capacity_factor * mc.d_model
            * itemsize, "per_layer": per_layer, "forward": layers * per_layer,
            "step": passes * layers * per_layer, "ragged_forward": layers * ragged}


# --- The compiled step ----------------------------------------------------------------------

def resolve_vocab(config) -> None:
    """vocab_size = 0 means the tokenizer's: load it (offline, this needs it on disk)."""
    from moejax import config_lib, data

    if config.model.vocab_size:
        return
    try:
        size = data.make_tokenizer(config.data.tokenizer).vocab_size
    except Exception as e:  # no network, no cache
        raise config_lib.ConfigError(
            f"model.vocab_size=0 and tokenizer {config.data.tokenizer!r} could not be loaded "
            f"({type(e).__name__}); pass --config.model.vocab_size=N") from None
    with config.unlocked():
        config.model.vocab_size = size


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)
    return {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "aliased": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes, "peak": peak}


def plan(config, mesh: dict | None = None) -> dict:
    """Compile the train step of `config` on the available (simulated) devices, the config's
    mesh updated by `mesh` ({axis: size}); return sizes in bytes, per device unless a key says
    global."""
    import jax
    import jax.numpy as jnp

    from moejax import config_lib, parallel, state
    from moejax.flops import train_flops_per_token
    from moejax.params import bytes_per_device, param_counts, precision_table

    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.mesh.update(mesh or {})
    resolve_vocab(config)
    config_lib.validate(config, jax.device_count())
    sizes = parallel.mesh_sizes(config.mesh, jax.device_count())
    mesh = parallel.make_mesh(sizes)
    mc, seq_len = config.model, config.data.seq_len

    start = time.perf_counter()
    setup = state.setup(config, mesh)
    tokens = jax.ShapeDtypeStruct((config.data.batch_size, seq_len + 1), jnp.int32,
                                  sharding=parallel.token_sharding(mesh))
    step = jax.ShapeDtypeStruct((), jnp.int32)
    compiled = state.train_step_fn(setup).lower(setup.abstract, tokens, step).compile()
    compile_s = time.perf_counter() - start

    counts = param_counts(setup.model, mc.top_k, mc.num_experts)
    # XLA:CPU's attention materializes the scores, [B, heads, S, S] in f32, on each device
    # (a few at once); fused attention on GPU/TPU never does. Shown beside the temporaries.
    rows = config.data.batch_size // config.train.grad_accum // parallel.num_token_shards(mesh)
    heads = mc.num_heads // (sizes["tensor"] if mc.num_heads % sizes["tensor"] == 0 else 1)

    def whole(tree):  # bytes of the arrays, not of one device's shards
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


    return {
        "mesh": {a: mesh.shape[a] for a in parallel.AXES}, "devices": mesh.size,
        "compile_s": compile_s, "remat": mc.remat,
        "params_total": counts["total"], "params_active": counts["active"],
        "flops_per_token": train_flops_per_token(counts["active"], mc, seq_len),
        "tokens_per_step": config.data.batch_size * seq_len,
        "grad_accum": config.train.grad_accum,
        "state": {k: bytes_per_device(setup.abstract[k]) for k in ("params", "opt_state")},
        "state_global": whole(setup.abstract), "params_global": whole(setup.abstract["params"]),
        "precision": precision_table(config, setup),
        "memory": memory(compiled), "attention_scores": rows * heads * seq_len**2 * 4,
        "collectives": collective_bytes(compiled.as_text(), mesh.size),
        "alltoall_min": alltoall_minimum(config, sizes) if mc.num_experts else None,
    }


def fit(p: dict, hbm: float) -> dict:
    """Does the plan fit `hbm` bytes per device, and what the plan's own numbers say would:
    every figure is arithmetic on them, nothing is recompiled (docs/memory.md checks some)."""
    params, opt = p["state"]["params"], p["state"]["opt_state"]
    peak = p["memory"]["peak"]
    # The step also holds one gradient per parameter, in its dtype and layout (the scan over
    # micro-batches carries them): with the state, what splitting over more devices shrinks.
    sharded = 2 * params + opt
    rest = peak - sharded  # activations, other temporaries, the batch
    return {
        "fits": peak <= hbm, "peak": peak, "sharded": sharded, "rest": rest,
        # State and gradients split evenly over N devices (fsdp x expert = N, every dim
        # divisible), tokens per device and so the rest unchanged.
        "devices": (math.ceil((p["state_global"] + p["params_global"]) / (hbm - rest))
                    if hbm > rest else None),
        # Each precision row's state and gradients in place of this config's, the rest as
        # compiled (its activations follow model.dtype, which no row changes).
        "precision": [rest + r["bytes"]["total"] for r in p["precision"]["train"]],
        "offload_opt": peak - opt,  # optimizer state in host memory between steps
    }


# --- Report -------------------------------------------------------------------------------

def report(p: dict, title: str = "", hbm_gib: float = 80.0) -> str:
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
        "  ([B, heads, S, S] f32: XLA:CPU's, not flash attention's)",
        f"  peak                             {mem['peak'] / scale:12,.2f}",
    ]
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
    return "\n".join(lines)


def verdict(p: dict, hbm_gib: float) -> list[str]:
    f, hbm = fit(p, hbm_gib * GiB), hbm_gib * GiB
    if f["fits"]:
        return [f"verdict: AdamW training fits {hbm_gib:g} GiB per device "
                f"({(hbm - f['peak']) / GiB:,.1f} GiB spare)"]
    out = [f"verdict: AdamW training does not fit {hbm_gib:g} GiB per device: peak "
           f"{f['peak'] / GiB:,.1f} = state and gradients {f['sharded'] / GiB:,.1f} + "
           f"the rest {f['rest'] / GiB:,.1f}. What would, from these numbers:"]
    whole = (p["state_global"] + p["params_global"]) / GiB
    if f["devices"]:
        out.append(f"  {f['devices']} devices, state and gradients split over all (fsdp x "
                   f"expert), tokens per device as now: {whole:,.1f} / ({hbm_gib:g} - "
                   f"{f['rest'] / GiB:,.1f}) GiB")
    else:
        out.append(f"  no device count: the rest alone is {f['rest'] / GiB:,.1f} GiB; "
                   "fewer tokens per device would shrink it")
    for row, peak in zip(p["precision"]["train"], f["precision"], strict=True):
        if not row["own"]:
            ok = "fits" if peak <= hbm else "does not fit"
            out.append(f"  {setting_name(row):<54} {peak / GiB:8,.1f} GiB: {ok}")
    ok = "fits" if f["offload_opt"] <= hbm else "does not fit"
    out.append(f"  {'optimizer state on the host: peak - moments':<54} "
               f"{f['offload_opt'] / GiB:8,.1f} GiB: {ok}")
    if p["remat"] != "full":
        out.append("  or rerun with --config.model.remat=full (recompute the blocks' forward)")
    return out


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


def main() -> None:
    from absl import flags
    from ml_collections import config_flags

    from moejax import cli, config_lib  # import no jax: XLA_FLAGS can still be set below

    config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:variant]",
                                    lock_config=True)
    flags.DEFINE_string("mesh", None, "fsdp=8,expert=8: sizes of data, fsdp, expert, tensor "
                        "(axes left out keep the config's)")
    flags.DEFINE_float("hbm_gib", 80.0, "device memory for the verdict, GiB")
    flags.mark_flags_as_required(["config"])
    try:
        cli.parse_flags(sys.argv, __doc__)  # --help, bad flags and config files
        config = flags.FLAGS.config
        # -1 means "the remaining devices", and only the devices the rest need are made.
        mesh = {a: max(int(s), 1) for a, s in config.mesh.items()}
        mesh.update(parse_mesh(flags.FLAGS.mesh or ""))
    except (flags.Error, ValueError, KeyError, AttributeError) as e:
        sys.exit(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")

    # The simulated devices must exist before jax's CPU backend starts (at its first use).
    xla_flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                       os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = (f"{xla_flags} --xla_force_host_platform_device_count="
                               f"{math.prod(mesh.values())}")
    os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        p = plan(config, mesh)
    except config_lib.ConfigError as e:
        sys.exit(f"error: {e}")
    print(report(p, flags.FLAGS["config"].config_filename, flags.FLAGS.hbm_gib))


if __name__ == "__main__":
    main()
