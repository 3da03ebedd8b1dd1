"""Benchmarks: `python -m moejax.bench layer` and `python -m moejax.bench train`.

layer: median fwd+bwd time of one MoE FFN against a dense SwiGLU FFN doing the same active
FLOPs (d_ff_dense = k * d_ff), one device, per expert count and dispatch. For the capacity
path the `experts` column times the expert FFN alone on its [E, C, d] buffers, so
moe - experts is what routing, dispatch and combine cost; dropless has no such buffers.
train: step time, tokens/s, achieved TFLOP/s per device and MFU of whole train steps
(optimizer included) of a config, once per MoE dispatch asked for, and of its dense twin with
equal active FLOPs (`num_experts = 0`), on the config's mesh over all local devices (the
state built, laid out and stepped by moejax.state).

Every timed function runs once per round, round-robin, so load from anything else on the
machine hits all columns alike; the ratios are medians of the per-round ratios.
"""

import argparse
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import config_lib, data, flops, hostmem, parallel, state
from moejax.config_lib import ConfigError
from moejax.moe.experts import capacity_experts, ffn, flat_in
from moejax.moe.layer import DISPATCHES, MoE, MoEConfig
from moejax.moe.router import capacity
from moejax.params import param_counts


def round_robin(fns: dict, repeats: int) -> dict:
    """{name: (fn, args)} -> {name: [seconds per round]}, one call of each per round."""
    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))  # compile and warm up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (fn, args) in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(times: list) -> float:
    return 1e3 * statistics.median(times)


