"""Benchmarks: `python -m moejax.bench layer` and `python -m moejax.bench train`.

layer: median fwd+bwd time of one MoE FFN against a dense SwiGLU FFN doing the same active
FLOPs (d_ff_dense = k * d_ff), one device. The `experts` column times the expert FFN alone on
its [E, C, d] buffers, so moe - experts is what routing, dispatch and combine cost.
train: step time and tokens/s of whole train steps (optimizer included) of a config and of
its dense twin with equal active FLOPs (`num_experts = 0`), on the config's mesh
over all local devices (the state built, laid out and stepped by moejax.state).

Every timed function runs once per round, round-robin, so load from anything else on the
machine hits all columns alike; the ratios are medians of the per-round ratios.
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import config_lib, hostmem, parallel, state
from moejax.moe.experts import capacity_experts, ffn, flat_in
from moejax.moe.layer import MoE, MoEConfig
from moejax.moe.router import capacity


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
                capacity_factor: float, repeats: int) -> dict:
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (1, tokens, d_model), jnp.float32)
    ct = jax.random.normal(keys[1], x.shape, jnp.float32)

    cfg = MoEConfig(num_experts, top_k, capacity_factor, capacity_factor, min_capacity=1,
                    num_groups=1)
    graphdef, params = nnx.split(MoE(d_model, d_ff, cfg, "swiglu", mesh=None, rngs=nnx.Rngs(0)))

    def moe_apply(params, x):
        return nnx.merge(graphdef, params)(x, train=True)[0]

    # The experts column gets buffers filled as the router fills them for x (one group).
    cap = capacity(tokens, num_experts, top_k, capacity_factor)
    filled = jnp.minimum(moe_apply_aux(graphdef, params, x)["tokens_per_expert"], cap)
    buffers = jax.random.normal(keys[2], (num_experts, cap, d_model), jnp.float32)
    buffers = jnp.where(jnp.arange(cap)[:, None] < filled[:, None, None], buffers, 0.0)
    # The expert kernel takes w_in [E, d, g, f] flattened to [E, d, g*f], as the layer does.
    weights = {"w_in": flat_in(params["w_in"][...]), "w_out": params["w_out"][...]}

    def experts_apply(w, xe):
        return capacity_experts(xe, w["w_in"], w["w_out"], "swiglu", filled[:, None])

    dense_ff = top_k * d_ff
    dense = {
        "w_in": jax.random.normal(keys[3], (d_model, 2, dense_ff)) * d_model**-0.5,
        "w_out": jax.random.normal(keys[4], (dense_ff, d_model)) * dense_ff**-0.5,
    }

    def dense_apply(w, x):  # the model's dense FFN (w_in [d, 2, f]), no batch axis
        return ffn(x[0], w["w_in"], w["w_out"], "swiglu")[None]

    t = round_robin({"moe": (fwd_bwd(moe_apply), (params, x, ct)),
                     "experts": (fwd_bwd(experts_apply), (weights, buffers, buffers)),
                     "dense": (fwd_bwd(dense_apply), (dense, x, ct))}, repeats)
    routing = [(m - e) / d for m, e, d in zip(t["moe"], t["experts"], t["dense"], strict=True)]
    return {"E": num_experts, "C": cap, **{name: median_ms(v) for name, v in t.items()},
            "ratio": median_ratio(t["moe"], t["dense"]), "routing": statistics.median(routing)}


def stepping(s: state.Setup):
    """A function (tokens, step) -> the train step's outputs, on a state of its own that each
    call advances: the step donates the state it is given, so no two calls may pass the same."""
    step_fn, train_state = state.train_step_fn(s), state.init(s)

    def run(tokens, step):
        nonlocal train_state
        train_state, metrics = step_fn(train_state, tokens, step)
        return train_state, metrics

    return run


def bench_train(config, steps: int) -> dict:
    """Median ms per train step and tokens/s for `config` and its dense twin."""
    mesh = parallel.make_mesh(parallel.mesh_sizes(config.mesh, jax.device_count()))
    seq_len, batch = config.data.seq_len, config.data.batch_size
    tokens = jax.random.randint(jax.random.key(0), (batch, seq_len + 1), 0, 256)
    tokens = jax.device_put(tokens, parallel.token_sharding(mesh))
    fns = {}
    for name in ("moe", "dense"):
        c = config.copy_and_resolve_references()
        c.model.vocab_size = c.model.vocab_size or 257
        if name == "dense":
            c.model.num_experts = 0
        config_lib.validate(c, jax.device_count())
        fns[name] = (stepping(state.setup(c, mesh)), (tokens, jnp.int32(0)))
    t = round_robin(fns, steps)
    per_step = batch * seq_len
    r = {name: {"step_ms": median_ms(v), "tokens_per_s": per_step / statistics.median(v)}
         for name, v in t.items()}
    return {**r, "ratio": median_ratio(t["moe"], t["dense"])}


def bench_compile(config, layers: list[int]) -> dict:
    """Seconds to lower and compile the train step (abstract state, nothing allocated) of
    `config` at each depth: with scanned layers the program does not grow with depth."""
    mesh = parallel.make_mesh(parallel.mesh_sizes(config.mesh, jax.device_count()))
    out = {}
    for n in layers:
        c = config.copy_and_resolve_references()
        c.model.update(num_layers=n, vocab_size=c.model.vocab_size or 257)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["layer", "train", "compile"])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--d_ff", type=int, default=1024)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--capacity_factor", type=float, default=1.25)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--config", default="configs/tiny.py",
                        help="train, compile: config file[:variant]")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 32],
                        help="compile: the depths to compile")
    args = parser.parse_args()
    malloc = "freed memory kept" if hostmem.keep_freed_memory() else "default"
    device = f"{jax.devices()[0].device_kind} x{jax.device_count()}; host malloc: {malloc}"

    if args.mode == "compile":
        config = load_config(args.config)
        times = bench_compile(config, args.layers)
        print(f"device: {device}; {args.config}: train step lowered and compiled")
        for n, seconds in times.items():
            print(f"{n:>4} layers {seconds:7.1f} s  ({seconds / times[args.layers[0]]:.2f}x)")
        return

    if args.mode == "train":
        config = load_config(args.config)
        r = bench_train(config, args.repeats)
        print(f"device: {device}; {args.config}: batch {config.data.batch_size} x "
              f"{config.data.seq_len} tokens, median of {args.repeats} steps")
        print(f"{'model':>6} {'step ms':>9} {'tokens/s':>10}")
        for name in ("moe", "dense"):
            print(f"{name:>6} {r[name]['step_ms']:>9.1f} {r[name]['tokens_per_s']:>10,.0f}")
        print(f"MoE / dense step time: {r['ratio']:.2f}")
        return

    print(f"device: {device}; tokens={args.tokens} d_model={args.d_model} d_ff={args.d_ff} "
          f"top_k={args.top_k} capacity_factor={args.capacity_factor}; fwd+bwd, float32, "
          f"median of {args.repeats}")
    print(f"{'E':>5} {'C':>5} {'moe ms':>9} {'experts ms':>11} {'dense ms':>9} {'ratio':>6} "
          f"{'routing':>8}")
    for e in args.experts:
        r = bench_layer(e, args.tokens, args.d_model, args.d_ff, args.top_k,
                        args.capacity_factor, args.repeats)
        print(f"{e:>5} {r['C']:>5} {r['moe']:>9.1f} {r['experts']:>11.1f} {r['dense']:>9.1f} "
              f"{r['ratio']:>6.2f} {r['routing']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
