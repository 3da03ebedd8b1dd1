"""Issue 31, class 2: every value checked before anything runs. Every numeric key of every
configs/*.py, given inf, nan, 0 and -1 on the command line, is refused in one line naming the
key, or allowed with a meaning written beside the key in configs/tiny.py; the issue's examples,
each with its whole line; plan's flags and train's mesh refused alike.

Everything runs in this process (cli.load parses `--config.KEY=VALUE` as train and plan do,
then validate): nothing compiles. One train process shows stderr itself.
"""

import glob
import importlib.util
import itertools
import os
import re
import subprocess
import sys

import ml_collections
import pytest
from absl import flags

from moejax import cli, config_lib
from moejax.plan.__main__ import main as plan_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = f"{REPO}/configs/tiny.py:smoke"  # 2 layers, 8 experts, batch 16 x 32 tokens
DEVICES = 8
BASE = ["--config.mesh.data=8"]  # not -1, so that any one other axis may be -1
VALUES = ("inf", "nan", "0", "-1")

# What each numeric key does with 0 and -1 where it allows them; inf and nan it never does.
# ("doc", PHRASE): allowed, and PHRASE is in the comment beside the key in configs/tiny.py.
# ("plain", WHY): allowed, an ordinary value of the key. Not listed: refused in one line.
EXPECT = {
    "seed": {0: ("plain", "a seed like any other")},
    "model.vocab_size": {0: ("doc", "0 = the tokenizer's vocabulary size")},
    "model.d_model": {},
    "model.num_layers": {},
    "model.num_heads": {},
    "model.num_kv_heads": {0: ("doc", "0 = num_heads")},
    "model.head_dim": {},
    "model.d_ff": {},
    "model.dense_d_ff": {0: ("doc", "0 = d_ff")},
    "model.rope_theta": {},  # 0 and below gave a NaN loss
    "model.rope_factor": {},  # 1 = none; below 1 YaRN would shrink the context
    "model.rope_original_max_len": {0: ("doc", "0 = max_seq_len")},
    "model.rope_beta_fast": {},  # its log bounds the ramp
    "model.rope_beta_slow": {},
    "model.rope_mscale": {0: ("doc", "0 = not given")},
    "model.rope_mscale_all_dim": {0: ("doc", "0 = off")},
    "model.norm_eps": {},
    "model.max_seq_len": {},
    "model.sliding_window": {0: ("doc", "0 = all (causal)")},
    "model.full_attention_every": {0: ("doc", "0 = none")},
    "model.swiglu_limit": {},
    "model.rope_fraction": {},
    "model.num_experts": {0: ("doc", "0 = dense")},
    "model.top_k": {},
    "model.moe_every": {},
    "model.first_dense_layers": {0: ("plain", "MoE from the first layer")},
    "model.capacity_factor": {},
    "model.eval_capacity_factor": {},
    "model.min_capacity": {0: ("doc", "0 = no floor")},
    "model.jitter_eps": {0: ("doc", "0 = off")},
    "model.num_groups": {0: ("doc", "0 = one per token shard")},
    "model.bias_rate": {0: ("doc", "0 = off")},
    "model.n_group": {},  # 1 = no group limit; 0 groups would hold no expert
    "model.topk_group": {},
    "model.routed_scaling_factor": {},  # 0 would zero every routed expert's output
    "model.num_shared_experts": {0: ("plain", "no shared experts")},
    "model.q_lora_rank": {0: ("doc", "0 = a full-rank query")},
    # unused with attention=gqa, tiny's: 0 there is any value (mla refuses it: test_mla.py)
    "model.kv_lora_rank": {0: ("plain", "unused by grouped-query attention")},
    "model.qk_nope_head_dim": {0: ("plain", "unused by grouped-query attention")},
    "model.qk_rope_head_dim": {0: ("plain", "unused by grouped-query attention")},
    "model.v_head_dim": {0: ("plain", "unused by grouped-query attention")},
    "model.mtp_layers": {0: ("doc", "0 = none")},
    "mesh.data": {-1: ("doc", "-1: all remaining devices")},
    "mesh.fsdp": {-1: ("doc", "-1: all remaining devices")},
    "mesh.expert": {-1: ("doc", "-1: all remaining devices")},
    "mesh.context": {-1: ("doc", "-1: all remaining devices")},
    "mesh.tensor": {-1: ("doc", "-1: all remaining devices")},
    "data.shuffle_buffer": {0: ("doc", "0: in order")},
    "data.eval_fraction": {0: ("doc", "0: none")},
    "data.seq_len": {},
    "data.batch_size": {},
    "train.steps": {},
    "train.stop_at": {0: ("doc", "0 = never")},
    "train.lr": {0: ("doc", "0 = a frozen run")},
    "train.warmup_steps": {0: ("doc", "0 = none")},
    "train.min_lr_ratio": {0: ("plain", "the cosine decays to 0")},
    "train.weight_decay": {0: ("doc", "0 = off")},
    "train.b1": {0: ("plain", "AdamW without momentum")},
    "train.b2": {0: ("plain", "no average of squared gradients")},
    "train.qk_clip": {0: ("doc", "0 = off")},
    "train.grad_clip": {},  # 0 would zero every update
    "train.grad_accum": {},
    "train.balance_coef": {0: ("doc", "0 = off")},
    "train.z_coef": {0: ("doc", "0 = off")},
    "train.mtp_coef": {0: ("doc", "0 = off")},
    "train.log_every": {},
    "train.eval_every": {},
    "train.eval_batches": {},
    "train.ckpt_every": {},
    "train.keep_checkpoints": {},
    "train.peak_tflops": {0: ("doc", "0 = look the device up")},
    "train.max_nonfinite_steps": {},
    "train.collapse_threshold": {0: ("doc", "0 = off")},
    "train.collapse_checks": {},
    "train.frozen_expert_steps": {0: ("doc", "0 = off")},
    "train.watchdog_factor": {0: ("doc", "0 = off")},
    "train.watchdog_timeout_s": {0: ("doc", "0 = never")},
}


