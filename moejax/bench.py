"""Benchmarks of the MoE layer, of whole train steps and of compile time.

  python -m moejax.bench layer|train|compile [--experts=8,64] [--dispatch=capacity,dropless]
      [--config configs/X.py[:variant]] [--config.model.num_experts=16] [--layers=4,32]
      [--routing=natural,balanced]

layer: median fwd+bwd time of one MoE FFN against a dense SwiGLU FFN doing the same active
FLOPs (d_ff_dense = k * d_ff), one device, per expert count and dispatch. For the capacity
path the `experts` column times the expert FFN alone on its [E, C, d] buffers, so
moe - experts is what routing, dispatch and combine cost; dropless has no such buffers.
train: step time, tokens/s, achieved TFLOP/s per device and MFU of whole train steps
(optimizer included) of a config, once per MoE dispatch and routing asked for, and of its
dense twin with equal active FLOPs (`num_experts = 0`), on the config's mesh over all local
devices (the state built, laid out and stepped by moejax.state). Routing `natural` is the
config's; `balanced` forces every expert the same load (model.routing=balanced, round-robin
over the experts; the aim of Megatron's --moe-router-force-load-balancing): natural /
balanced is what the imbalance costs.

Every timed function runs once per round, round-robin, so load from anything else on the
machine hits all columns alike; the ratios are medians of the per-round ratios.
"""

import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import cli, config_lib, parallel
from moejax.config_lib import ConfigError
from moejax.data.text import ByteTokenizer
from moejax.moe.experts import capacity_experts
from moejax.moe.ffn import ffn, flat_in
from moejax.moe.layer import DISPATCHES, MoE, MoEConfig
from moejax.moe.router import capacity
from moejax.run import flops, hostmem, state
from moejax.run.params import param_counts

# bench train's routings: the config's own, and forced-balanced (every expert T * k / E)
ROUTINGS = ("natural", "balanced")


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
        return ByteTokenizer.vocab_size
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


def bench_train(config, steps: int, dispatches: list[str] | None = None,
                routings: list[str] | None = None) -> dict:
    """{'moe:<dispatch>/<routing>' for each of `dispatches` (default: the config's own) and
    `routings` (default: both ROUTINGS), 'dense': the train_numbers of its median step, plus
    `routing` (None for dense), `vs_dense`, the median per-round step-time ratio, and for a
    natural row beside a balanced one `vs_balanced`, the imbalance's cost as that ratio}."""
    config = resolve(config)
    mesh = parallel.make_mesh(parallel.mesh_sizes(config.mesh, jax.device_count()))
    seq_len, batch = config.data.seq_len, config.data.batch_size
    tokens = jax.random.randint(jax.random.key(0), (batch, seq_len + 1), 0,
                                config.model.vocab_size)
    tokens = jax.device_put(tokens, parallel.token_sharding(mesh))
    configs, routing_of = {}, {}
    for dispatch in dispatches or [config.model.dispatch]:
        for routing in routings or ROUTINGS:
            name = f"moe:{dispatch}/{routing}"
            configs[name], routing_of[name] = config.copy_and_resolve_references(), routing
            configs[name].model.dispatch = dispatch
            if routing == "balanced":
                configs[name].model.routing = "balanced"
    configs["dense"] = config.copy_and_resolve_references()
    configs["dense"].model.num_experts = 0
    fns, models = {}, {}
    for name, c in configs.items():
        config_lib.validate(c, jax.device_count())
        s = state.setup(c, mesh)
        fns[name], models[name] = (stepping(s), (tokens, jnp.int32(0))), s.model
    t = round_robin(fns, steps)
    kind = jax.devices()[0].device_kind
    rows = {name: {**train_numbers(configs[name], models[name], statistics.median(v),
                                   jax.device_count(), kind),
                   "routing": routing_of.get(name), "vs_dense": median_ratio(v, t["dense"])}
            for name, v in t.items()}
    for name, row in rows.items():
        balanced = name.replace("/natural", "/balanced")
        if row["routing"] == "natural" and balanced in t:
            row["vs_balanced"] = median_ratio(t[name], t[balanced])
    return rows


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
    print(f"{'model':>14} {'routing':>9} {'active M':>9} {'step ms':>9} {'tokens/s':>10} "
          f"{'TFLOP/s/dev':>12} {'MFU':>6} {'/ dense':>8}")
    for name, row in r.items():
        mfu = "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}"
        print(f"{name.split('/')[0]:>14} {row['routing'] or '-':>9} "
              f"{row['active_params'] / 1e6:>9.4g} {row['step_ms']:>9.1f} "
              f"{row['tokens_per_s']:>10,.0f} {row['tflops_per_device']:>12.3g} {mfu:>6} "
              f"{row['vs_dense']:>8.2f}")
    for name, row in r.items():
        if "vs_balanced" in row:
            print(f"imbalance tax, {name.split('/')[0]}: natural routing's step takes "
                  f"{row['vs_balanced']:.2f}x the forced-balanced one's")