def median_ratio(a: list, b: list) -> float:
    """Median over rounds of a / b: load that slows one round slows both of its calls."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def fwd_bwd(apply):
    """Loss sum(apply(params, x) * cotangent) and its gradient w.r.t. params and x: one fwd +
    one bwd, as in a train step. Asking for the loss keeps the whole forward: the gradient of
    this linear loss alone does not need apply's output, so XLA would drop the forward's last
    matmul (for the dense FFN, 1/9 of its fwd+bwd FLOPs)."""
    def loss(params, x, ct):
        return jnp.sum(apply(params, x) * ct)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


@functools.partial(jax.jit, static_argnums=0)
def moe_apply_aux(graphdef, params, x):
    return nnx.merge(graphdef, params)(x, train=True)[1]


def bench_layer(num_experts: int, tokens: int, d_model: int, d_ff: int, top_k: int,
                capacity_factor: float, repeats: int, dispatch: str = "capacity",
                dtype=jnp.float32) -> dict:
    """Medians in ms of `moe`, `experts` (capacity only, else None) and `dense` fwd+bwd, with
    `ratio` = moe / dense and `routing` = (moe - experts) / dense. Weights and activations
    are `dtype` (the router computes in float32 regardless, as in the model)."""
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (1, tokens, d_model), dtype)
    ct = jax.random.normal(keys[1], x.shape, dtype)

    cfg = MoEConfig(num_experts, top_k, capacity_factor, capacity_factor, min_capacity=1,
                    num_groups=1, dispatch=dispatch)
    graphdef, params = nnx.split(MoE(d_model, d_ff, cfg, "swiglu", mesh=None, rngs=nnx.Rngs(0),
                                     dtype=dtype, param_dtype=dtype))

    def moe_apply(params, x):
        return nnx.merge(graphdef, params)(x, train=True)[0]

    fns = {"moe": (fwd_bwd(moe_apply), (params, x, ct))}
    cap = None
    if dispatch == "capacity":
        # The experts column gets buffers filled as the router fills them for x (one group).
        cap = capacity(tokens, num_experts, top_k, capacity_factor)
        filled = jnp.minimum(moe_apply_aux(graphdef, params, x)["tokens_per_expert"], cap)
        buffers = jax.random.normal(keys[2], (num_experts, cap, d_model), dtype)
        buffers = jnp.where(jnp.arange(cap)[:, None] < filled[:, None, None], buffers, 0)
        # The expert kernel takes w_in [E, d, g, f] flattened to [E, d, g*f], as the layer does.
        weights = {"w_in": flat_in(params["w_in"][...]), "w_out": params["w_out"][...]}

        def experts_apply(w, xe):
            return capacity_experts(xe, w["w_in"], w["w_out"], "swiglu", filled[:, None])

        fns["experts"] = (fwd_bwd(experts_apply), (weights, buffers, buffers))

    dense_ff = top_k * d_ff
    dense = {
        "w_in": (jax.random.normal(keys[3], (d_model, 2, dense_ff)) * d_model**-0.5).astype(dtype),
        "w_out": (jax.random.normal(keys[4], (dense_ff, d_model)) * dense_ff**-0.5).astype(dtype),
    }

    def dense_apply(w, x):  # the model's dense FFN (w_in [d, 2, f]), no batch axis
        return ffn(x[0], w["w_in"], w["w_out"], "swiglu")[None]

    fns["dense"] = (fwd_bwd(dense_apply), (dense, x, ct))
    t = round_robin(fns, repeats)
    r = {"E": num_experts, "C": cap, "experts": None, "routing": None,
         **{name: median_ms(v) for name, v in t.items()},
         "ratio": median_ratio(t["moe"], t["dense"])}
    if "experts" in t:
        r["routing"] = statistics.median(
            (m - e) / d for m, e, d in zip(t["moe"], t["experts"], t["dense"], strict=True))
    return r


def stepping(s: state.Setup):
    """A function (tokens, step) -> the train step's outputs, on a state of its own that each
    call advances: the step donates the state it is given, so no two calls may pass the same."""
    step_fn, train_state = state.train_step_fn(s), state.init(s)

    def run(tokens, step):
        nonlocal train_state
        train_state, metrics = step_fn(train_state, tokens, step)
        return train_state, metrics

    return run


def vocab_size(config, override: int = 0) -> int:
    """The vocabulary to build: `override` (--vocab_size), else the config's, else the byte
    tokenizer's. Any other tokenizer's size needs that tokenizer, which bench does not load:
    guessing 257 would understate the logits' cost of gpt2's 50257 tokens 196-fold."""
    if override:
        return override
    if config.model.vocab_size:
        return config.model.vocab_size
    if config.data.tokenizer == "byte":
        return data.ByteTokenizer.vocab_size
    raise ConfigError(f"model.vocab_size=0 takes the size of tokenizer "
                      f"{config.data.tokenizer!r}, which bench does not load; pass "
                      "--vocab_size N")


def resolve(config, vocab: int = 0, batch_size: int = 0, seq_len: int = 0):
    """A copy of `config` with its vocabulary set (see vocab_size) and the batch and sequence
    length overridden where given (0 = the config's)."""
    c = config.copy_and_resolve_references()
    c.model.vocab_size = vocab_size(c, vocab)
    c.data.batch_size = batch_size or c.data.batch_size
    c.data.seq_len = seq_len or c.data.seq_len
    return c


def train_numbers(config, model, step_s: float, num_devices: int, device_kind: str) -> dict:
    """The figures of one row of `bench train`: a step of `config`'s batch took step_s seconds
    on num_devices devices of `device_kind`. MFU counts model FLOPs (the active parameters'
    matmuls and attention, flops.train_flops_per_token), not what the hardware ran: capacity
    padding and recomputation add work but no model FLOPs. It is None where no peak is known
    for the device (flops.PEAK_FLOPS) and train.peak_tflops does not give one."""
    mc, seq_len = config.model, config.data.seq_len
    active = param_counts(model, mc.top_k, mc.num_experts)["active"]
    tokens_per_step = config.data.batch_size * seq_len
    flops_per_s = flops.train_flops_per_token(active, mc, seq_len) * tokens_per_step / step_s
    peak = flops.device_peak_flops(device_kind, config.train.peak_tflops)
    return {"active_params": active, "step_ms": 1e3 * step_s,
            "tokens_per_s": tokens_per_step / step_s,
            "tflops_per_device": flops_per_s / num_devices / 1e12,
            "mfu": None if peak is None else flops_per_s / (num_devices * peak)}


def bench_train(config, steps: int, dispatches: list[str] | None = None) -> dict:
    """{'moe:<dispatch>' for each of `dispatches` (default: the config's own), 'dense': the
    train_numbers of its median step, plus `vs_dense`, the median per-round step-time ratio}."""
    config = resolve(config)
    mesh = parallel.make_mesh(parallel.mesh_sizes(config.mesh, jax.device_count()))
    seq_len, batch = config.data.seq_len, config.data.batch_size
    tokens = jax.random.randint(jax.random.key(0), (batch, seq_len + 1), 0,
                                config.model.vocab_size)
    tokens = jax.device_put(tokens, parallel.token_sharding(mesh))
    configs = {}
    for dispatch in dispatches or [config.model.dispatch]:
        configs[f"moe:{dispatch}"] = config.copy_and_resolve_references()
        configs[f"moe:{dispatch}"].model.dispatch = dispatch
    configs["dense"] = config.copy_and_resolve_references()
    configs["dense"].model.num_experts = 0
    fns, models = {}, {}
    for name, c in configs.items():
        config_lib.validate(c, jax.device_count())
        s = state.setup(c, mesh)
        fns[name], models[name] = (stepping(s), (tokens, jnp.int32(0))), s.model
    t = round_robin(fns, steps)
    kind = jax.devices()[0].device_kind
    return {name: {**train_numbers(configs[name], models[name], statistics.median(v),
                                   jax.device_count(), kind),
                   "vs_dense": median_ratio(v, t["dense"])}
            for name, v in t.items()}


def bench_compile(config, layers: list[int]) -> dict:
    """Seconds to lower and compile the train step (abstract state, nothing allocated) of
    `config` at each depth: with scanned layers the program does not grow with depth."""
    config = resolve(config)
    mesh = parallel.make_mesh(parallel.mesh_sizes(config.mesh, jax.device_count()))
    out = {}
    for n in layers:
        c = config.copy_and_resolve_references()
        c.model.num_layers = n
        config_lib.validate(c, jax.device_count())
        s = state.setup(c, mesh)
        tokens = jax.ShapeDtypeStruct((c.data.batch_size, c.data.seq_len + 1), jnp.int32,
                                      sharding=parallel.token_sharding(mesh))
        start = time.perf_counter()
        state.train_step_fn(s).lower(s.abstract, tokens, jnp.int32(0)).compile()
        out[n] = time.perf_counter() - start
    return out


def load_config(spec: str):
    """`configs/x.py[:variant]` -> the ConfigDict its get_config returns."""
    import importlib.util

    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant or None)