def numeric_keys() -> set[str]:
    """The int and float keys (not bools) of every configs/*.py's default config."""
    keys = set()

    def walk(config, prefix=""):
        for name, value in config.items():
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, f"{prefix}{name}.")
            elif isinstance(value, int | float) and not isinstance(value, bool):
                keys.add(prefix + name)

    for path in glob.glob(os.path.join(REPO, "configs", "*.py")):
        spec = importlib.util.spec_from_file_location("config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        walk(module.get_config())
    walk(config_lib.defaults())
    return keys


def test_every_numeric_key_has_an_expectation():
    keys = numeric_keys()
    assert len(keys) > 40  # the walk found the keys
    assert not [f"key {k} has no expectation" for k in sorted(keys - set(EXPECT))]
    assert not [f"{k}: no such key" for k in sorted(set(EXPECT) - keys)]


def comment_of(key: str) -> str:
    """The line of `key` in configs/tiny.py with the comment lines right above it."""
    with open(os.path.join(REPO, "configs", "tiny.py")) as f:
        lines = f.read().splitlines()
    group, _, name = key.rpartition(".")
    start = next(i for i, line in enumerate(lines) if f"{group}=dict(" in line) if group else 0
    at = next(i for i in range(start, len(lines)) if re.search(rf"\b{name}=", lines[i]))
    above = itertools.takewhile(lambda line: line.strip().startswith("#"),
                                reversed(lines[:at]))
    return " ".join([*above, lines[at]])


@pytest.mark.parametrize("key,value", [(k, v) for k in EXPECT for v in VALUES],
                         ids=[f"{k}={v}" for k in EXPECT for v in VALUES])
def test_each_numeric_key_at_inf_nan_0_and_minus_1(key, value):
    expected = EXPECT[key].get(int(value)) if value in ("0", "-1") else None
    try:
        config_lib.validate(cli.load(SPEC, [*BASE, f"--config.{key}={value}"]), DEVICES)
    except config_lib.ConfigError as e:
        message = str(e)
        assert expected is None, f"{key}={value} is allowed ({expected[1]}), refused: {message}"
        assert "\n" not in message and message.startswith((f"{key}=", f"flag --config.{key}=")), (
            message)
        assert "must be" in message or "allowed:" in message, message  # the range, in words
        return
    assert expected is not None, f"{key}={value} was accepted"
    kind, meaning = expected
    if kind == "doc":
        assert meaning in comment_of(key), f"{key}={value}: {meaning!r} is not beside it"


# ---------------------------------------------------------------------------------------------
# The issue's examples, each refused by validate with its whole line.

FIRST_DENSE = "(the MoE layers come after the first dense ones)"
MOE_EVERY = "(MoE in every n-th layer after the first dense ones: a larger n leaves none)"
EXAMPLES = [  # overrides of the smoke config, the whole message
    (["model.norm_eps=inf"], "model.norm_eps=inf: must be finite and > 0"),
    (["model.rope_theta=0"], "model.rope_theta=0.0: must be > 0"),
    (["model.rope_theta=-10000"], "model.rope_theta=-10000.0: must be > 0"),
    (["train.balance_coef=-0.01"], "train.balance_coef=-0.01: must be >= 0 (0 = off)"),
    (["train.z_coef=-0.001"], "train.z_coef=-0.001: must be >= 0 (0 = off)"),
    (["model.first_dense_layers=2"],
     f"model.first_dense_layers=2: must be in 0..model.num_layers-1=1 {FIRST_DENSE}"),
    (["model.first_dense_layers=5"],
     f"model.first_dense_layers=5: must be in 0..model.num_layers-1=1 {FIRST_DENSE}"),
    (["model.capacity_factor=inf"], "model.capacity_factor=inf: must be finite and > 0"),
    (["model.eval_capacity_factor=inf"],
     "model.eval_capacity_factor=inf: must be finite and > 0"),
    (["seed=-1"], "seed=-1: must be in [0, 2**32)"),
    (["seed=4294967296"], "seed=4294967296: must be in [0, 2**32)"),
    (["model.moe_every=3"],
     f"model.moe_every=3: must be in 1..model.num_layers-first_dense_layers=2 {MOE_EVERY}"),
    (["model.moe_every=2", "model.first_dense_layers=1"],
     f"model.moe_every=2: must be in 1..model.num_layers-first_dense_layers=1 {MOE_EVERY}"),
    (["mesh.fsdp=-1"], "mesh='data=-1, fsdp=-1, expert=1, context=1, tensor=1': allowed: at most "
     "one axis -1 (all remaining devices)"),
]


@pytest.mark.parametrize("overrides,error", EXAMPLES, ids=["+".join(o) for o, _ in EXAMPLES])
def test_issue_examples_are_refused_in_one_line(overrides, error):
    config = cli.load(SPEC, [f"--config.{o}" for o in overrides])
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config, DEVICES)
    assert str(e.value) == error


