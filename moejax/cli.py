"""Command lines: absl flags with ml_collections' config_flags for every entry point, --help
that prints the module's usage and flags, and one line naming the flag and what is allowed for
anything bad, before anything is built. Imports no jax (plan sets XLA_FLAGS after parsing)."""

import contextlib
import os
import re
import sys
from collections.abc import Sequence

import ml_collections

from moejax.config_lib import ConfigError, check_number, first_line, range_of


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
    flags.DEFINE_integer("heartbeat_timeout_s", 100, "multi-host: a process silent this long "
                         "is taken for dead and the others stop (jax's default: 100)")
    flags.mark_flags_as_required(["config", "workdir"])
    f = flags.FLAGS
    with one_line_errors():
        argv = parse_flags(sys.argv, sys.modules[main.__module__].__doc__)
        if f.num_processes is not None:
            check_number("--num_processes", f.num_processes, ">= 1")
        if f.process_id is not None:
            check_number("--process_id", f.process_id, f"in [0, {f.num_processes})"
                         if f.num_processes else ">= 0")
        check_number("--heartbeat_timeout_s", f.heartbeat_timeout_s, ">= 1")
    init_distributed(f.coordinator, f.num_processes, f.process_id, f.heartbeat_timeout_s)
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
        raise ConfigError(name_allowed(flag_error(e, argv), e, fv, flag)) from None
    return rest


def name_allowed(message: str, e: Exception, fv, flag: str) -> str:
    """absl's message, with what is allowed: the flags of the entry point for an unknown one
    (the global FLAGS would list absl's own too), the help of a missing one."""
    from absl import flags

    if isinstance(e, flags.UnrecognizedFlagError) and not e.flagname.startswith("config."):
        import difflib

        own = [f.name for f in fv.flags_by_module_dict()[fv.find_module_defining_flag(flag)]]
        close = difflib.get_close_matches(e.flagname, own, n=1)  # absl's looks at its own too
        return (f"unknown flag --{e.flagname}; "
                + (f"did you mean --{close[0]}? " if close else "")
                + f"allowed: {', '.join('--' + n for n in own)}"
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
        if not_a_number := re.match(r"flag --config\.([\w.]+)=.*: (invalid literal for int|"
                                    r"could not convert string to float)", first_line(e)):
            key, kind = not_a_number.groups()
            return (f"{first_line(e)}; allowed: {'an integer' if 'int' in kind else 'a number'}"
                    f" {range_of(key)}").rstrip()
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
                     process_id: int | None, heartbeat_timeout_s: int = 100) -> None:
    """Join the multi-host job, if this is one; a single process needs nothing. A peer that
    sends no heartbeat for `heartbeat_timeout_s` is dead: the others stop (non-zero)."""
    import jax

    if coordinator:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            # CPU processes exchange collectives over TCP with gloo (tests, launch/local.sh).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id,
                                   heartbeat_timeout_seconds=heartbeat_timeout_s)
    elif (int(os.environ.get("SLURM_NTASKS", "1")) > 1
          or os.environ.get("MOEJAX_DISTRIBUTED") == "1"):  # set by launch/tpu_pod.sh
        # The coordinator from SLURM / the TPU metadata.
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
