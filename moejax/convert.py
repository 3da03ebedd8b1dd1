"""Weights in from and out to Hugging Face transformers: Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE,
DeepseekV3ForCausalLM (DeepSeek-V3/R1/V3.1, Kimi K2: MLA, MTP; docs/checkpoints.md).

  python -m moejax.convert from-hf SRC --workdir DIR [--mesh fsdp=8,expert=8]
  python -m moejax.convert to-hf OUT --workdir DIR [--dtype bfloat16] [--shard_gib 4]
      [--quantize int8|int4] [--overwrite]

from-hf: SRC is a local folder with config.json and *.safetensors, or a hub name (fetched with
huggingface_hub); all of it is checked before anything is written (each file whole, each
tensor once and a float, exactly the files an index names, every config key of its kind, a
tokenizer.json if it has a tokenizer). DIR, new or empty, gets config.py (the model as a
moejax config, fine-tuning defaults for the rest), config.json, hf/ (SRC's config and
tokenizer files) and checkpoints/0 (the weights and a fresh AdamW state), which `train`
resumes from and `generate` samples from. Each weight is built on the devices in its training
layout one layer at a time, every device reading only its own slice of that layer's tensors:
host memory holds one layer of one weight, never the model. Run it on every host of a pod,
like `train`. If writing fails (a full disk), DIR is left as it was.

to-hf: the newest checkpoint of DIR as config.json + *.safetensors files of at most
--shard_gib each (+ model.safetensors.index.json), which AutoModelForCausalLM loads; one
tensor is fetched from the devices at a time, one file's tensors are held at a time. The
files are written into a folder beside OUT and renamed into place whole, readable as
config.json is: OUT new or empty, or with --overwrite an earlier export, replaced whole
(never a mix of two models); OUT inside the run, or holding it, is refused.
Router state the architecture has no tensor for (the selection bias of auxiliary-loss-free
balancing, bias_rate > 0, in Mixtral, Qwen2/3-MoE, OLMoE) goes to moejax_router.safetensors
and moejax_router.json beside the model files; from-hf reads them back, so training after a
round trip goes on the same (docs/checkpoints.md, "Router state").
--quantize writes the routed experts' weights weight-only int8 / int4 (moejax's own
quantization, as generate --quantize runs) in compressed-tensors' pack-quantized format, which
transformers loads with the compressed-tensors package; from-hf reads such a checkpoint back,
dequantized (moejax/hf/compressed.py). DeepSeek's own block-scaled FP8 (quant_method fp8,
float8 weights with weight_scale_inv, as DeepSeek-V3 and Kimi K2 ship) is dequantized to
float32 on import, tensor by tensor (moejax/hf/files.py); to-hf writes plain weights at the
run's dtype or --dtype, never FP8.
"""

import math
import sys

from moejax import cli, config_lib
from moejax.config_lib import ConfigError
from moejax.hf.convert import from_hf, to_hf
from moejax.hf.files import SHARD_GIB
from moejax.moe import quant

COMMANDS = {  # subcommand: its positional argument, what that may be, the flags it takes
    "from-hf": ("SRC", "a local folder with config.json + *.safetensors, or a hub name like "
                "org/model", ("workdir", "mesh")),
    "to-hf": ("OUT", "the folder to write the transformers checkpoint into",
              ("workdir", "dtype", "shard_gib", "quantize", "overwrite")),
}


def main(argv=None):
    import jax
    from absl import flags

    from moejax.parallel import AXES

    argv = sys.argv if argv is None else argv
    fv = flags.FlagValues()  # its own: main may run more than once in one process (tests)
    flags.DEFINE_string("workdir", None, "from-hf: the run to create; to-hf: the run to read",
                        flag_values=fv)
    flags.DEFINE_string("mesh", "", "from-hf: layout of the written state, e.g. fsdp=8 "
                        "(default: fsdp over all devices); also the config's mesh",
                        flag_values=fv)
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "to-hf: the files' "
                      "dtype (default: the imported checkpoint's, else float32)", flag_values=fv)
    flags.DEFINE_float("shard_gib", 4.0, "to-hf: largest file, in GiB", flag_values=fv)
    flags.DEFINE_enum("quantize", "none", ["none", *quant.WEIGHT_ONLY], "to-hf: the routed "
                      "experts' weights weight-only, in compressed-tensors' format",
                      flag_values=fv)
    flags.register_validator("shard_gib", lambda g: math.isfinite(g) and g > 0,
                             SHARD_GIB, flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "to-hf: replace what OUT holds, an earlier export, "
                      "whole (default: refuse a non-empty OUT)", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    names = tuple(COMMANDS)
    with cli.one_line_errors():
        rest = cli.parse_flags(argv, __doc__, fv, "workdir")
        command = cli.positional(rest[:2], {"COMMAND": names})[0]
        arg, what, allowed = COMMANDS[command]
        path = cli.positional(rest, {"COMMAND": names, arg: what})[1]
        cli.check_flags(fv, allowed, command)
        mesh = config_lib.parse_mesh(fv.mesh) if fv.mesh else None  # train's spelling
    cli.init_distributed(None, None, None)
    try:
        if command == "from-hf":
            if mesh is not None:
                mesh = config_lib.check_mesh(dict.fromkeys(AXES, 1) | mesh, jax.device_count())
            out = from_hf(path, fv.workdir, mesh)
            print(f"wrote {fv.workdir}: checkpoint 0 and {out}; fine-tune with\n"
                  f"  python -m moejax.train --config {out} --workdir {fv.workdir}")
        else:
            to_hf(fv.workdir, path, fv.dtype, fv.shard_gib, fv.quantize, fv.overwrite)
    except ConfigError as e:  # one line already, which may name long paths: whole
        sys.exit(f"error: {e}")
    except (ValueError, OSError) as e:  # OSError: a disk's or a folder's
        sys.exit(f"error: {config_lib.first_line(e)}")


if __name__ == "__main__":
    main()
