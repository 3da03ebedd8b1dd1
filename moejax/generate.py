"""Generate text from the newest checkpoint of a run, with a key-value cache.

  python -m moejax.generate --workdir runs/tiny --prompt "def main(" [--prompt ...] [--tokens 200]
      [--quantize int8|int4]   (the routed experts weight-only: moejax/moe/quant.py)
      [--routing_out FILE.npy] (each token's experts, for replay in training)

Prompts of any lengths go as one batch: right-padded, prefilled in one call, then decoded one
token per step for every row at its own position, the whole loop one compiled `while_loop`.
Shapes are rounded up to buckets of BUCKET positions, so a run compiles once per bucket, not
once per token or per max_new_tokens.

With return_routing (--routing_out) it also records which experts each MoE layer chose for
every token it processed: per row int32 [tokens, moe_layers, top_k], the prompt's tokens
first, then each generated token fed back (the last generated token is never fed, so it has
none), the layout of vLLM's `routed_experts`. The choice is the training forward's for the
same tokens (tests/test_replay.py counts the mismatches: 0), so a batch of these sequences
can carry it as batch["routing"] to train on the experts inference used (replay).
"""

import collections
import functools
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import cli, config_lib, parallel
from moejax.config_lib import ConfigError
from moejax.data.text import make_tokenizer
from moejax.model.layers import DTYPES
from moejax.model.transformer import ATTENTIONS, moe_layer_ids
from moejax.moe.layer import MoE
from moejax.run import state
from moejax.run.checkpoint import read_params
from moejax.run.params import quantize_experts

BUCKET = 64  # padded prompt length and cache length are multiples of this (<= max_seq_len)
TRACES = collections.Counter()  # traces (= compilations) of the jitted generate loop


def load(workdir: str):
    """The run's config and model with the parameters of its newest checkpoint that restores
    (damaged ones are skipped with a warning, then the best one is tried), on one device.
    Writes nothing into the workdir."""
    try:
        config = config_lib.run_config(workdir)
        config.model.num_groups = 1  # one capacity group: the prompt's tokens are routed together
        if config.model.routing == "tokens":  # no capacity: padding and batch-mates drop nothing
            config.model.dispatch = "dropless"
        setup = state.setup(config, parallel.make_mesh({}))  # one device, whatever the run's mesh
        # The parameters only: the optimizer state is twice their size.
        step, params = read_params(workdir, "--workdir", setup.abstract["params"])
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    return config, nnx.merge(setup.graphdef, params), step


def check_experts(config, workdir: str, what: str, allowed: str) -> None:
    """Quantizing routed experts needs some: a dense run (no MoE layer) is one line."""
    if not moe_layer_ids(config.model):
        raise ConfigError(f"{what}: --workdir={workdir!r} is a dense run (no MoE layer: "
                          f"model.num_experts={config.model.num_experts}), it has no routed "
                          f"experts; allowed: {allowed}")


def run_tokenizer(name: str, config, vocab: int):
    """--hf_tokenizer, else the run's; its ids must be the model's (at most `vocab` of them)."""
    if not name:
        return make_tokenizer(config.data.tokenizer)
    try:
        tokenizer = make_tokenizer(name)
    except ConfigError as e:  # its message names data.tokenizer, the key train reads
        raise ConfigError(f"--hf_tokenizer={name!r}: {str(e).split(': ', 1)[1]}") from None
    if tokenizer.vocab_size > vocab:
        raise ConfigError(f"--hf_tokenizer={name!r}: {tokenizer.vocab_size} tokens, more than "
                          f"the model's vocabulary of {vocab}; allowed: the run's tokenizer "
                          f"({config.data.tokenizer!r}, the default) or one of at most {vocab} "
                          "tokens")
    return tokenizer


