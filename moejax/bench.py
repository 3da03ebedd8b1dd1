"""Benchmarks: `python -m moejax.bench layer`.

layer: median fwd+bwd time of one MoE FFN against a dense SwiGLU FFN doing the same active
FLOPs (d_ff_dense = k * d_ff), both jitted and timed in this process, one device.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.moe.experts import ffn
from moejax.moe.layer import MoE, MoEConfig


def median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fwd_bwd(apply):
    """Gradient of sum(apply(params, x) * cotangent) w.r.t. params and x: one fwd + one bwd."""
    def loss(params, x, ct):
        return jnp.sum(apply(params, x) * ct)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def bench_layer(num_experts: int, tokens: int, d_model: int, d_ff: int, top_k: int,
                capacity_factor: float, repeats: int) -> dict:
    rng = jax.random.key(0)
    x = jax.random.normal(rng, (1, tokens, d_model), jnp.float32)
    ct = jax.random.normal(jax.random.key(1), x.shape, jnp.float32)

    cfg = MoEConfig(num_experts, top_k, capacity_factor, capacity_factor, 1, False, 0.0, 1)
    graphdef, params = nnx.split(MoE(d_model, d_ff, cfg, "swiglu", mesh=None, rngs=nnx.Rngs(0)))

    def moe_apply(params, x):
        return nnx.merge(graphdef, params)(x, train=True)[0]

    dense_ff = top_k * d_ff
    keys = jax.random.split(rng, 2)
    dense = {
        "w_in": jax.random.normal(keys[0], (d_model, 2 * dense_ff)) * d_model**-0.5,
        "w_out": jax.random.normal(keys[1], (dense_ff, d_model)) * dense_ff**-0.5,
    }

    def dense_apply(w, x):  # plain 2-D matmuls: XLA:CPU runs batched dots markedly slower
        return ffn(x[0], w["w_in"], w["w_out"], "swiglu")[None]

    moe_s = median_seconds(fwd_bwd(moe_apply), params, x, ct, repeats=repeats)
    dense_s = median_seconds(fwd_bwd(dense_apply), dense, x, ct, repeats=repeats)
    return {"E": num_experts, "moe_ms": 1e3 * moe_s, "dense_ms": 1e3 * dense_s,
            "ratio": moe_s / dense_s}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["layer"])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--d_ff", type=int, default=1024)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--capacity_factor", type=float, default=1.25)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; tokens={args.tokens} "
          f"d_model={args.d_model} d_ff={args.d_ff} top_k={args.top_k} "
          f"capacity_factor={args.capacity_factor}; fwd+bwd, float32, median of {args.repeats}")
    print(f"{'E':>5} {'moe ms':>9} {'dense ms':>9} {'ratio':>6}")
    for e in args.experts:
        r = bench_layer(e, args.tokens, args.d_model, args.d_ff, args.top_k,
                        args.capacity_factor, args.repeats)
        print(f"{e:>5} {r['moe_ms']:>9.1f} {r['dense_ms']:>9.1f} {r['ratio']:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
