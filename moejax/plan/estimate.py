"""What a config's train step needs on a mesh, without its hardware: compiled for simulated
devices (XLA:CPU), read off the executable; the all-to-all minimum beside it. The report and
its conventions are report.py's; `python -m moejax.plan` runs both."""

import math
import time

from moejax.plan.collectives import collective_bytes, collective_records

MiB, GiB = 2**20, 2**30


def alltoall_minimum(config, sizes: dict) -> dict:
    """Bytes the MoE all-to-alls must move per train step, summed over token shards (see the
    module docstring); `sizes` is {mesh axis: size}.

    Groups and capacity follow the layer: `model.num_groups` groups per micro-batch (0 = one per
    token shard, data x fsdp x expert x context devices), C = router.capacity(tokens per group);
    `grad_accum` micro-batches per step. The exchange runs within the expert axis. Expert
    choice fills the same [E*C, d] buffers, so the same bound holds. With remat (full or
    matmuls, which saves the combined output, not the buffers) the backward pass recomputes
    the forward's exchanges: three passes, not two."""
    import numpy as np

    from moejax.model.layers import DTYPES
    from moejax.model.transformer import moe_layer_ids
    from moejax.moe.router import capacity
    from moejax.parallel import TOKEN_SHARD_AXES

    mc, tc = config.model, config.train
    tokens = config.data.batch_size * config.data.seq_len
    # Rows over data x fsdp x expert, each row's positions over context.
    token_shards = math.prod(sizes.get(a, 1) for a in TOKEN_SHARD_AXES)
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


def resolve_vocab(config) -> None:
    """vocab_size = 0 means the tokenizer's: load it (offline, this needs it on disk)."""
    from moejax import config_lib
    from moejax.data import text

    if config.model.vocab_size:
        return
    try:
        size = text.make_tokenizer(config.data.tokenizer).vocab_size
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


def optimizer_update(setup) -> dict | None:
    """With train.optimizer=muon, the optimizer's update compiled alone, gradients and state
    laid out as in the train step (of which it is a part): its FLOPs per device and its
    collectives. Newton-Schulz needs each matrix whole, so XLA gathers what fsdp and tensor
    split of it, or keeps it split and reduces partial products; the HLO says which, and what
    it moves. None with AdamW (elementwise: its only collective is the gradient norm's)."""
    import jax

    from moejax.run import optim

    if setup.config.train.optimizer != "muon":
        return None
    sh, ab = setup.shardings, setup.abstract
    compiled = jax.jit(setup.tx.update, out_shardings=(sh["params"], sh["opt_state"])).lower(
        ab["params"], ab["opt_state"], ab["params"]).compile()
    # FLOPs by arithmetic: XLA's cost analysis counts a loop's body once, and optax runs the
    # iterations in one.
    return {"newton_schulz_flops": optim.newton_schulz_flops(ab["params"]),
            "per_device": optim.newton_schulz_flops(ab["params"], per_device=True),
            "collectives": collective_bytes(compiled.as_text(), setup.mesh.size)}


def model_summary(config, counts: dict) -> dict:
    """What plan/predict.py prices besides the compiled step: the routed experts' active
    weights, depth, width, activation bytes, quantization, attention's FLOPs per token and
    the MoE layers' shape (dropless: what was compiled; predict.plan_priced says what the
    user asked for)."""
    import numpy as np

    from moejax.model.layers import DTYPES
    from moejax.model.transformer import moe_layer_ids
    from moejax.run.flops import train_attention_flops_per_token

    mc = config.model
    return {"expert_active": (counts["expert"] * mc.top_k // mc.num_experts
                              if mc.num_experts else 0),
            "layers": mc.num_layers + mc.mtp_layers, "d_model": mc.d_model,
            "act_bytes": np.dtype(DTYPES[mc.dtype]).itemsize, "quantization": mc.quantization,
            "attention_flops_per_token": train_attention_flops_per_token(
                mc, config.data.seq_len),
            "moe_layers": len(moe_layer_ids(mc, mtp=True)) if mc.num_experts else 0,
            **attention_shape(config),
            "num_experts": mc.num_experts, "top_k": mc.top_k, "d_ff": mc.d_ff,
            "dropless": mc.dispatch != "capacity"}


