"""Helpers for configs/*.py: variant strings and checks that run before anything compiles."""

import math
import os
import tempfile
from fractions import Fraction

import ml_collections


def parse_variant(arg: str | None, allowed: tuple[str, ...]) -> str | None:
    """`--config configs/x.py:name` passes "name"; no suffix passes None."""
    if arg and arg not in allowed:
        raise ConfigError(f"unknown variant {arg!r}; allowed: {', '.join(allowed)}")
    return arg or None


def config_dict(**groups) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(groups)


# configs/ sits beside the package in a checkout (an editable install), not inside it.
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def defaults() -> ml_collections.ConfigDict:
    """configs/tiny.py next to the package: every key a run has, with its default."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny", os.path.join(CONFIGS, "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config.json a run or conversion wrote. A key added since (a new feature) takes its
    default, which is what the older version computed."""
    import json

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"--workdir={workdir!r}: no config.json in it; allowed: the workdir "
                          "of a run (train) or of a conversion (convert from-hf)")
    with open(path) as f:
        saved = json.load(f)
    config = defaults()
    model = saved.get("model", {})
    if "dropless" in model:  # a boolean until model.dispatch named the three paths
        model["dispatch"] = "dropless" if model.pop("dropless") else "capacity"
    for group, values in saved.items():
        if group in config and isinstance(values, dict):
            config[group].update(values)
        else:
            config[group] = values
    return config


class ConfigError(ValueError):
    """A bad config value: the message names the key and what is allowed."""