@pytest.mark.parametrize("overrides", [["model.moe_every=2"], ["model.first_dense_layers=1"],
                                       ["model.num_experts=0", "model.moe_every=2"]],
                         ids=lambda o: "+".join(o))
def test_one_moe_layer_is_enough(overrides):
    config_lib.validate(cli.load(SPEC, [f"--config.{o}" for o in overrides]), DEVICES)


# ---------------------------------------------------------------------------------------------
# data.mixture: one store under two spellings.

@pytest.fixture
def stores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("code", "web"):
        (tmp_path / name).mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "code")
    return tmp_path


MIXTURE_FORM = ("comma-separated STORE_DIR:WEIGHT entries of distinct prepared stores, weights "
                "> 0 (normalised to sum 1), e.g. 'stores/code:0.3,stores/web:0.7'")


@pytest.mark.parametrize("mixture,twice,first", [
    ("code:0.5,./code:0.5", "./code", "code"),
    ("code:0.5,code/:0.5", "code/", "code"),
    ("code:0.5,web:0.2,alias:0.3", "alias", "code"),  # a symlink to it
    ("{tmp}/code:0.5,code:0.5", "code", "{tmp}/code"),  # absolute and relative
])
def test_one_store_named_twice_in_a_mixture_is_refused(stores, mixture, twice, first):
    mixture, first = mixture.format(tmp=stores), first.format(tmp=stores)
    config = cli.load(SPEC, ["--config.data.source=prepared", f"--config.data.mixture={mixture}"])
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config, DEVICES)
    real = os.path.realpath(stores / "code")
    assert str(e.value) == (f"data.mixture={mixture!r}: store {twice!r} appears twice (as "
                            f"{first!r}: both are {real}); allowed: {MIXTURE_FORM}")


def test_distinct_stores_make_a_mixture(stores):
    config = cli.load(SPEC, ["--config.data.source=prepared",
                             "--config.data.mixture=code:0.5,web:0.5"])
    config_lib.validate(config, DEVICES)


# ---------------------------------------------------------------------------------------------
# plan: its flags, and its mesh spelled and checked as train's.

@pytest.fixture
def argv(monkeypatch):
    """Set sys.argv for plan.main or cli.run, which define flags on absl's global FLAGS: they are
    removed afterwards, so that the next call can define them again (as tests/test_cli.py)."""
    monkeypatch.chdir(REPO)
    before, parsed = set(flags.FLAGS), flags.FLAGS.is_parsed()
    yield lambda *args: monkeypatch.setattr(sys, "argv", ["plan", *args])
    for name in set(flags.FLAGS) - before:
        delattr(flags.FLAGS, name)
    if not parsed:
        flags.FLAGS.unparse_flags()


MESH_FORM = ("comma-separated AXIS=SIZE, each of data, fsdp, expert, context, tensor at most "
             "once, sizes >= 1 and at most one -1 (all remaining devices), e.g. 'fsdp=8,expert=8'")
TWO_REST = ("mesh='data=-1, fsdp=-1, expert=1, context=1, tensor=1': allowed: at most one axis "
            "-1 (all remaining devices)")
