"""Tokenize a corpus once, in parallel, into a memory-mapped token store (moejax/data/store.py).

  python -m moejax.data prepare --config configs/X.py[:variant] --out DIR [--num_proc N]
      [--config.a.b=v]

The config's data.* keys name the source (stdlib, files or hub), the tokenizer and the
held-out fraction; train from the store with --config.data.source=prepared
--config.data.path=DIR.
"""

import os
import sys

from moejax import cli
from moejax.data import store


def main(argv=None):
    from absl import flags
    from ml_collections import config_flags

    argv = sys.argv if argv is None else argv
    fv = flags.FlagValues()  # its own: main may run more than once in one process (tests)
    config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:variant]: its data.* "
                                    "keys name the source, the tokenizer and the held-out "
                                    "fraction", flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("out", None, "the store's folder: new, empty, or an unfinished "
                        "prepare's", flag_values=fv)
    flags.DEFINE_integer("num_proc", os.cpu_count() or 1, "tokenizer processes",
                         lower_bound=1, flag_values=fv)
    flags.mark_flags_as_required(["config", "out"], flag_values=fv)
    with cli.one_line_errors():
        cli.positional(cli.parse_flags(argv, __doc__, fv, "out"), {"COMMAND": ("prepare",)})
        try:
            store.prepare(fv.config.data, fv.out, fv.num_proc)
        except KeyboardInterrupt:
            sys.exit(f"interrupted: {fv.out} is unfinished; run the same command again")


if __name__ == "__main__":
    main()
