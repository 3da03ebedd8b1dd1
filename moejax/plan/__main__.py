"""Size a run before paying for it: compile its train step for simulated devices.

  python -m moejax.plan --config configs/X.py[:variant] [--mesh fsdp=8,expert=8]
      [--hbm_gib 80] [--devices_per_host 8] [--target h100 [--search]
      [--expert_load WORKDIR]] [--config.model.remat=full]

Nothing is allocated and nothing runs. The state comes from `state.setup` (abstract arrays
with the trainer's shardings), the train step is `state.train_step_fn`, compiled by XLA:CPU
for exactly the mesh's number of host devices (`--xla_force_host_platform_device_count`), and
the report is read off the executable. `--mesh` sets any of data, fsdp, expert, context,
tensor, each at most once, sized as the config's mesh.* are (>= 1, or one -1: "the remaining
devices", which is 1 here); the others keep the config's sizes.

Conventions (docs/memory.md checks them against a real run):
- Memory per device = arguments + outputs - outputs aliased to donated arguments + temporaries,
  from the compiled memory analysis. Parameters and optimizer state are exact for any backend
  (the step takes and returns them in one layout, donated). Temporaries are XLA:CPU's buffer
  assignment: GPU and TPU fuse differently (and have fused attention).
- Precision: the state and the inference weights at each dtype setting are arithmetic on the
  real shard shapes (`moejax/run/params.py`); only the config's own setting is compiled.
- Collectives: payload and wire bytes per device as `moejax/plan/collectives.py` reads them off the
  optimized HLO.
- All-to-all minimum, per MoE layer forward: dispatch and return each move the [E*C, d] slot
  buffer of every capacity group, 2 x groups x E x C x d x bytes = 2 x tokens x k x cf x d x
  bytes, summed over token shards, with C rounded up as the router does. The backward pass
  moves the cotangents of both, the same again; with remat it first reruns the forward's.
"""

import math
import os
import re
import sys


def main() -> None:
    from absl import flags
    from ml_collections import config_flags

    from moejax import cli, config_lib  # import no jax: XLA_FLAGS can still be set below
    from moejax.plan import hardware

    config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:variant]",
                                    lock_config=True)
    flags.DEFINE_string("mesh", None, "fsdp=8,expert=8: sizes of data, fsdp, expert, context, "
                        "tensor, as the config's mesh.* (axes left out keep the config's)")
    flags.DEFINE_float("hbm_gib", 80.0, "device memory for the verdict, GiB")
    flags.DEFINE_integer("devices_per_host", 8, "devices one host serves (8: an H100 or H200 "
                         "node; 4: a TPU v5p host): the host memory that offloaded optimizer "
                         "moments take (train.offload_optimizer)")
    flags.DEFINE_string("target", None, "h100 | h200 | b200 | gb200 | v5p | v6e | ironwood: "
                        "predict the step time and MFU on that chip (moejax/plan/predict.py); "
                        "its memory and devices per host replace --hbm_gib and "
                        "--devices_per_host unless given")
    flags.DEFINE_bool("search", False, "with --target: the fastest predicted layout that fits, "
                      "over mesh shapes on the mesh's devices, remat, micro-batches, moment "
                      "dtype and offload (moejax/plan/search.py)")
    flags.DEFINE_string("expert_load", None, "with --target: a run's workdir (or its "
                        "metrics.jsonl): price routing at the expert load it logged last, not "
                        "balanced (dropless waits for the busiest expert-parallel rank)")
    flags.mark_flags_as_required(["config"])
    with cli.one_line_errors():
        cli.parse_flags(sys.argv, __doc__)  # --help, bad flags and config files
        config = flags.FLAGS.config
        config_lib.check_number("--hbm_gib", flags.FLAGS.hbm_gib, "> 0",
                                "GiB of memory per device")
        config_lib.check_number("--devices_per_host", flags.FLAGS.devices_per_host, "> 0",
                                "devices per host")
        if flags.FLAGS.search and not flags.FLAGS.target:
            raise config_lib.ConfigError(f"--search needs --target; allowed: "
                                         f"{', '.join(hardware.TARGETS)}")
        if flags.FLAGS.expert_load and not flags.FLAGS.target:
            raise config_lib.ConfigError(f"--expert_load needs --target; allowed: "
                                         f"{', '.join(hardware.TARGETS)}")
        chip = hardware.target(flags.FLAGS.target) if flags.FLAGS.target else None
        step, load = 0, None
        if flags.FLAGS.expert_load and config.model.routing != "tokens":
            raise config_lib.ConfigError(
                f"--expert_load: model.routing={config.model.routing!r} is balanced by "
                "construction; allowed: model.routing='tokens' (the router's own choice)")
        if flags.FLAGS.expert_load:
            from moejax.plan.load import read_load

            step, load = read_load(flags.FLAGS.expert_load, config.model.num_experts)
        hbm_gib, per_host = flags.FLAGS.hbm_gib, flags.FLAGS.devices_per_host
        if chip and not flags.FLAGS["hbm_gib"].present:
            hbm_gib = chip.hbm_gib / chip.devices_per_chip
        if chip and not flags.FLAGS["devices_per_host"].present:
            per_host = chip.devices_per_host
        # The flag is spelled and checked as train's mesh.* are, over the config's own.
        sizes = config_lib.check_mesh({**config.mesh,
                                       **config_lib.parse_mesh(flags.FLAGS.mesh or "")})
        # -1 means "the remaining devices", and only the devices the rest need are made.
        mesh = {a: max(s, 1) for a, s in sizes.items()}

    # The simulated devices must exist before jax's CPU backend starts (at its first use).
    xla_flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                       os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = (f"{xla_flags} --xla_force_host_platform_device_count="
                               f"{math.prod(mesh.values())}")
    os.environ["JAX_PLATFORMS"] = "cpu"
    from moejax.plan.estimate import plan
    from moejax.plan.report import report

    if flags.FLAGS.search:
        from moejax.plan.search import search, search_lines

        devices = math.prod(mesh.values())
        with cli.one_line_errors():
            results = search(config, chip, devices, load=load)
        print("\n".join(search_lines(results, chip, devices, load, step)))
        return
    fused = False
    if chip:
        from moejax.plan.predict import as_priced, plan_priced, prediction_lines, target_fused

        fused = target_fused(config, mesh, chip)
    with cli.one_line_errors():
        p = plan(config, mesh, fused_attention=fused)
    text = report(p, flags.FLAGS["config"].config_filename, hbm_gib, per_host)
    if chip:
        if as_priced(config) is not config:  # dropless: priced by its all-to-all, compiled again
            with cli.one_line_errors():
                p = plan_priced(config, mesh, chip)
            text += ("\n\ndropless priced as the capacity path at factor 1: the same rows "
                     "through one all-to-all (XLA:CPU compiled a ring above)")
        text += "\n" + "\n".join(prediction_lines(p, chip, load, step))
    print(text)


if __name__ == "__main__":
    main()