def cell(value, width: int, fmt: str) -> str:
    """`value` formatted and right-aligned, or '-' where the column does not apply."""
    return f"{'-' if value is None else format(value, fmt):>{width}}"


def print_train(r: dict, spec: str, config, repeats: int, device: str) -> None:
    c = config.data
    print(f"device: {device}; {spec}: batch {c.batch_size} x {c.seq_len} tokens, vocab "
          f"{config.model.vocab_size}, median of {repeats} steps")
    peak = flops.device_peak_flops(jax.devices()[0].device_kind, config.train.peak_tflops)
    print(f"MFU against a peak of {peak / 1e12:,.4g} TFLOP/s per device" if peak else
          "MFU n/a: no peak known for this device (flops.PEAK_FLOPS; train.peak_tflops)")
    print(f"{'model':>14} {'active M':>9} {'step ms':>9} {'tokens/s':>10} {'TFLOP/s/dev':>12} "
          f"{'MFU':>6} {'/ dense':>8}")
    for name, row in r.items():
        mfu = "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}"
        print(f"{name:>14} {row['active_params'] / 1e6:>9.4g} {row['step_ms']:>9.1f} "
              f"{row['tokens_per_s']:>10,.0f} {row['tflops_per_device']:>12.3g} {mfu:>6} "
              f"{row['vs_dense']:>8.2f}")


