"""Size a run before paying for it: compile its train step for simulated devices.

  python -m moejax.plan --config configs/X.py[:variant] --mesh data=D,expert=X [--config.a.b=v]

Nothing is allocated and nothing runs. The model, optimizer state and batch are abstract
arrays (shape, dtype, sharding); the train step is compiled by XLA:CPU for D x X host devices
(`--xla_force_host_platform_device_count`), and the report is read off the executable.

Conventions (docs/benchmarks.md, "Planner", checks them against measurements):
- Memory per device = arguments + outputs - outputs aliased to donated arguments + temporaries,
  from the compiled memory analysis. The trainer's first step runs on the layout it initializes
  (train.py leaves optimizer state replicated); XLA picks the layout of the state it returns,
  and every later step runs on that one. Both are compiled when they differ; the peak is the
  larger. Temporaries are XLA:CPU's buffer assignment: GPU and TPU fuse differently.
- Collectives: payload = bytes of the operands one device hands to the op (an all-to-all's
  payload includes the block addressed to itself); wire = what leaves the device with the usual
  algorithms: all-to-all and reduce-scatter (n-1)/n of the payload, ring all-reduce 2(n-1)/n,
  all-gather (n-1) x, collective-permute 1 x, for groups of n devices. Ops inside loops count
  once per iteration.
- All-to-all minimum, per MoE layer forward: dispatch and return each move the [E*C, d] slot
  buffer of every capacity group, 2 x groups x E x C x d x bytes = 2 x tokens x k x cf x d x
  bytes, summed over devices, with C rounded up as the router does. The backward pass moves
  the cotangents of both, the same again.
"""

import math
import os
import re
import sys
import time