def print_layer(args, experts: list[int], dispatches: list[str], device: str) -> None:
    # The dispatch column only when there is more than the default capacity path to tell apart.
    by_dispatch = dispatches != ["capacity"]
    print(f"device: {device}; tokens={args.tokens} d_model={args.d_model} d_ff={args.d_ff} "
          f"top_k={args.top_k} capacity_factor={args.capacity_factor}; fwd+bwd, {args.dtype}, "
          f"median of {args.repeats}")
    print(f"{'E':>5} {'C':>5} {'moe ms':>9} {'experts ms':>11} {'dense ms':>9} {'ratio':>6} "
          f"{'routing':>8}" + (f" {'dispatch':>9}" if by_dispatch else ""))
    for e in experts:
        for dispatch in dispatches:
            r = bench_layer(e, args.tokens, args.d_model, args.d_ff, args.top_k,
                            args.capacity_factor, args.repeats, dispatch,
                            jnp.dtype(args.dtype))
            print(f"{e:>5} {cell(r['C'], 5, '')} {r['moe']:>9.1f} {cell(r['experts'], 11, '.1f')} "
                  f"{r['dense']:>9.1f} {r['ratio']:>6.2f} {cell(r['routing'], 8, '.2f')}"
                  + (f" {dispatch:>9}" if by_dispatch else ""), flush=True)


MODES = {  # mode: the flags it reads
    "layer": ("experts", "tokens", "d_model", "d_ff", "top_k", "capacity_factor", "dtype",
              "dispatch", "repeats"),
    "train": ("config", "vocab_size", "batch_size", "seq_len", "dispatch", "routing",
              "repeats"),
    "compile": ("config", "vocab_size", "batch_size", "seq_len", "layers"),
}


