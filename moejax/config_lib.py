"""Helpers for configs/*.py: variant strings and checks that run before anything compiles."""

import contextlib
import math
import os
import re
import sys
import tempfile
from collections.abc import Sequence

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
    from moejax.moe.experts import ACTIVATIONS

    one_of("model.activation", m.activation, tuple(ACTIVATIONS))
    one_of("model.dtype", m.dtype, ("float32", "bfloat16"))
    one_of("model.param_dtype", m.param_dtype, ("float32", "bfloat16"))
    check(m.head_dim % 2 == 0, "model.head_dim", m.head_dim, "must be even (rotary pairs)")
    check(m.num_kv_heads >= 0 and m.num_heads % (m.num_kv_heads or m.num_heads) == 0,
          "model.num_kv_heads", m.num_kv_heads,
          f"must be a divisor of num_heads={m.num_heads} (0 = num_heads)")
    check(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "must be > 0")
    from moejax.model import QK_NORMS, REMAT

    one_of("model.qk_norm", m.qk_norm, QK_NORMS)
    check(m.dense_d_ff >= 0, "model.dense_d_ff", m.dense_d_ff, "must be >= 0 (0 = d_ff)")
    one_of("model.remat", m.remat, tuple(REMAT))
    check(1 <= d.seq_len <= m.max_seq_len, "data.seq_len", d.seq_len,
          f"must be in 1..model.max_seq_len={m.max_seq_len}")
    one_of("data.source", d.source, ("stdlib", "files", "hub"))
    one_of("data.on_error", d.on_error, ("skip", "fail"))
    if d.source == "files":
        one_of("data.format", d.format, ("text", "json", "parquet"))
    if d.source == "hub":
        check(d.path, "data.path", d.path, "empty; allowed: a Hugging Face dataset name")
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
    check(0 <= d.eval_fraction < 1, "data.eval_fraction", d.eval_fraction, "must be in [0, 1)")
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


def check_workdir(workdir: str) -> None:
    """Find out now, not at the first checkpoint, that the run cannot write its results."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise ConfigError(f"--workdir={workdir!r}: not writable ({e.strerror or e}); allowed: "
                          "a directory this user can create and write") from None


def run(main) -> None:
    """Parse --config / --workdir like absl's app.run, but a bad flag or config value is one
    line, not a dump, and --help prints the usage of `main`'s module."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:variant]",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and config.json")
    flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-host, not needed "
                        "on Cloud TPU pods or under SLURM, where it is detected)")
    flags.DEFINE_integer("num_processes", None, "processes in the job (with --coordinator)")
    flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator)")
    flags.mark_flags_as_required(["config", "workdir"])
    with one_line_errors():
        argv = parse_flags(sys.argv, sys.modules[main.__module__].__doc__)
    f = flags.FLAGS
    init_distributed(f.coordinator, f.num_processes, f.process_id)
    with one_line_errors():
        main(argv)


@contextlib.contextmanager
def one_line_errors():
    """A ConfigError ends the program with its one line on stderr and exit code 1."""
    try:
        yield
    except ConfigError as e:
        sys.exit(f"error: {e}")


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`path.py[:variant]` with `--config.a.b=v` overrides, read by config_flags exactly as
    train's --config reads them; any problem is train's one-line ConfigError."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["load", f"--config={spec}", *overrides]
    fv = flags.FlagValues()  # private: loading twice must not redefine global flags
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    if rest := parse_flags(argv, None, fv)[1:]:
        raise ConfigError(f"{rest[0]!r}: not an override; allowed: --config.KEY=VALUE")
    return fv.config


def parse_flags(argv: list[str], doc: str | None, flag_values=None,
                flag: str = "config") -> list[str]:
    """absl's flags.FLAGS(argv), or `flag_values`'s: -h / --help prints `doc`'s summary and
    the flags of `flag`'s module, then exits 0; a bad flag, config file or override key raises
    one ConfigError line. Returns the arguments that are not flags, the program's name first."""
    from absl import flags

    fv = flags.FLAGS if flag_values is None else flag_values
    if {"-h", "-help", "--help"} & set(argv[1:]):
        print(usage(doc, fv, flag))
        sys.exit(0)
    try:
        rest = fv(argv)
        if "config" in fv and fv["config"].value is not None:
            fv.config.keys()  # a missing file shows only when the config is first read
    except Exception as e:  # whatever the config file raised; nothing has run yet
        message = flag_error(e, argv)
        if flag_values is not None:  # train's and plan's messages are as their tests pin them
            message = name_allowed(message, e, fv, flag)
        raise ConfigError(message) from None
    return rest


def name_allowed(message: str, e: Exception, fv, flag: str) -> str:
    """absl's message, with what is allowed: the flags of the entry point for an unknown one
    (the global FLAGS would list absl's own too), the help of a missing one."""
    from absl import flags

    if isinstance(e, flags.UnrecognizedFlagError) and not e.flagname.startswith("config."):
        own = [f.name for f in fv.flags_by_module_dict()[fv.find_module_defining_flag(flag)]]
        return (f"{message}; allowed: {', '.join('--' + n for n in own)}"
                + (", --config.KEY=VALUE" if "config" in own else ""))
    if missing := re.search(r"Flag --(\w+) must have a value other than None", message):
        return f"missing --{missing[1]}; allowed: {fv[missing[1]].help}"
    return message