COLLECTIVES = ("all-to-all", "all-reduce", "all-gather", "reduce-scatter", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
               "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
# Bytes that leave a device per payload byte, for a group of n devices (see the docstring).
WIRE = {"all-to-all": lambda n: (n - 1) / n, "reduce-scatter": lambda n: (n - 1) / n,
        "all-reduce": lambda n: 2 * (n - 1) / n, "all-gather": lambda n: n - 1,
        "collective-permute": lambda n: 1.0}
MiB = 2**20


def parse_mesh(text: str) -> dict:
    """'data=16,expert=16' -> {'data': 16, 'expert': 16}."""
    mesh = {}
    for part in filter(None, text.split(",")):
        name, _, size = part.partition("=")
        if name.strip() not in ("data", "expert") or not size.strip().isdigit():
            raise ValueError(f"--mesh {text!r}: expected data=D,expert=X with positive sizes")
        mesh[name.strip()] = int(size)
    return mesh


# --- HLO text -> bytes each collective moves ------------------------------------------------

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(?:body|condition|calls|to_apply)=%([\w.-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string: one array or a tuple of them."""
    return sum(DTYPE_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY.findall(shape))


def _group_size(attrs: str, num_devices: int) -> int:
    if m := re.search(r"replica_groups=\[\d+,(\d+)\]<=", attrs):  # iota form [groups,size]<=..
        return int(m.group(1))
    if m := re.search(r"replica_groups=\{\{([\d,]*)\}", attrs):
        return len(m.group(1).split(","))
    return num_devices  # {} = every device


def collective_bytes(hlo: str, num_devices: int) -> dict:
    """{op: {'count', 'payload', 'wire'}} per device per call of an optimized, SPMD-partitioned
    HLO module (`compiled.as_text()`); ops in a while body count known_trip_count times."""
    computations, instructions, roots, entry = {}, {}, {}, None
    for line in hlo.splitlines():
        if m := _COMPUTATION.match(line):
            current = m.group(1)
            computations[current] = []
            entry = current if line.startswith("ENTRY") else entry
        elif computations and (m := _INSTRUCTION.match(line)):
            name, shape, op, rest = m.groups()
            instructions[name] = (shape, op, rest)
            computations[current].append(name)
            if line.lstrip().startswith("ROOT"):
                roots[current] = name

    def operands(rest):
        return re.findall(r"%([\w.-]+)", rest.split(")", 1)[0])

    def sent_bytes(name):
        # XLA:CPU has no bf16 collectives: it rounds the operand to bf16 and converts it to f32
        # (convert(convert(x)), often inside a fusion), doubling what a GPU or TPU sends. Count
        # such an operand at the narrow width the program asked for.
        shape, op, rest = instructions.get(name, ("", "", ""))
        if op == "fusion" and (m := _CALLEE.search(rest)) and m.group(1) in roots:
            _, op, rest = instructions[roots[m.group(1)]]
        inner = instructions.get(next(iter(operands(rest)), ""), ("", "", ""))
        if op == "convert" and inner[1] == "convert":
            return min(_shape_bytes(shape), _shape_bytes(inner[0]))
        return _shape_bytes(shape)

    # Computations are printed callees first, ENTRY last: walk backwards to give every
    # computation the number of times it runs per call before reaching what it calls.
    runs = dict.fromkeys(computations, 0)
    runs[entry] = 1
    for comp in reversed(computations):
        for name in computations[comp]:
            _, op, rest = instructions[name]
            trips = 1
            if op == "while":
                m = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                trips = int(m.group(1)) if m else 1  # unknown: counted once
            callees = _CALLEE.findall(rest)
            for branches in _BRANCHES.findall(rest):
                callees += re.findall(r"%([\w.-]+)", branches)
            for callee in callees:
                if callee in runs:
                    runs[callee] += runs[comp] * trips
    out = {op: {"count": 0, "payload": 0, "wire": 0.0} for op in COLLECTIVES}
    for comp, names in computations.items():
        for name in names:
            _, op, rest = instructions[name]
            base = op.removesuffix("-start")
            if base not in out or runs[comp] == 0:
                continue
            payload = runs[comp] * sum(sent_bytes(o) for o in operands(rest))
            out[base]["count"] += runs[comp]
            out[base]["payload"] += payload
            out[base]["wire"] += payload * WIRE[base](_group_size(rest, num_devices))
    return out


# --- The analytical all-to-all minimum --------------------------------------------------------

def alltoall_minimum(config, num_devices: int) -> dict:
    """Bytes the MoE all-to-alls must move per train step, summed over devices (see docstring).

    Groups and capacity follow the layer: `model.num_groups` groups per micro-batch (0 = one per
    device), C = router.capacity(tokens per group); `grad_accum` micro-batches per step. Expert
    choice fills the same [E*C, d] buffers, so the same bound holds."""
    import numpy as np

    from moejax.model import DTYPES, moe_layer_ids
    from moejax.moe.router import capacity

    mc, tc = config.model, config.train
    tokens = config.data.batch_size * config.data.seq_len
    groups = mc.num_groups or num_devices
    per_group = tokens // tc.grad_accum // groups
    # As moe_ffn sizes its buffers on CPU, the program planned here: capped at the group, and
    # the whole group when dropless (XLA:CPU has no ragged all-to-all, so C is the worst case;
    # a GPU or TPU moves only the rows that exist).
    cap = per_group if mc.dropless else min(per_group, capacity(
        per_group, mc.num_experts, mc.top_k, mc.capacity_factor, mc.min_capacity))
    layers = len(moe_layer_ids(mc))
    itemsize = np.dtype(DTYPES[mc.dtype]).itemsize
    per_layer = 2 * tc.grad_accum * groups * mc.num_experts * cap * mc.d_model * itemsize
    # Dropless on GPU/TPU (moe/ragged.py): every assignment's row goes out and back once.
    ragged = 2 * tokens * mc.top_k * mc.d_model * itemsize if mc.dropless else 0
    return {"moe_layers": layers, "groups": groups, "tokens_per_group": per_group,
            "capacity": cap, "effective_cf": mc.num_experts * cap / (per_group * mc.top_k),
            "nominal_per_layer": 2 * tokens * mc.top_k * mc.capacity_factor * mc.d_model
            * itemsize, "per_layer": per_layer, "forward": layers * per_layer,
            "step": 2 * layers * per_layer, "ragged_forward": layers * ragged}


# --- Abstract state and the compiled step -----------------------------------------------------

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


def abstract_state(config, mesh):
    """(model, state, tx, lr): an abstract model and the train state as train.py first lays it
    out, as abstract arrays."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from moejax.model import Transformer
    from moejax.train import make_optimizer

    tx, lr = make_optimizer(config.train)
    model = nnx.eval_shape(lambda: Transformer(config.model, mesh=mesh,
                                               rngs=nnx.Rngs(config.seed)))
    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          params, nnx.get_named_sharding(params, mesh))
    # train.init_state runs jax.jit(tx.init) and replicates whatever did not land on the mesh
    # (parallel.replicate_unplaced, which needs concrete arrays); ask the compiler the same
    # question. Keep in step with init_state.
    placed = jax.jit(tx.init).lower(params).compile().output_shardings

    def laid_out(a, s):
        on_mesh = isinstance(s, NamedSharding) and s.mesh == mesh
        return jax.ShapeDtypeStruct(a.shape, a.dtype,
                                    sharding=s if on_mesh else NamedSharding(mesh, P()))

    opt_state = jax.tree.map(laid_out, jax.eval_shape(tx.init, params), placed)
    return model, {"params": params, "opt_state": opt_state}, tx, lr


def bytes_per_device(tree) -> int:
    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)
    return {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "aliased": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes, "peak": peak}


def plan(config, mesh_shape: tuple[int, int]) -> dict:
    """Compile the train step of `config` on a data x expert mesh of the available (simulated)
    devices; return sizes in bytes, per device unless a key says global."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from moejax import config_lib, parallel
    from moejax.flops import train_flops_per_token
    from moejax.params import param_counts
    from moejax.train import train_step

    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.mesh.data, config.mesh.expert = mesh_shape
    resolve_vocab(config)
    config_lib.validate(config, jax.device_count())
    mesh = parallel.make_mesh(*config_lib.mesh_shape(config, jax.device_count()))
    num_devices = mesh.size
    mc, seq_len = config.model, config.data.seq_len

    start = time.perf_counter()
    model, state, tx, lr = abstract_state(config, mesh)
    tokens = jax.ShapeDtypeStruct((config.data.batch_size, seq_len + 1), jnp.int32,
                                  sharding=parallel.token_sharding(mesh))
    step_fn = jax.jit(functools.partial(train_step, graphdef=nnx.graphdef(model), tx=tx, lr=lr,
                                        config=config), donate_argnums=0)

    def compile_on(state):
        return step_fn.lower(state, tokens, jax.ShapeDtypeStruct((), jnp.int32)).compile()

    initial = state
    first = compiled = compile_on(state)
    returned = compiled.output_shardings[0]
    if not all(a.sharding.is_equivalent_to(b, len(a.shape)) for a, b in
               zip(jax.tree.leaves(state), jax.tree.leaves(returned), strict=True)):
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             state, returned)
        compiled = compile_on(state)
    compile_s = time.perf_counter() - start

    mem = memory(compiled)
    first_peak = memory(first)["peak"]
    counts = param_counts(model, mc.top_k, mc.num_experts)
    comm = collective_bytes(compiled.as_text(), num_devices)
    minimum = alltoall_minimum(config, num_devices) if mc.num_experts else None
    return {
        "mesh": {"data": mesh.shape["data"], "expert": mesh.shape["expert"]},
        "devices": num_devices, "compile_s": compile_s,
        "params_total": counts["total"], "params_active": counts["active"],
        "flops_per_token": train_flops_per_token(counts["active"], mc, seq_len),
        "tokens_per_step": config.data.batch_size * seq_len,
        "grad_accum": config.train.grad_accum,
        "state": {"params": bytes_per_device(state["params"]),
                  "opt_state": bytes_per_device(state["opt_state"])},
        "first_step_opt_state": bytes_per_device(initial["opt_state"]),
        "memory": {**mem, "first_step_peak": first_peak},
        "collectives": comm,
        "alltoall_min": minimum,
    }


# --- Report -------------------------------------------------------------------------------

def report(p: dict, title: str = "") -> str:
    mem, st, n = p["memory"], p["state"], p["devices"]
    mesh = f"data={p['mesh']['data']} x expert={p['mesh']['expert']}"
    lines = [
        f"plan: {title + ', ' if title else ''}mesh {mesh} ({n} simulated devices), "
        f"compiled in {p['compile_s']:.0f} s",
        f"parameters      {p['params_total'] / 1e6:,.1f}M total, "
        f"{p['params_active'] / 1e6:,.1f}M active per token",
        f"train FLOPs     {p['flops_per_token'] / 1e6:,.1f} MFLOP per token; "
        f"{p['tokens_per_step']:,} tokens per step ({p['tokens_per_step'] // n:,} per device, "
        f"grad_accum {p['grad_accum']})",
        "",
        "memory per device (XLA:CPU)                 MiB",
        f"  parameters                       {st['params'] / MiB:12,.1f}",
        f"  optimizer state                  {st['opt_state'] / MiB:12,.1f}",
        f"  arguments (state + batch)        {mem['arguments'] / MiB:12,.1f}",
        f"  outputs not aliased to donated   {(mem['outputs'] - mem['aliased']) / MiB:12,.1f}",
        f"  temporaries                      {mem['temp'] / MiB:12,.1f}",
        f"  peak, every step after the first {mem['peak'] / MiB:12,.1f}",
    ]
    if mem["first_step_peak"] != mem["peak"]:
        lines.append(f"  peak, first step                 {mem['first_step_peak'] / MiB:12,.1f}"
                     f"  (optimizer state as initialized: "
                     f"{p['first_step_opt_state'] / MiB:,.1f})")
    lines += ["", "collectives per step, per device   count   payload MiB     wire MiB"]
    for op, c in p["collectives"].items():
        if c["count"]:
            lines.append(f"  {op:<30} {c['count']:>7} {c['payload'] / MiB:13,.2f}"
                         f" {c['wire'] / MiB:12,.2f}")
    lines += ["  payload = the operands a device hands to the op; wire = what leaves the device:",
              "  (n-1)/n of the payload for all-to-all, 2(n-1)/n for ring all-reduce, n per group"]
    a = p["alltoall_min"]
    if a:
        ep = p["mesh"]["expert"]
        measured = p["collectives"]["all-to-all"]["payload"]
        lines += [
            "",
            f"all-to-all minimum: {a['moe_layers']} MoE layers, {a['groups']} groups of "
            f"{a['tokens_per_group']:,} tokens, C = {a['capacity']} "
            f"(cf {a['effective_cf']:.3f} once rounded up)",
            f"  one layer's forward, all devices {a['per_layer'] / MiB:12,.2f} MiB   "
            f"(2 x tokens x k x cf x d x bytes: {a['nominal_per_layer'] / MiB:,.2f})",
            f"  per device, forward              {a['forward'] / n / MiB:12,.2f} MiB payload, "
            f"{a['forward'] / n * (ep - 1) / ep / MiB:,.2f} wire",
            f"  per device, forward + backward   {a['step'] / n / MiB:12,.2f} MiB payload, "
            f"{a['step'] / n * (ep - 1) / ep / MiB:,.2f} wire",
            f"  compiled / minimum (payload)     {measured / (a['step'] / n):12.3f}"
            if ep > 1 else "  mesh.expert = 1: every token stays on its device",
        ]
        if a["ragged_forward"] and ep > 1:
            # A device's rows, one way, per MoE layer and micro-batch; it receives for ep.
            rows = a["ragged_forward"] / (2 * a["moe_layers"] * n * p["grad_accum"])
            lines += [
                "  dropless on GPU/TPU (ragged all-to-all, not compiled here): "
                f"{a['ragged_forward'] / n / MiB:,.2f} MiB payload per device forward;",
                f"  its receive buffers hold {ep} devices' rows, {rows * ep / MiB:,.2f} MiB "
                "per MoE layer and device",
            ]
    return "\n".join(lines)


def main() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:variant]",
                                    lock_config=True)
    flags.DEFINE_string("mesh", None, "data=D,expert=X (default: the config's mesh)")
    flags.mark_flags_as_required(["config"])
    try:
        flags.FLAGS(sys.argv)
        config = flags.FLAGS.config
        mesh = {"data": config.mesh.data, "expert": config.mesh.expert,
                **parse_mesh(flags.FLAGS.mesh or "")}
    except (flags.Error, ValueError, KeyError, AttributeError) as e:
        sys.exit(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if min(mesh.values()) < 1:
        sys.exit(f"error: mesh {mesh}: give every size, e.g. --mesh data=16,expert=16")

    # The simulated devices must exist before jax starts, so jax is imported only now.
    count = mesh["data"] * mesh["expert"]
    xla_flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                       os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{xla_flags} --xla_force_host_platform_device_count={count}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    from moejax import config_lib

    try:
        p = plan(config, (mesh["data"], mesh["expert"]))
    except config_lib.ConfigError as e:
        sys.exit(f"error: {e}")
    print(report(p, flags.FLAGS["config"].config_filename))


if __name__ == "__main__":
    main()
