"""Issue #20: bad input is one line naming the key, its value and what is allowed, and a nonzero
exit, before anything compiles; -h / --help print the usage and exit 0.

validate() and the flag parsing of config_lib.run and plan.main run in-process (sys.argv
monkeypatched); only --help runs as a real `python -m` process, since the usage it prints comes
from the module that runs as __main__.
"""

import os
import subprocess
import sys

import pytest
from absl import flags

from moejax import config_lib, plan
from tests.test_train import smoke

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------
# validate(): the smoke config (batch 16 x 32 tokens) on 8 devices, so 8 token shards.

INVALID = [  # overrides, the whole message
    ({"train.lr": -1e-3}, "train.lr=-0.001: must be >= 0 (0 = a frozen run)"),
    ({"train.grad_clip": 0.0},
     "train.grad_clip=0.0: must be > 0 (a global-norm bound; 0 would zero every update)"),
    ({"train.grad_clip": -1.0},
     "train.grad_clip=-1.0: must be > 0 (a global-norm bound; 0 would zero every update)"),
    ({"train.schedule": "rsqrt", "train.warmup_steps": 0},
     "train.warmup_steps=0: must be >= 1 with train.schedule=rsqrt (it divides by the warmup)"),
    ({"train.eval_batches": 0}, "train.eval_batches=0: must be >= 1"),
    ({"train.keep_checkpoints": 0}, "train.keep_checkpoints=0: must be >= 1"),
    ({"train.stop_at": -1}, "train.stop_at=-1: must be >= 0 (0 = never)"),
    ({"train.min_lr_ratio": 1.5}, "train.min_lr_ratio=1.5: must be in [0, 1]"),
    ({"train.weight_decay": -0.1}, "train.weight_decay=-0.1: must be >= 0"),
    ({"train.b2": 1.0}, "train.b2=1.0: must be in [0, 1)"),
    ({"model.d_model": 0}, "model.d_model=0: must be >= 1"),
    ({"model.num_layers": 0}, "model.num_layers=0: must be >= 1"),
    ({"model.num_heads": 0}, "model.num_heads=0: must be >= 1"),  # was a ZeroDivisionError
    ({"model.head_dim": 0}, "model.head_dim=0: must be >= 1"),  # was "even", so allowed
    ({"model.d_ff": -64}, "model.d_ff=-64: must be >= 1"),
    ({"model.max_seq_len": 0}, "model.max_seq_len=0: must be >= 1"),
    ({"model.vocab_size": -1}, "model.vocab_size=-1: must be >= 0 (0 = the tokenizer's)"),
    ({"data.batch_size": 0}, "data.batch_size=0: must be >= 1"),  # 0 % 8 == 0 passed before
    ({"data.batch_size": -16}, "data.batch_size=-16: must be >= 1"),
    ({"data.seq_len": 0}, "data.seq_len=0: must be in 1..model.max_seq_len=2048"),
    ({"data.eval_fraction": 1.0}, "data.eval_fraction=1.0: must be in [0, 1)"),
    ({"model.num_groups": 6},
     "model.num_groups=6: must be a multiple of the 8 token shards (data x fsdp x expert) that "
     "divides the 512 tokens of a micro-batch (data.batch_size / train.grad_accum x "
     "data.seq_len); 0 = one per token shard"),
    ({"model.num_groups": 1024},
     "model.num_groups=1024: must be a multiple of the 8 token shards (data x fsdp x expert) "
     "that divides the 512 tokens of a micro-batch (data.batch_size / train.grad_accum x "
     "data.seq_len); 0 = one per token shard"),
    ({"model.num_groups": 512, "train.grad_accum": 2},
     "model.num_groups=512: must be a multiple of the 8 token shards (data x fsdp x expert) "
     "that divides the 256 tokens of a micro-batch (data.batch_size / train.grad_accum x "
     "data.seq_len); 0 = one per token shard"),
    ({"model.num_groups": -8},
     "model.num_groups=-8: must be a multiple of the 8 token shards (data x fsdp x expert) "
     "that divides the 512 tokens of a micro-batch (data.batch_size / train.grad_accum x "
     "data.seq_len); 0 = one per token shard"),
]

VALID = [  # edge values that are allowed
    {"train.lr": 0.0},
    {"train.schedule": "rsqrt", "train.warmup_steps": 1},
    {"model.num_groups": 512},
    {"model.num_groups": 8, "train.grad_accum": 2},
    {"model.num_groups": 6, "model.num_experts": 0},  # dense: no capacity groups
]


def ids(rows):
    return ["+".join(f"{k}={v}" for k, v in o.items()) for o in rows]


@pytest.mark.parametrize("overrides,error", INVALID, ids=ids(o for o, _ in INVALID))
def test_invalid_value_is_one_line_naming_the_key(overrides, error):
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(smoke(**overrides), 8)
    assert str(e.value) == error