def usage(doc: str | None, flag_values=None, flag: str = "config") -> str:
    """The module docstring's summary and usage line, then the flags it defines."""
    from absl import flags

    f, summary = flags.FLAGS if flag_values is None else flag_values, (doc or "").strip()
    module = f.find_module_defining_flag(flag)
    listing = f.module_help(module).strip().split("\n", 1)[1]
    if "config" in f and f.find_module_defining_flag("config") == module:
        listing += ("\n  --config.KEY=VALUE: set any key of the config, e.g.\n    "
                    "--config.train.lr=1e-3 (configs/tiny.py lists them all)")
    return "\n\n".join(summary.split("\n\n")[:2]) + f"\n\nflags:\n{listing}"


def positional(rest: list[str], expected: dict) -> list[str]:
    """The arguments after the program's name that are not flags: one per key of `expected`
    (NAME: a tuple of the values allowed, or a phrase saying what is), no more."""
    args = rest[1:]
    for i, (name, allowed) in enumerate(expected.items()):
        what = ", ".join(allowed) if isinstance(allowed, tuple) else allowed
        if i >= len(args):
            raise ConfigError(f"missing {name}; allowed: {what}")
        if isinstance(allowed, tuple) and args[i] not in allowed:
            raise ConfigError(f"{name}={args[i]!r}: unknown; allowed: {what}")
    if len(args) > len(expected):
        raise ConfigError(f"{args[len(expected)]!r}: unexpected argument; allowed: "
                          + (" ".join(expected) if expected else "flags only"))
    return args


def check_flags(fv, allowed: Sequence[str], context: str) -> None:
    """A flag given that `context` (a mode, a subcommand) would ignore is an error."""
    for name in fv:  # an entry point's own FlagValues, so its flags only
        if fv[name].present and name.split(".")[0] not in allowed:  # config.KEY: an override
            raise ConfigError(f"--{name}: not a flag of {context}; allowed: "
                              + ", ".join(f"--{a}" for a in allowed))


def flag_error(e: Exception, argv: list[str]) -> str:
    """What went wrong parsing `argv`, in one line that names the flag and what is allowed."""
    from absl import flags

    spec = config_spec(argv)
    chain = [e]  # absl and ml_collections re-raise what the config file raised: find it
    while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(inner)
    if spec is not None:
        path = spec.split(":", 1)[0]
        if not os.path.isfile(path):
            return f"--config={spec}: no such file; allowed: a configs/<name>.py file"
        for err in chain:
            if isinstance(err, SyntaxError):
                return (f"--config={spec}: {err.msg} at line {err.lineno} of {path}; allowed: "
                        "a Python file defining get_config()")
        for err in reversed(chain):  # the innermost: the outer ones wrap its traceback
            if isinstance(err, ConfigError):
                return f"--config={spec}: {first_line(err)}"
        if unknown := unknown_override(spec, argv):
            return unknown
        if "Error whilst parsing config file" in str(e) or not isinstance(e, flags.Error):
            inner = chain[-1]  # what the config file itself raised
            return f"--config={spec}: cannot load ({type(inner).__name__}: {first_line(inner)})"
    return first_line(e)


def config_spec(argv: list[str]) -> str | None:
    """The value of --config in `argv`, in either spelling, if it is there."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith(("--config=", "-config="))),
                None)
    if spec is None and (i := next((i for i, a in enumerate(argv)
                                    if a in ("--config", "-config")), None)) is not None:
        spec = argv[i + 1] if i + 1 < len(argv) else None
    return spec


def unknown_override(spec: str, argv: list[str]) -> str | None:
    """'unknown key model.num_expert; did you mean model.num_experts?' for the first
    --config.KEY=... whose key the config (loaded again, overrides aside) does not have."""
    import difflib

    from ml_collections import config_flags

    try:
        config = config_flags.config_flags.ConfigFileFlagParser("config").parse(spec)
        keys = flat_keys(config)
    except Exception:  # the caller reports the original error instead
        return None
    for arg in argv:
        if match := re.match(r"^--?(?:no)?config\.([^=]+)", arg):
            key = match.group(1)
            if key not in keys:
                close = difflib.get_close_matches(key, keys, n=1)
                groups = sorted({k.split(".")[0] + ".*" if "." in k else k for k in keys
                                 if not any(o.startswith(k + ".") for o in keys)})
                return f"unknown key {key}; " + (f"did you mean {close[0]}?" if close else
                                                 f"allowed: {', '.join(groups)}")
    return None


def flat_keys(config, prefix: str = "") -> list[str]:
    """Every dotted key of a ConfigDict, groups and leaves: ['model', 'model.d_model', ...]."""
    keys = []
    for name, value in config.items():
        keys.append(prefix + name)
        if isinstance(value, ml_collections.ConfigDict):
            keys += flat_keys(value, f"{prefix}{name}.")
    return keys


def init_distributed(coordinator: str | None, num_processes: int | None,
                     process_id: int | None) -> None:
    """Join the multi-host job, if this is one; a single process needs nothing."""
    import jax

    if coordinator:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            # CPU processes exchange collectives over TCP with gloo (tests, launch/local.sh).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif (int(os.environ.get("SLURM_NTASKS", "1")) > 1
          or os.environ.get("MOEJAX_DISTRIBUTED") == "1"):  # set by launch/tpu_pod.sh
        jax.distributed.initialize()  # detects the coordinator from SLURM / the TPU metadata