def first_line(e: Exception) -> str:
    """An exception in a few words, for a one-line message."""
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def validate(config, num_devices: int) -> None:
    """Fail fast, before anything compiles, with one line naming the key, its value and what is
    allowed. Checks that need files (data, tokenizer, checkpoints) live next to their readers."""
    from moejax import parallel

    m, d, t = config.model, config.data, config.train

    def check(ok, key, value, problem):
        if not ok:
            raise ConfigError(f"{key}={value!r}: {problem}")

    def one_of(key, value, allowed):
        check(value in allowed, key, value, f"unknown; allowed: {', '.join(allowed)}")

    # Sizes first: a zero here would otherwise surface as a division by zero below.
    for key in ("d_model", "num_layers", "num_heads", "head_dim", "d_ff", "max_seq_len"):
        check(m[key] >= 1, f"model.{key}", m[key], "must be >= 1")
    check(m.vocab_size >= 0, "model.vocab_size", m.vocab_size,
          "must be >= 0 (0 = the tokenizer's)")
    check(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
    given = {a: config.mesh[a] for a in parallel.AXES}
    check(list(given.values()).count(-1) <= 1, "mesh",
          ", ".join(f"{a}={s}" for a, s in given.items()),
          "allowed: at most one axis -1 (all remaining devices)")
    for axis, size in given.items():
        check(size >= 1 or size == -1, f"mesh.{axis}", size,
              "must be >= 1, or -1 for all remaining devices")
    sizes = parallel.mesh_sizes(config.mesh, num_devices)
    used = math.prod(sizes.values())
    check(used <= num_devices, "mesh", " x ".join(f"{a}={s}" for a, s in sizes.items()),
          f"needs {used} devices; allowed: at most the {num_devices} that exist")
    expert, token_shards = sizes["expert"], used // sizes["tensor"]
    check(m.num_experts >= 0, "model.num_experts", m.num_experts, "must be >= 0 (0 = dense)")
    if m.num_experts:
        check(m.num_experts % expert == 0, "model.num_experts", m.num_experts,
              f"must be a multiple of mesh.expert={expert}")
        check(1 <= m.top_k <= m.num_experts, "model.top_k", m.top_k,
              f"must be in 1..num_experts={m.num_experts}")
        check(m.capacity_factor > 0, "model.capacity_factor", m.capacity_factor, "must be > 0")
        check(m.eval_capacity_factor > 0, "model.eval_capacity_factor", m.eval_capacity_factor,
              "must be > 0")
        check(m.moe_every >= 1, "model.moe_every", m.moe_every, "must be >= 1")
        from moejax.moe.layer import DISPATCHES, ROUTINGS
        from moejax.moe.router import SCORES

        one_of("model.router_score", m.router_score, SCORES)
        one_of("model.routing", m.routing, ROUTINGS)
        one_of("model.dispatch", m.dispatch, DISPATCHES)
        check(m.bias_rate >= 0, "model.bias_rate", m.bias_rate, "must be >= 0 (0 = off)")
        check(m.num_shared_experts >= 0, "model.num_shared_experts", m.num_shared_experts,
              "must be >= 0")
        check(not m.shared_gate or m.num_shared_experts > 0, "model.shared_gate", m.shared_gate,
              "needs model.num_shared_experts >= 1 (it gates their output)")
        check(m.dispatch == "capacity" or m.routing == "tokens", "model.dispatch", m.dispatch,
              "allowed with model.routing=experts: capacity (expert choice never drops)")
    from moejax.moe.ffn import ACTIVATIONS

    one_of("model.activation", m.activation, tuple(ACTIVATIONS))
    one_of("model.dtype", m.dtype, ("float32", "bfloat16"))
    one_of("model.param_dtype", m.param_dtype, ("float32", "bfloat16"))
    from moejax.moe.quant import QTYPES

    one_of("model.quantization", m.quantization, tuple(QTYPES))
    check(not m.quantize_dense or m.quantization != "none", "model.quantize_dense",
          m.quantize_dense, "needs model.quantization=int8 or fp8 (it quantizes the dense "
          "matmuls too)")
    one_of("train.moment_dtype", t.moment_dtype, ("float32", "bfloat16"))
    check(m.head_dim % 2 == 0, "model.head_dim", m.head_dim, "must be even (rotary pairs)")
    check(m.num_kv_heads >= 0 and m.num_heads % (m.num_kv_heads or m.num_heads) == 0,
          "model.num_kv_heads", m.num_kv_heads,
          f"must be a divisor of num_heads={m.num_heads} (0 = num_heads)")
    check(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "must be > 0")
    from moejax.model.attention import QK_NORMS
    from moejax.model.transformer import REMAT

    one_of("model.qk_norm", m.qk_norm, QK_NORMS)
    check(m.dense_d_ff >= 0, "model.dense_d_ff", m.dense_d_ff, "must be >= 0 (0 = d_ff)")
    one_of("model.remat", m.remat, tuple(REMAT))
    check(1 <= d.seq_len <= m.max_seq_len, "data.seq_len", d.seq_len,
          f"must be in 1..model.max_seq_len={m.max_seq_len}")
    check_data(d)
    for key in ("grad_accum", "steps", "log_every", "eval_every", "ckpt_every",
                "max_nonfinite_steps"):
        check(t[key] >= 1, f"train.{key}", t[key], "must be >= 1")
    check(d.batch_size % (token_shards * t.grad_accum) == 0, "data.batch_size", d.batch_size,
          f"must be a multiple of data x fsdp x expert x grad_accum = {token_shards} x "
          f"{t.grad_accum}")
    if m.num_experts:  # the rule MoE.__call__ enforces, found now rather than when tracing
        micro_tokens = d.batch_size // t.grad_accum * d.seq_len
        check(m.num_groups >= 0 and m.num_groups % token_shards == 0
              and micro_tokens % (m.num_groups or 1) == 0, "model.num_groups", m.num_groups,
              f"must be a multiple of the {token_shards} token shards (data x fsdp x expert) "
              f"that divides the {micro_tokens} tokens of a micro-batch (data.batch_size / "
              "train.grad_accum x data.seq_len); 0 = one per token shard")
    for key in ("eval_batches", "keep_checkpoints"):
        check(t[key] >= 1, f"train.{key}", t[key], "must be >= 1")
    check(t.stop_at >= 0, "train.stop_at", t.stop_at, "must be >= 0 (0 = never)")
    check(t.lr >= 0, "train.lr", t.lr, "must be >= 0 (0 = a frozen run)")
    check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
    check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    for key in ("b1", "b2"):
        check(0 <= t[key] < 1, f"train.{key}", t[key], "must be in [0, 1)")
    # optax.clip_by_global_norm(0) scales every gradient to zero: there is no "off" value.
    check(t.grad_clip > 0, "train.grad_clip", t.grad_clip,
          "must be > 0 (a global-norm bound; 0 would zero every update)")
    one_of("train.schedule", t.schedule, ("cosine", "rsqrt"))
    if t.schedule == "cosine":
        check(0 <= t.warmup_steps < t.steps, "train.warmup_steps", t.warmup_steps,
              f"must be in 0..train.steps-1={t.steps - 1} (the cosine needs steps after it)")
    else:  # rsqrt: lr * min(step / warmup, sqrt(warmup / step))
        check(t.warmup_steps >= 1, "train.warmup_steps", t.warmup_steps,
              "must be >= 1 with train.schedule=rsqrt (it divides by the warmup)")
    check(0 <= t.collapse_threshold < 1, "train.collapse_threshold", t.collapse_threshold,
          "must be in [0, 1): a fraction of the uniform load 1/E (0 = off)")
    check(t.collapse_checks >= 1, "train.collapse_checks", t.collapse_checks, "must be >= 1")


def check_data(d) -> None:
    """The data.* keys naming the source: checked by train (validate) and by `python -m
    moejax.data prepare`, which reads the source."""

    def one_of(key, value, allowed):
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: unknown; allowed: {', '.join(allowed)}")

    one_of("data.source", d.source, ("stdlib", "files", "hub", "prepared"))
    one_of("data.on_error", d.on_error, ("skip", "fail"))
    if d.source == "files":
        one_of("data.format", d.format, ("text", "json", "parquet"))
    if d.get("mixture", ""):
        if d.source != "prepared":
            raise ConfigError(f"data.mixture={d.mixture!r}: needs data.source='prepared' (its "
                              "entries are prepared stores); allowed: data.source='prepared', "
                              "or data.mixture='' (one source)")
        if d.path:
            raise ConfigError(f"data.path={d.path!r}: unused with data.mixture (its entries "
                              "name the stores); allowed: ''")
        parse_mixture(d.mixture)
    elif not d.path and d.source in ("hub", "prepared"):
        raise ConfigError("data.path='': empty; allowed: " + (
            "a Hugging Face dataset name" if d.source == "hub" else
            "a folder written by python -m moejax.data prepare"))
    if not 0 <= d.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction={d.eval_fraction!r}: must be in [0, 1)")
    if not d.shuffle_buffer >= 0:
        raise ConfigError(f"data.shuffle_buffer={d.shuffle_buffer!r}: must be >= 0 (rows; "
                          "0: a stream's rows in order)")


MIXTURE_FORM = ("comma-separated STORE_DIR:WEIGHT entries of distinct prepared stores, "
                "weights > 0 (normalised to sum 1), e.g. 'stores/code:0.3,stores/web:0.7'")


def parse_mixture(value: str) -> list[tuple[str, Fraction]]:
    """data.mixture 'DIR_A:0.3,DIR_B:0.7' -> [(DIR_A, 3/10), (DIR_B, 7/10)]: exact weights,
    normalised to sum 1 ('a:3,b:7' is the same mixture); a bad string is one ConfigError line."""
    entries = []
    for entry in value.split(","):
        path, colon, weight = entry.strip().rpartition(":")
        problem = None
        try:
            w = Fraction(weight.strip()) if colon else None
        except (ValueError, ZeroDivisionError):
            w = None
        if not colon and entry.strip():
            problem = f"entry {entry.strip()!r}: no weight (or not a number) after its ':'"
        elif not path.strip():
            problem = f"entry {entry.strip()!r} names no store"
        elif w is None:
            problem = f"entry {entry.strip()!r}: no weight (or not a number) after its ':'"
        elif w <= 0:
            problem = f"entry {entry.strip()!r}: weight {weight.strip()} is not > 0"
        elif path.strip() in [p for p, _ in entries]:
            problem = f"store {path.strip()!r} appears twice"
        if problem:
            raise ConfigError(f"data.mixture={value!r}: {problem}; allowed: {MIXTURE_FORM}")
        entries.append((path.strip(), w))
    total = sum(w for _, w in entries)
    return [(p, w / total) for p, w in entries]


def check_workdir(workdir: str) -> None:
    """Find out now, not at the first checkpoint, that the run cannot write its results."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise ConfigError(f"--workdir={workdir!r}: not writable ({e.strerror or e}); allowed: "
                          "a directory this user can create and write") from None