def define_flags(fv, argv: list[str]) -> None:
    from absl import flags
    from ml_collections import config_flags

    class Items(flags.ListParser):  # comma-separated, each checked as it is parsed
        def __init__(self, allowed: str, item):
            super().__init__()
            self.allowed, self.item = allowed, item

        def parse(self, argument):
            items = super().parse(argument)
            try:
                return [self.item(x) for x in items]
            except ValueError:
                raise ValueError(f"allowed: {self.allowed}") from None

    def natural(x: str) -> int:
        if not x.isdigit() or int(x) < 1:
            raise ValueError(x)
        return int(x)

    def one_of(allowed):
        def item(x: str) -> str:
            if x not in allowed:
                raise ValueError(x)
            return x

        return item

    def ints(name, default, help):
        flags.DEFINE(Items("comma-separated integers >= 1, e.g. 8,64", natural), name, default,
                     help, flag_values=fv, serializer=flags.CsvListSerializer(","))

    ints("experts", ["8", "64", "256"], "layer: expert counts, one row each")
    flags.DEFINE_integer("tokens", 4096, "layer: tokens (one device)", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("d_model", 512, "layer: model width", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("d_ff", 1024, "layer: expert width", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("top_k", 2, "layer: experts per token", lower_bound=1, flag_values=fv)
    flags.DEFINE_float("capacity_factor", 1.25, "layer: capacity factor", lower_bound=0.0,
                       flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "layer: weights and "
                      "activations", flag_values=fv)
    flags.DEFINE(Items(f"comma-separated of {', '.join(DISPATCHES)}", one_of(DISPATCHES)),
                 "dispatch",
                 None, "layer: one row per dispatch and E (default: capacity); train: one MoE "
                 "row each, and the dense twin (default: the config's model.dispatch)",
                 flag_values=fv, serializer=flags.CsvListSerializer(","))
    flags.DEFINE(Items(f"comma-separated of {', '.join(ROUTINGS)}", one_of(ROUTINGS)),
                 "routing", list(ROUTINGS), "train: one MoE row each per dispatch: the "
                 "config's routing, and forced-balanced (every expert T x k / E assignments)",
                 flag_values=fv, serializer=flags.CsvListSerializer(","))
    flags.DEFINE_integer("repeats", 10, "layer, train: timed rounds (train: steps of each "
                         "model)", lower_bound=1, flag_values=fv)
    # Where the checkout's configs/ is, so a bench from another directory still finds it.
    default = os.path.join(config_lib.CONFIGS, "tiny.py")
    try:  # the default is read now, with any --config.KEY=VALUE of argv
        config_flags.DEFINE_config_file("config", default, "train, compile: "
                                        "configs/<name>.py[:variant]", flag_values=fv,
                                        lock_config=True, sys_argv=argv)
    except Exception as e:
        raise ConfigError(cli.flag_error(e, [*argv, f"--config={default}"])) from None
    flags.DEFINE_integer("vocab_size", 0, "train, compile: vocabulary; needed where "
                         "model.vocab_size is 0 and data.tokenizer is not byte (gpt2: 50257)",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("batch_size", 0, "train, compile: sequences per step (0 = the "
                         "config's)", lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("seq_len", 0, "train, compile: tokens per sequence (0 = the "
                         "config's)", lower_bound=0, flag_values=fv)
    ints("layers", ["4", "32"], "compile: the depths to compile")


def main(argv=None):
    from absl import flags

    argv = sys.argv if argv is None else argv
    fv = flags.FlagValues()  # its own: main may run more than once in one process (tests)
    with cli.one_line_errors():
        define_flags(fv, argv)
        mode = cli.positional(cli.parse_flags(argv, __doc__, fv, "repeats"),
                              {"MODE": tuple(MODES)})[0]
        cli.check_flags(fv, MODES[mode], mode)
    malloc = "freed memory kept" if hostmem.keep_freed_memory() else "default"
    device = f"{jax.devices()[0].device_kind} x{jax.device_count()}; host malloc: {malloc}"
    if mode == "layer":
        print_layer(fv, fv.experts, fv.dispatch or ["capacity"], device)
        return
    spec = fv["config"].config_filename
    spec = spec if fv["config"].present else os.path.relpath(spec)  # the default: short
    try:
        config = resolve(fv.config, fv.vocab_size, fv.batch_size, fv.seq_len)
        if mode == "compile":
            times = bench_compile(config, fv.layers)
        else:
            r = bench_train(config, fv.repeats, fv.dispatch, fv.routing)
    except ConfigError as e:
        sys.exit(f"error: {spec}: {e}")
    if mode == "compile":
        print(f"device: {device}; {spec}: train step lowered and compiled")
        for n, seconds in times.items():
            print(f"{n:>4} layers {seconds:7.1f} s  ({seconds / times[fv.layers[0]]:.2f}x)")
    else:
        print_train(r, spec, config, fv.repeats, device)


if __name__ == "__main__":
    main()