def attention_shape(config) -> dict:
    """What plan/attention_cost.py needs to price attention as model/kernels.causal runs it:
    the width its kernel runs at (MLA pads the narrower of its query-key and value widths to
    the wider: the executed FLOPs over the counted ones is `attention_padding`), heads,
    sequence, sinks and documents (on a GPU the two together cost a second q.k:
    sink_normalizer), and the window of every layer's attention (0: full causal; a fused
    kernel skips the key blocks outside a window: window_share)."""
    from moejax.model.transformer import layer_window

    mc = config.model
    qk, v = ((mc.qk_nope_head_dim + mc.qk_rope_head_dim, mc.v_head_dim)
             if mc.attention == "mla" else (mc.head_dim, mc.head_dim))
    return {"head_dim": max(qk, v), "attention_padding": 2 * max(qk, v) / (qk + v),
            "num_heads": mc.num_heads, "seq_len": config.data.seq_len,
            "attention_sinks": bool(mc.get("attention_sinks")),
            "documents": bool(config.data.get("documents")),
            "windows": [layer_window(mc, i) for i in range(mc.num_layers)]
            + [0] * mc.get("mtp_layers", 0)}


def plan(config, mesh: dict | None = None, fused_attention: bool = False) -> dict:
    """Compile the train step of `config` on the available (simulated) devices, the config's
    mesh updated by `mesh` ({axis: size}); return sizes in bytes, per device unless a key says
    global. `fused_attention`: the target runs a fused attention kernel, so XLA:CPU compiles
    its attention with such a kernel's memory (kernels.standing_in_for_fused), not with its
    own [S, S] scores."""
    import contextlib

    import jax
    import jax.numpy as jnp

    from moejax import config_lib, parallel
    from moejax.model import kernels
    from moejax.model.layers import DTYPES
    from moejax.run import state
    from moejax.run.flops import train_flops_per_token
    from moejax.run.params import bytes_per_device, param_counts, precision_table

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
    with kernels.standing_in_for_fused() if fused_attention else contextlib.nullcontext():
        compiled = state.train_step_fn(setup).lower(setup.abstract, tokens, step).compile()
    compile_s = time.perf_counter() - start
    hlo = compiled.as_text()
    update = optimizer_update(setup)

    counts = param_counts(setup.model, mc.top_k, mc.num_experts)
    # XLA:CPU's attention materializes the scores, [B, heads, S, S] in f32, on each device
    # (a few at once); fused attention on GPU/TPU never does. Shown beside the temporaries.
    # With the sequence split over context, a device's queries are S / context rows against
    # all S keys, 512 at a time on XLA:CPU (xla_attention.blockwise, moejax/model/context.py),
    # as every query is when it stands in for a target's fused kernel (fused_attention).
    rows = (config.data.batch_size // config.train.grad_accum
            // math.prod(sizes[a] for a in parallel.TOKEN_AXES))
    heads = mc.num_heads // (sizes["tensor"] if mc.num_heads % sizes["tensor"] == 0 else 1)
    query_rows = seq_len // sizes[parallel.SEQ_AXIS]
    keys = (seq_len if sizes[parallel.SEQ_AXIS] == 1 and not fused_attention
            else math.gcd(query_rows, 512))

    # Each layer's input of a micro-batch: what remat=full keeps and remat=offload keeps in
    # host memory instead of HBM (XLA:CPU has no memory apart from the host's: its peak above
    # counts them either way).
    layer_inputs = mc.num_layers * rows * query_rows * mc.d_model * jnp.dtype(
        DTYPES[mc.dtype]).itemsize

    def whole(tree):  # bytes of the arrays, not of one device's shards
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    return {
        "mesh": {a: mesh.shape[a] for a in parallel.AXES}, "devices": mesh.size,
        "compile_s": compile_s, "remat": mc.remat,
        "params_total": counts["total"], "params_active": counts["active"],
        "flops_per_token": train_flops_per_token(counts["active"], mc, seq_len),
        "tokens_per_step": config.data.batch_size * seq_len,
        "grad_accum": config.train.grad_accum, "steps": config.train.steps,
        "state": {k: bytes_per_device(setup.abstract[k]) for k in ("params", "opt_state")},
        "state_global": whole(setup.abstract), "params_global": whole(setup.abstract["params"]),
        # What train.offload_optimizer keeps in host memory: every optimizer array but the
        # step counts (state.at_rest).
        "moments": bytes_per_device([x for x in jax.tree.leaves(setup.abstract["opt_state"])
                                     if x.ndim]),
        "offload": bool(config.train.offload_optimizer),
        "precision": precision_table(config, setup),
        "memory": memory(compiled), "fused_attention": fused_attention,
        "attention_scores": rows * heads * query_rows * keys * 4,
        "layer_inputs": layer_inputs,
        "activation_offload": layer_inputs if mc.remat == "offload" else 0,
        "collectives": collective_bytes(hlo, mesh.size),
        "collective_records": collective_records(hlo, mesh.size),
        "model": model_summary(config, counts),
        "alltoall_min": alltoall_minimum(config, sizes) if mc.num_experts else None,
        "optimizer_update": update,
    }


def device_peak(p: dict) -> int:
    """The compiled peak less what remat=offload keeps in host memory."""
    return p["memory"]["peak"] - p["activation_offload"]


def offload(p: dict) -> dict:
    """Bytes per device with the optimizer's moments in host memory between steps
    (train.offload_optimizer, run/state.py), from the plan compiled without it (XLA:CPU has no
    memory apart from the host's). Forward and backward: the compiled peak less the moments.
    The update: one transfer brings the whole state's moments in, and the non-finite guard
    (`where(ok, new, old)`) keeps the old ones until the new ones are all computed, so the
    device then holds parameters + gradients + moments in + new moments, at least. The peak
    is the larger; the moments cross the host link twice per step, in and out."""
    moments, params = p["moments"], p["state"]["params"]
    at_rest = device_peak(p) - moments
    update = 2 * params + 2 * moments
    return {"moments": moments, "at_rest": at_rest, "update": update,
            "peak": max(at_rest, update), "transfer": 2 * moments}


def fit(p: dict, hbm: float) -> dict:
    """Does the plan fit `hbm` bytes per device, and what the plan's own numbers say would:
    every figure is arithmetic on them, nothing is recompiled (docs/memory.md checks some).
    With train.offload_optimizer the verdict is on offload(p)'s peak."""
    params, opt = p["state"]["params"], p["state"]["opt_state"]
    compiled = device_peak(p)
    peak = offload(p)["peak"] if p["offload"] else compiled
    # The step also holds one gradient per parameter, in its dtype and layout (the scan over
    # micro-batches carries them): with the state, what splitting over more devices shrinks.
    sharded = 2 * params + opt
    rest = compiled - sharded  # activations, other temporaries, the batch
    return {
        "fits": peak <= hbm, "peak": peak, "sharded": sharded, "rest": rest,
        # State and gradients split evenly over N devices (fsdp x expert = N, every dim
        # divisible), tokens per device and so the rest unchanged.
        "devices": (math.ceil((p["state_global"] + p["params_global"]) / (hbm - rest))
                    if hbm > rest else None),
        # Each precision row's state and gradients in place of this config's, the rest as
        # compiled (its activations follow model.dtype, which no row changes).
        "precision": [rest + r["bytes"]["total"] for r in p["precision"]["train"]],
        "offload_opt": offload(p)["peak"],  # optimizer state in host memory between steps
    }