@pytest.mark.parametrize("overrides", VALID, ids=ids(VALID))
def test_edge_values_are_allowed(overrides):
    config_lib.validate(smoke(**overrides), 8)


# ---------------------------------------------------------------------------------------------
# Flags and config files, through config_lib.run (train) and plan.main.

@pytest.fixture
def argv(monkeypatch):
    """Set sys.argv; run() and plan.main() define their flags on absl's global FLAGS, so the
    flags they add are removed afterwards and the next call can define them again."""
    before, parsed = set(flags.FLAGS), flags.FLAGS.is_parsed()
    yield lambda *args: monkeypatch.setattr(sys, "argv", ["prog", *args])
    for name in set(flags.FLAGS) - before:
        delattr(flags.FLAGS, name)
    if not parsed:
        flags.FLAGS.unparse_flags()


def never(argv):
    pytest.fail("main ran despite a bad flag")


@pytest.fixture
def config_files(tmp_path):
    (tmp_path / "broken.py").write_text("def get_config(:\n    pass\n")
    (tmp_path / "raises.py").write_text("def get_config():\n    raise TypeError('boom')\n")
    (tmp_path / "imports.py").write_text("import no_such_module\n")
    return tmp_path


BAD_FLAGS = [  # arguments, the whole stderr line ({tmp}: config_files)
    (["--config=configs/nosuch.py"],
     "error: --config=configs/nosuch.py: no such file; allowed: a configs/<name>.py file"),
    (["--config", "configs/nosuch.py:smoke"],
     "error: --config=configs/nosuch.py:smoke: no such file; allowed: a configs/<name>.py file"),
    (["--config={tmp}/broken.py"],
     "error: --config={tmp}/broken.py: invalid syntax at line 1 of {tmp}/broken.py; allowed: "
     "a Python file defining get_config()"),
    (["--config={tmp}/raises.py"], "error: --config={tmp}/raises.py: cannot load (TypeError: "
     "boom)"),
    (["--config={tmp}/imports.py"], "error: --config={tmp}/imports.py: cannot load "
     "(ModuleNotFoundError: No module named 'no_such_module')"),
    (["--config=configs/tiny.py:nosuch"],
     "error: --config=configs/tiny.py:nosuch: unknown variant 'nosuch'; allowed: dense, smoke"),
    (["--config=configs/tiny.py", "--config.model.num_expert=4"],
     "error: unknown key model.num_expert; did you mean model.num_experts?"),
    (["--config=configs/tiny.py:smoke", "--config.trian.lr=0.1"],
     "error: unknown key trian.lr; did you mean train.lr?"),
    (["--config=configs/tiny.py", "--config.nosuch.a=1"],
     "error: unknown key nosuch.a; allowed: data.*, mesh.*, model.*, seed, train.*"),
    (["--config=configs/tiny.py", "--config.model.num_experts=x"],
     "error: flag --config.model.num_experts=x: invalid literal for int() with base 10: 'x'"),
    (["--config=configs/tiny.py", "--bogus=1"], "error: Unknown command line flag 'bogus'"),
    ([], "error: flag --config=None: Flag --config must have a value other than None."),
]


@pytest.mark.parametrize("args,error", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_train_flags_fail_in_one_line(argv, config_files, args, error):
    argv(*(a.format(tmp=config_files) for a in args), "--workdir=unused")
    with pytest.raises(SystemExit) as e:
        config_lib.run(never)
    assert e.value.code == error.format(tmp=config_files)  # sys.exit(str): stderr, exit 1


@pytest.mark.parametrize("args,error", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_plan_flags_fail_in_one_line(argv, config_files, args, error):
    argv(*(a.format(tmp=config_files) for a in args))
    with pytest.raises(SystemExit) as e:
        plan.main()
    assert e.value.code == error.format(tmp=config_files)


def test_good_flags_reach_main(argv):
    argv("--config=configs/tiny.py:smoke", "--config.model.num_experts=4", "--workdir=w")
    seen = {}
    config_lib.run(lambda argv: seen.update(experts=flags.FLAGS.config.model.num_experts))
    assert seen == {"experts": 4}


@pytest.mark.parametrize("module,flag,listed", [
    ("moejax.train", "--help", ["Train an MoE (or dense) language model.",
                                "python -m moejax.train --config", "--workdir:", "--config:",
                                "--coordinator:", "--config.KEY=VALUE"]),
    ("moejax.plan", "-h", ["Size a run before paying for it", "python -m moejax.plan --config",
                           "--mesh:", "--hbm_gib:", "--config:"]),
])
def test_help_prints_the_usage_and_exits_0(module, flag, listed):
    out = subprocess.run([sys.executable, "-m", module, flag], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    for text in listed:
        assert text in out.stdout, out.stdout
    assert "Nothing is allocated" not in out.stdout  # the summary, not the whole docstring