def round_up(n: int, cap: int) -> int:
    return min(-(-n // BUCKET) * BUCKET, cap)


def cache_length(prompts: list[list[int]], max_new_tokens: int, max_seq_len: int) -> int:
    """The cache bucket `generate` uses by default; one-line error past max_seq_len."""
    need = max(map(len, prompts)) + max_new_tokens
    if need > max_seq_len:
        raise ValueError(f"longest prompt ({max(map(len, prompts))}) + max_new_tokens "
                         f"({max_new_tokens}) = {need} exceeds model.max_seq_len={max_seq_len}")
    return round_up(need, max_seq_len)


def next_token(logits, key, temperature, top_p, greedy: bool):
    """logits: [B, V] -> [B] int32. Greedy: argmax. Otherwise a sample of softmax(logits / T)
    restricted to the nucleus: the fewest most likely tokens whose probability reaches top_p
    (tokens tied with the least likely of them stay in too)."""
    if greedy:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits / temperature
    probs = jax.nn.softmax(logits, -1)
    desc = -jnp.sort(-probs, -1)
    # A token is in if the tokens more likely than it hold less than top_p; the first always.
    # top_p >= 1 keeps all even where float rounding makes the running sum pass 1 early.
    inside = (jnp.cumsum(desc, -1) - desc < top_p) | (top_p >= 1)
    least = jnp.min(jnp.where(inside, desc, jnp.inf), -1, keepdims=True)
    logits = jnp.where(probs >= least, logits, -jnp.inf)
    return jax.random.categorical(key, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "greedy", "routing"))
def _generate(params, prompts, lengths, max_new, temperature, top_p, eos_id, seed, *,
              graphdef, cache_len: int, greedy: bool, routing: bool = False):
    """prompts: [B, P] right-padded, lengths: [B]. Returns new tokens [B, cache_len] (the first
    `steps` columns are valid), steps and, with `routing`, the expert ids of the prompts
    [B, P, L, k] and of each new token fed [B, cache_len, L, k] (else None for both). Rows
    past eos keep computing; the host cuts them."""
    TRACES["generate"] += 1  # runs only when tracing
    model, key = nnx.merge(graphdef, params), jax.random.key(seed)
    batch = prompts.shape[0]
    cache = model.init_cache(batch, cache_len)

    def decode(tokens, start, cache, **kw):  # (logits, cache, ids or None)
        out = model.decode(tokens, start, cache, return_routing=routing, **kw)
        return out if routing else (*out, None)

    logits, cache, prompt_ids = decode(prompts, jnp.zeros(batch, jnp.int32), cache,
                                       last=lengths - 1)
    token = next_token(logits[:, 0], jax.random.fold_in(key, 0), temperature, top_p, greedy)
    out = jnp.zeros((batch, cache_len), jnp.int32).at[:, 0].set(token)
    new_ids = (None if prompt_ids is None else
               jnp.zeros((batch, cache_len, *prompt_ids.shape[2:]), jnp.int32))

    def running(carry):
        step, _, _, _, _, done = carry
        return (step < max_new) & ~done.all()

    def one_token(carry):  # feeds token `step - 1` of each row, at its position
        step, token, cache, out, new_ids, done = carry
        logits, cache, ids = decode(token[:, None], lengths + step - 1, cache)
        if ids is not None:
            new_ids = new_ids.at[:, step - 1].set(ids[:, 0])
        token = next_token(logits[:, 0], jax.random.fold_in(key, step), temperature, top_p,
                           greedy)
        return (step + 1, token, cache, out.at[:, step].set(token), new_ids,
                done | (token == eos_id))

    carry = (jnp.int32(1), token, cache, out, new_ids, token == eos_id)
    steps, _, _, out, new_ids, _ = jax.lax.while_loop(running, one_token, carry)
    return out, steps, prompt_ids, new_ids


def generate(model, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
             cache_len: int | None = None, return_routing: bool = False):
    """Each prompt's new tokens: max_new_tokens of them, or fewer ending in eos_id.

    temperature 0 is greedy (argmax); otherwise sampling at that temperature from the top_p
    nucleus (top_p = 1: every token), keyed by seed. The whole batch stops once every row
    has stopped. cache_len: positions the cache holds; default: the bucket of the longest
    prompt + max_new_tokens. return_routing: returns (rows, routing), routing[b] the int32
    [len(prompt) + len(rows[b]) - 1, moe_layers, top_k] experts of each token row b fed
    through the model (the module docstring)."""
    if not prompts or not all(prompts):
        raise ValueError("generate needs at least one prompt, each of at least one token")
    if not (math.isfinite(temperature) and temperature >= 0 and 0 < top_p <= 1):
        raise ValueError(f"temperature={temperature} must be finite and >= 0, top_p={top_p} "
                         "in (0, 1]")
    vocab = model.embed.shape[0]
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise ValueError(f"prompt token outside the model's vocabulary of {vocab}")
    if return_routing:
        check_routing(model)
        if max_new_tokens <= 0:  # nothing would be fed through the model
            raise ValueError(f"return_routing: max_new_tokens={max_new_tokens}; allowed: >= 1")
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    longest = max(map(len, prompts))
    bucket = cache_length(prompts, max_new_tokens, model.max_seq_len)  # checks max_seq_len
    cache_len = cache_len or bucket
    if longest + max_new_tokens > cache_len:
        raise ValueError(f"cache_len={cache_len} < longest prompt ({longest}) + "
                         f"max_new_tokens ({max_new_tokens})")
    padded = np.zeros((len(prompts), round_up(longest, cache_len)), np.int32)
    for row, p in zip(padded, prompts, strict=True):
        row[: len(p)] = p
    graphdef, params = nnx.split(model)
    # Host values go in as numpy: jnp would compile a conversion for each of them.
    out, steps, prompt_ids, new_ids = _generate(
        params, padded, np.asarray([len(p) for p in prompts], np.int32),
        np.int32(max_new_tokens), np.float32(temperature), np.float32(top_p),
        np.int32(-1 if eos_id is None else eos_id), np.int32(seed), graphdef=graphdef,
        cache_len=cache_len, greedy=temperature <= 0, routing=return_routing)
    rows = np.asarray(out)[:, : int(steps)].tolist()
    if eos_id is not None:
        rows = [r[: r.index(eos_id) + 1] if eos_id in r else r for r in rows]
    if not return_routing:
        return rows
    prompt_ids, new_ids = np.asarray(prompt_ids), np.asarray(new_ids)
    routing = [np.concatenate([prompt_ids[b, : len(p)], new_ids[b, : len(r) - 1]])
               for b, (p, r) in enumerate(zip(prompts, rows, strict=True))]
    return rows, routing


def check_routing(model) -> None:
    """Recording routing needs MoE layers that choose per token, causally."""
    cfgs = [m.cfg for _, m in nnx.iter_graph(model) if isinstance(m, MoE)]
    if not cfgs:
        raise ValueError("return_routing: a dense model (no MoE layer) routes nothing; allowed: "
                         "a model with model.num_experts > 0")
    if cfgs[0].routing != "tokens":
        raise ValueError(f"return_routing: model.routing={cfgs[0].routing!r} is not a token's "
                         "own choice (experts: non-causal, a token's experts depend on later "
                         "tokens); allowed: tokens")


def main(argv=None):
    from absl import flags

    argv = sys.argv if argv is None else argv
    fv = flags.FlagValues()  # its own: main may run more than once in one process (tests)
    flags.DEFINE_string("workdir", None, "a run's directory (train or convert from-hf)",
                        flag_values=fv)
    flags.DEFINE_multi_string("prompt", None, "repeat for a batch; none: one empty",
                              flag_values=fv)
    flags.DEFINE_integer("tokens", 200, "new tokens per prompt, at most", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_float("temperature", 0.8, "0 = greedy", flag_values=fv)
    flags.DEFINE_float("top_p", 0.95, "nucleus mass; 1 = every token", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "sampling seed", lower_bound=0, upper_bound=2**31 - 1,
                         flag_values=fv)
    # nan passes absl's bounds (every comparison with it is false), and sampled NUL bytes.
    flags.register_validator("temperature", lambda t: math.isfinite(t) and t >= 0,
                             "must be a finite number >= 0 (0 = greedy)", flag_values=fv)
    flags.register_validator("top_p", lambda p: 0 < p <= 1, "must be in (0, 1]",
                             flag_values=fv)
    flags.DEFINE_string("hf_tokenizer", "", "tokenizer name or path; default: the run's "
                        "data.tokenizer", flag_values=fv)
    flags.DEFINE_enum("quantize", "none", ["none", "int8", "int4"], "the routed experts' "
                      "weights: as trained, or weight-only int8 (a scale per output channel) / "
                      "int4 (a scale per 128 inputs)", flag_values=fv)
    flags.DEFINE_string("routing_out", "", "write each prompt's routing, int32 [tokens, "
                        "moe_layers, top_k] (vLLM's routed_experts), to this .npy (several "
                        "prompts: FILE-0.npy, FILE-1.npy, ...), or to this .jsonl as records "
                        "to train on (data.format=replay: tokens, routing, loss_mask on the "
                        "new tokens)", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    with cli.one_line_errors():
        cli.positional(cli.parse_flags(argv, __doc__, fv, "workdir"), {})
    config, model, step = load(fv.workdir)
    with cli.one_line_errors():
        if fv.routing_out:
            if not fv.routing_out.endswith((".npy", ".jsonl")):
                raise ConfigError(f"--routing_out={fv.routing_out!r}: allowed: a path ending "
                                  "in .npy or .jsonl")
            try:
                check_routing(model)
            except ValueError as e:
                raise ConfigError(f"--routing_out: {str(e).split(': ', 1)[1]}") from None
        if fv.quantize != "none":
            check_experts(config, fv.workdir, f"--quantize={fv.quantize}", "none")
            print(f"# {quantize_experts(model, fv.quantize)}")
        tokenizer = run_tokenizer(fv.hf_tokenizer, config, model.embed.shape[0])
    texts = fv.prompt or [""]
    # An empty prompt starts where a document starts: after an end-of-document token.
    prompts = [list(map(int, tokenizer.encode(t))) or [tokenizer.eos_id] for t in texts]
    try:
        cache_len = cache_length(prompts, fv.tokens, model.max_seq_len)
    except ValueError as e:
        room = model.max_seq_len - max(map(len, prompts))
        sys.exit(f"error: --tokens={fv.tokens}: {e}; allowed: "
                 + (f"at most {room} with these prompts" if room > 0 else "shorter prompts"))
    kwargs = dict(temperature=fv.temperature, top_p=fv.top_p, seed=fv.seed,
                  eos_id=tokenizer.eos_id, cache_len=cache_len,
                  return_routing=bool(fv.routing_out))
    start = time.perf_counter()
    generate(model, prompts, 1, **kwargs)  # compiles the very program the timed call runs
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    outs = generate(model, prompts, fv.tokens, **kwargs)
    seconds = time.perf_counter() - start
    if fv.routing_out:
        outs, routing = outs
        write_routing(fv.routing_out, prompts, outs, routing)
    print(f"# step {step} of {fv.workdir}")
    for text, prompt, new in zip(texts, prompts, outs, strict=True):
        print(tokenizer.decode((prompt if text else []) + new))
    n = sum(map(len, outs))
    print(f"# {n} tokens in {seconds:.2f} s: {n / seconds:.1f} tokens/s (batch {len(prompts)}; "
          f"excludes {compile_s:.1f} s of compilation and a 1-token warm-up)")
    print(f"# {cache_line(config.model)}")


def write_routing(path: str, prompts, outs, routing) -> None:
    """Each prompt's routing record: .npy arrays (routing_paths), or one .jsonl line per prompt
    that data.format=replay trains on (moejax/data/replay.py), the loss on the new tokens."""
    if path.endswith(".jsonl"):
        with open(path, "w") as f:
            for prompt, new, ids in zip(prompts, outs, routing, strict=True):
                f.write(json.dumps({"tokens": prompt + new, "routing": ids.tolist(),
                                    "loss_mask": [0] * len(prompt) + [1] * len(new)}) + "\n")
        print(f"# routing: {path}: {len(outs)} records to train on (data.format=replay)")
        return
    for one, ids in zip(routing_paths(path, len(outs)), routing, strict=True):
        np.save(one, ids)
        print(f"# routing: {one}: {ids.shape[0]} tokens x {ids.shape[1]} MoE layers x "
              f"top-{ids.shape[2]}")


def routing_paths(path: str, rows: int) -> list[str]:
    """--routing_out's files: the path itself for one prompt, else path-0.npy, path-1.npy..."""
    return [path] if rows == 1 else [f"{path[:-4]}-{b}.npy" for b in range(rows)]


def cache_line(mc) -> str:
    """What the cache holds per token, and what attention without latent compression would."""
    itemsize = jnp.dtype(DTYPES[mc.dtype]).itemsize
    held = ATTENTIONS[mc.attention].cache_bytes_per_token(mc, itemsize)
    line = f"cache: {held:,} bytes per token ({mc.num_layers} layers, {mc.dtype})"
    if mc.attention == "mla":  # the per-head keys and values training expands the latent to
        full = mc.num_layers * mc.num_heads * (mc.qk_nope_head_dim + mc.qk_rope_head_dim
                                               + mc.v_head_dim) * itemsize
        line += f"; uncompressed, its {mc.num_heads} heads' keys and values: {full:,}"
    return line


if __name__ == "__main__":
    main()