def print_layer(args, device: str) -> None:
    # The dispatch column only when there is more than the default capacity path to tell apart.
    by_dispatch = args.dispatch != ["capacity"]
    print(f"device: {device}; tokens={args.tokens} d_model={args.d_model} d_ff={args.d_ff} "
          f"top_k={args.top_k} capacity_factor={args.capacity_factor}; fwd+bwd, {args.dtype}, "
          f"median of {args.repeats}")
    print(f"{'E':>5} {'C':>5} {'moe ms':>9} {'experts ms':>11} {'dense ms':>9} {'ratio':>6} "
          f"{'routing':>8}" + (f" {'dispatch':>9}" if by_dispatch else ""))
    for e in args.experts:
        for dispatch in args.dispatch:
            r = bench_layer(e, args.tokens, args.d_model, args.d_ff, args.top_k,
                            args.capacity_factor, args.repeats, dispatch,
                            jnp.dtype(args.dtype))
            print(f"{e:>5} {cell(r['C'], 5, '')} {r['moe']:>9.1f} {cell(r['experts'], 11, '.1f')} "
                  f"{r['dense']:>9.1f} {r['ratio']:>6.2f} {cell(r['routing'], 8, '.2f')}"
                  + (f" {dispatch:>9}" if by_dispatch else ""), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["layer", "train", "compile"])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 256],
                        help="layer: expert counts, one row each")
    parser.add_argument("--tokens", type=int, default=4096, help="layer: tokens (one device)")
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--d_ff", type=int, default=1024)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--capacity_factor", type=float, default=1.25)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="layer: weights and activations")
    parser.add_argument("--dispatch", nargs="+", choices=DISPATCHES, default=None,
                        help="layer: one row per dispatch and E (default: capacity); train: one "
                        "MoE row each, and the dense twin (default: the config's model.dispatch)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="layer, train: timed rounds (train: steps of each model)")
    parser.add_argument("--config", default="configs/tiny.py",
                        help="train, compile: config file[:variant]")
    parser.add_argument("--vocab_size", type=int, default=0,
                        help="train, compile: vocabulary; needed where model.vocab_size is 0 "
                        "and data.tokenizer is not byte (gpt2: 50257)")
    parser.add_argument("--batch_size", type=int, default=0,
                        help="train, compile: sequences per step (0 = the config's)")
    parser.add_argument("--seq_len", type=int, default=0,
                        help="train, compile: tokens per sequence (0 = the config's)")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 32],
                        help="compile: the depths to compile")
    args = parser.parse_args()
    malloc = "freed memory kept" if hostmem.keep_freed_memory() else "default"
    device = f"{jax.devices()[0].device_kind} x{jax.device_count()}; host malloc: {malloc}"

    if args.mode == "layer":
        args.dispatch = args.dispatch or ["capacity"]
        print_layer(args, device)
        return
    try:
        config = resolve(load_config(args.config), args.vocab_size, args.batch_size,
                         args.seq_len)
        if args.mode == "compile":
            times = bench_compile(config, args.layers)
        else:
            r = bench_train(config, args.repeats, args.dispatch)
    except ConfigError as e:
        sys.exit(f"error: {args.config}: {e}")
    if args.mode == "compile":
        print(f"device: {device}; {args.config}: train step lowered and compiled")
        for n, seconds in times.items():
            print(f"{n:>4} layers {seconds:7.1f} s  ({seconds / times[args.layers[0]]:.2f}x)")
    else:
        print_train(r, args.config, config, args.repeats, device)


if __name__ == "__main__":
    main()
