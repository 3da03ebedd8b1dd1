"""What weight-only int8 / int4 experts cost a trained run, on its own held-out text.

  python -m moejax.quant_check --workdir runs/tiny [--batches 2] [--tokens 64]

Per MoE layer: the relative error ||y_q - y|| / ||y|| of the layer's output with its routed
experts quantized against float, on the very activations the float model feeds it (each
layer measured alone: the error does not compound). Then the model's argmax next tokens on the
same text, and greedy generations from held-out prompts, quantized against float: the share
of positions where they agree.
"""

import contextlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import cli
from moejax.config_lib import ConfigError
from moejax.data import text
from moejax.data.batches import make_batches
from moejax.data.loader import read_first
from moejax.moe import quant
from moejax.moe.layer import MoE
from moejax.run.params import quantize_experts

NAMES = ("int8", "int4")
PROMPT = 16  # tokens of held-out text each greedy generation starts from


def copy_of(model):
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))


@contextlib.contextmanager
def measuring(name: str):
    """Every MoE layer run inside also runs with its experts quantized to `name`, and adds
    the relative error of that output to its aux dict as "quant_error". A wrapper, because
    a layer's input exists only inside the scan over layers."""
    call = MoE.__call__

    def both(self, x, *, train, rng=None, real=None):
        y, aux = call(self, x, train=train, rng=rng, real=real)
        floats = {n: getattr(self, n).get_value() for n in ("w_in", "w_out")}
        for n, axis in (("w_in", -3), ("w_out", -2)):
            getattr(self, n).set_value(quant.quantize_weight(floats[n], name, axis))
        y_q, _ = call(self, x, train=train, rng=rng, real=real)
        for n, w in floats.items():
            getattr(self, n).set_value(w)
        error = jnp.linalg.norm((y_q - y).astype(jnp.float32)) / jnp.linalg.norm(
            y.astype(jnp.float32))
        return y, {**aux, "quant_error": error}

    MoE.__call__ = both
    try:
        yield
    finally:
        MoE.__call__ = call


def layer_errors(model, tokens, name: str) -> np.ndarray:
    """[MoE layers] relative output error of `name` experts on `tokens` [B, S]."""
    with measuring(name):
        _, aux = jax.jit(lambda m, t: m(t, train=False))(model, tokens)
    return np.asarray(aux["quant_error"])


def next_token_agreement(model, quantized, tokens) -> float:
    """Share of positions of `tokens` [B, S] where both models' argmax next token agree."""
    def argmax(m, t):
        return jnp.argmax(m(t, train=False)[0], -1)

    f = jax.jit(argmax)
    return float(np.mean(np.asarray(f(model, tokens)) == np.asarray(f(quantized, tokens))))


def greedy_agreement(model, quantized, prompts, max_new_tokens: int) -> tuple[int, int]:
    """(positions where the greedy generations agree, positions) over `prompts`."""
    from moejax.generate import generate

    a = generate(model, prompts, max_new_tokens, temperature=0.0)
    b = generate(quantized, prompts, max_new_tokens, temperature=0.0)
    # Both rows hold max_new_tokens (no eos is given), so positions pair up one to one.
    agree = sum(x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    return agree, sum(map(len, a))


def check(model, tokens, prompts, max_new_tokens: int) -> dict:
    """{name: {"layers": errors, "next_token": share, "greedy": (agree, of)}}."""
    out = {}
    for name in NAMES:
        quantized = copy_of(model)
        quantize_experts(quantized, name)
        out[name] = {"layers": layer_errors(model, tokens, name),
                     "next_token": next_token_agreement(model, quantized, tokens),
                     "greedy": greedy_agreement(model, quantized, prompts, max_new_tokens)}
    return out


def main(argv=None):
    from absl import flags

    from moejax.generate import check_experts, load

    argv = sys.argv if argv is None else argv
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "a trained run's directory", flag_values=fv)
    flags.DEFINE_integer("batches", 2, "held-out batches to measure on", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("prompts", 8, "held-out prompts to generate from", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("tokens", 64, "greedy tokens per prompt", lower_bound=1,
                         flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    with cli.one_line_errors():
        cli.positional(cli.parse_flags(argv, __doc__, fv, "workdir"), {})
    config, model, step = load(fv.workdir)
    with cli.one_line_errors():
        check_experts(config, fv.workdir, "quant_check", "the --workdir of an MoE run")
        if PROMPT + fv.tokens > model.max_seq_len:
            raise ConfigError(f"--tokens={fv.tokens}: {PROMPT}-token prompts + {fv.tokens} "
                              f"exceed model.max_seq_len={model.max_seq_len}; allowed: at most "
                              f"{model.max_seq_len - PROMPT}")
        tokenizer = text.make_tokenizer(config.data.tokenizer)
        held_out = make_batches(config.data, tokenizer, "eval", config.seed)
        rows = read_first(held_out, slice(0, config.data.batch_size), fv.batches)
    tokens = np.concatenate([r[:, :-1] for r in rows])
    prompts = [list(map(int, row[:PROMPT])) for row in tokens[: fv.prompts]]
    result = check(model, tokens, prompts, fv.tokens)
    print(f"# step {step} of {fv.workdir}: {tokens.shape[0]} x {tokens.shape[1]} held-out "
          f"tokens, {len(prompts)} prompts of {PROMPT} tokens + {fv.tokens} greedy")
    print("weights   layer errors (||y_q - y|| / ||y||)        next-token agree   greedy agree")
    for name, r in result.items():
        agree, of = r["greedy"]
        print(f"{name:<9} {' '.join(f'{e:.2e}' for e in r['layers']):<40} "
              f"{r['next_token']:>15.2%}   {agree}/{of} = {agree / of:.1%}")


if __name__ == "__main__":
    main()