PLAN_BAD = [  # arguments after --config=configs/tiny.py:smoke, the whole stderr line
    (["--config.mesh.fsdp=-1"], TWO_REST),  # as train says it (EXAMPLES)
    (["--mesh=fsdp=-1"], TWO_REST),  # the config's data=-1 and the flag's
    (["--mesh=data=1,fsdp=-1,expert=-1"], "mesh='data=1, fsdp=-1, expert=-1, context=1, tensor=1': "
     "allowed: at most one axis -1 (all remaining devices)"),
    (["--mesh=fsdp=2,fsdp=4"], f"--mesh='fsdp=2,fsdp=4': axis 'fsdp' named twice; allowed: "
     f"{MESH_FORM}"),
    (["--mesh=fsdp=0"], f"--mesh='fsdp=0': fsdp=0 is not >= 1 or -1; allowed: {MESH_FORM}"),
    (["--mesh=pipeline=2"], f"--mesh='pipeline=2': unknown axis 'pipeline'; allowed: "
     f"{MESH_FORM}"),
    (["--mesh=fsdp"], f"--mesh='fsdp': 'fsdp' is not AXIS=SIZE; allowed: {MESH_FORM}"),
    (["--config.mesh.tensor=0"], "mesh.tensor=0: must be >= 1, or -1 for all remaining devices"),
    (["--hbm_gib=0"], "--hbm_gib=0.0: must be > 0 (GiB of memory per device)"),
    (["--hbm_gib=-80"], "--hbm_gib=-80.0: must be > 0 (GiB of memory per device)"),
    (["--hbm_gib=inf"], "--hbm_gib=inf: must be finite and > 0 (GiB of memory per device)"),
    (["--hbm_gib=nan"], "--hbm_gib=nan: must be finite and > 0 (GiB of memory per device)"),
]


@pytest.mark.parametrize("args,error", PLAN_BAD, ids=[" ".join(a) for a, _ in PLAN_BAD])
def test_plan_refuses_in_one_line_before_compiling(argv, args, error):
    argv(f"--config={SPEC}", *args)
    with pytest.raises(SystemExit) as e:
        plan_main()
    assert e.value.code == f"error: {error}"


@pytest.mark.parametrize("args,error", [
    (["--num_processes=0"], "--num_processes=0: must be >= 1"),
    (["--num_processes=2", "--process_id=2"], "--process_id=2: must be in [0, 2)"),
    (["--process_id=-1"], "--process_id=-1: must be >= 0"),
], ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_train_process_flags_are_in_range(argv, args, error):
    argv(f"--config={SPEC}", "--workdir=unused", *args)
    with pytest.raises(SystemExit) as e:
        cli.run(lambda argv: pytest.fail("main ran despite a bad flag"))
    assert e.value.code == f"error: {error}"


def test_train_and_plan_refuse_a_mesh_with_the_same_line():
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(cli.load(SPEC, ["--config.mesh.fsdp=-1"]), DEVICES)
    assert str(e.value) == TWO_REST  # plan's line above


def test_plan_mesh_is_spelled_as_trains(argv, monkeypatch):
    """--mesh takes the config's spelling, a -1 included (1 in the planner, as the config's)."""
    assert config_lib.parse_mesh("fsdp=2, expert=-1") == {"fsdp": 2, "expert": -1}
    config_lib.validate(cli.load(SPEC, ["--config.mesh.data=1", "--config.mesh.fsdp=2",
                                        "--config.mesh.expert=-1"]), DEVICES)
    from moejax.plan import estimate

    for name in ("XLA_FLAGS", "JAX_PLATFORMS"):  # plan sets them; put them back afterwards
        monkeypatch.setenv(name, os.environ.get(name, ""))
    seen = {}

    def planned(config, mesh, fused_attention=False):
        seen.update(mesh)
        raise config_lib.ConfigError("planned")

    monkeypatch.setattr(estimate, "plan", planned)
    argv(f"--config={SPEC}", "--mesh=data=1,fsdp=2,expert=-1")
    with pytest.raises(SystemExit, match="^error: planned$"):
        plan_main()
    assert seen == {"data": 1, "fsdp": 2, "expert": 1, "context": 1, "tensor": 1}


# ---------------------------------------------------------------------------------------------
# As a process: one line on stderr, exit 1, and nothing written.

def test_train_process_prints_one_line_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "moejax.train", f"--config={SPEC}",
                          f"--workdir={workdir}", "--config.model.norm_eps=inf"], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 1 and out.stdout == "", out
    assert out.stderr.splitlines() == ["error: model.norm_eps=inf: must be finite and > 0"]
    assert not workdir.exists()
