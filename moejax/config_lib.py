"""Helpers for configs/*.py: variant strings and checks that run before anything compiles."""

import ml_collections


def parse_variant(arg: str | None, allowed: tuple[str, ...]) -> str | None:
    """`--config configs/x.py:name` passes "name"; no suffix passes None."""
    if arg and arg not in allowed:
        raise ValueError(f"unknown config variant {arg!r}; allowed: {', '.join(allowed)}")
    return arg or None


def config_dict(**groups) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(groups)


class ConfigError(ValueError):
    """A bad config value: the message names the key and what is allowed."""


def mesh_shape(config, num_devices: int) -> tuple[int, int]:
    """(data, expert) with data = -1 filled in from the device count."""
    expert = config.mesh.expert
    data = config.mesh.data if config.mesh.data != -1 else max(num_devices // max(expert, 1), 1)
    return data, expert


def validate(config, num_devices: int) -> None:
    """Fail fast, before anything compiles, with one line naming the key and what is allowed."""
    m, d, t = config.model, config.data, config.train
    data, expert = mesh_shape(config, num_devices)

    def check(ok, message):
        if not ok:
            raise ConfigError(message)

    check(expert >= 1, f"mesh.expert={expert}: must be >= 1")
    check(data >= 1, f"mesh.data={data}: must be >= 1 or -1 (all remaining devices)")
    check(data * expert <= num_devices,
          f"mesh data={data} x expert={expert} = {data * expert} devices; only {num_devices} exist")
    check(m.num_experts >= 0, f"model.num_experts={m.num_experts}: must be >= 0 (0 = dense)")
    if m.num_experts:
        check(m.num_experts % expert == 0, f"model.num_experts={m.num_experts} must be divisible "
              f"by mesh.expert={expert}")
        check(1 <= m.top_k <= m.num_experts,
              f"model.top_k={m.top_k}: must be in 1..num_experts={m.num_experts}")
        check(m.capacity_factor > 0, f"model.capacity_factor={m.capacity_factor}: must be > 0")
        check(m.eval_capacity_factor > 0,
              f"model.eval_capacity_factor={m.eval_capacity_factor}: must be > 0")
        check(m.moe_every >= 1, f"model.moe_every={m.moe_every}: must be >= 1")
    from moejax.moe.experts import ACTIVATIONS

    check(m.activation in ACTIVATIONS,
          f"model.activation={m.activation!r}: allowed {', '.join(ACTIVATIONS)}")
    check(m.dtype in ("float32", "bfloat16"), f"model.dtype={m.dtype!r}: allowed float32, bfloat16")
    check(m.param_dtype in ("float32", "bfloat16"),
          f"model.param_dtype={m.param_dtype!r}: allowed float32, bfloat16")
    check(m.head_dim % 2 == 0, f"model.head_dim={m.head_dim}: must be even (rotary pairs)")
    check(d.seq_len <= m.max_seq_len,
          f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    check(d.source in ("stdlib", "files", "hub"),
          f"data.source={d.source!r}: allowed stdlib, files, hub")
    shards = data * expert * t.grad_accum
    check(d.batch_size % shards == 0,
          f"data.batch_size={d.batch_size} must be divisible by data x expert x grad_accum = "
          f"{data} x {expert} x {t.grad_accum}")
    check(t.schedule in ("cosine", "rsqrt"),
          f"train.schedule={t.schedule!r}: allowed cosine, rsqrt")
    check(t.steps >= 1, f"train.steps={t.steps}: must be >= 1")


def run(main) -> None:
    """Parse --config / --workdir like absl's app.run, but a bad flag is one line, not a dump."""
    import sys

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
    try:
        argv = flags.FLAGS(sys.argv)
    except (flags.Error, ValueError, KeyError, AttributeError) as e:
        sys.exit(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    f = flags.FLAGS
    init_distributed(f.coordinator, f.num_processes, f.process_id)
    main(argv)


def init_distributed(coordinator: str | None, num_processes: int | None,
                     process_id: int | None) -> None:
    """Join the multi-host job, if this is one; a single process needs nothing."""
    import os

    import jax

    if coordinator:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            # CPU processes exchange collectives over TCP with gloo (tests, launch/local.sh).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif (int(os.environ.get("SLURM_NTASKS", "1")) > 1
          or os.environ.get("MOEJAX_DISTRIBUTED") == "1"):  # set by launch/tpu_pod.sh
        jax.distributed.initialize()  # detects the coordinator from SLURM / the TPU metadata
