"""Issue #20: bad input is one line naming the key, its value and what is allowed, and a nonzero
exit, before anything compiles; -h / --help print the usage and exit 0.

validate() and the flag parsing of cli.run, plan.main and the other entry points run
in-process (sys.argv monkeypatched, or argv given); --help runs as a real `python -m` process,
since the usage it prints comes from the module that runs as __main__, and so does one bad
input per entry point, to see stderr itself.
"""

import importlib
import os
import subprocess
import sys

import pytest
from absl import flags

from moejax import cli, config_lib
from moejax.plan.__main__ import main as plan_main
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
     "model.num_groups=6: must be a multiple of the 8 token shards (data x fsdp x expert x "
     "context) that divides the 512 tokens of a micro-batch (data.batch_size / train.grad_accum x "
     "data.seq_len); 0 = one per token shard"),
    ({"model.num_groups": 1024},
     "model.num_groups=1024: must be a multiple of the 8 token shards (data x fsdp x expert "
     "x context) that divides the 512 tokens of a micro-batch (data.batch_size / "
     "train.grad_accum x data.seq_len); 0 = one per token shard"),
    ({"model.num_groups": 512, "train.grad_accum": 2},
     "model.num_groups=512: must be a multiple of the 8 token shards (data x fsdp x expert "
     "x context) that divides the 256 tokens of a micro-batch (data.batch_size / "
     "train.grad_accum x data.seq_len); 0 = one per token shard"),
    ({"model.num_groups": -8},
     "model.num_groups=-8: must be a multiple of the 8 token shards (data x fsdp x expert "
     "x context) that divides the 512 tokens of a micro-batch (data.batch_size / "
     "train.grad_accum x data.seq_len); 0 = one per token shard"),
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
# Flags and config files, through cli.run (train) and plan.main.

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
     "error: flag --config.model.num_experts=x: invalid literal for int() with base 10: 'x'; "
     "allowed: an integer >= 0 (0 = dense)"),
    ([], "error: missing --config; allowed: configs/<name>.py[:variant]"),
]


@pytest.mark.parametrize("args,error", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_train_flags_fail_in_one_line(argv, config_files, args, error):
    argv(*(a.format(tmp=config_files) for a in args), "--workdir=unused")
    with pytest.raises(SystemExit) as e:
        cli.run(never)
    assert e.value.code == error.format(tmp=config_files)  # sys.exit(str): stderr, exit 1


@pytest.mark.parametrize("args,error", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_plan_flags_fail_in_one_line(argv, config_files, args, error):
    argv(*(a.format(tmp=config_files) for a in args))
    with pytest.raises(SystemExit) as e:
        plan_main()
    assert e.value.code == error.format(tmp=config_files)


@pytest.mark.parametrize("args,error", [
    (["--expert_load=w"], "error: --expert_load needs --target; allowed: h100, h200, b200, "
     "gb200, v5p, v6e, ironwood"),
    (["--expert_load={tmp}", "--target=h100"], "error: --expert_load='{tmp}': no expert load "
     "logged there; allowed: a run's workdir or its metrics.jsonl (train logs "
     "moe/layer_*/load)"),
    (["--expert_load=w", "--target=v5p", "--config.model.routing=balanced"], "error: "
     "--expert_load: model.routing='balanced' is balanced by construction; allowed: "
     "model.routing='tokens' (the router's own choice)")])
def test_plan_expert_load_fails_in_one_line_before_compiling(argv, config_files, args, error):
    argv("--config=configs/tiny.py", *(a.format(tmp=config_files) for a in args))
    with pytest.raises(SystemExit) as e:
        plan_main()
    assert e.value.code == error.format(tmp=config_files)


def test_plan_prices_the_load_a_run_logged(argv, tmp_path, capsys):
    """plan --target --expert_load end to end, in-process on conftest's 8 devices: a log in
    train's format whose layer 1 sends half its assignments to experts 0 and 1 (rank 0 of 4
    ranks of 2 experts: 2x the mean rank) and layer 3 spreads them evenly (1x): 1.5x."""
    import numpy as np

    from moejax.run.metrics import Writer

    load = np.array([[1 / 4, 1 / 4] + [1 / 12] * 6, [1 / 8] * 8])
    w = Writer(str(tmp_path), 0)
    w.expert_load(50, [1, 3], load, np.zeros(2))
    w.close()
    argv("--config=configs/tiny.py:smoke", "--mesh=data=1,fsdp=2,expert=4", "--target=h100",
         "--config.model.dispatch=dropless", f"--expert_load={tmp_path}")
    plan_main()
    out = capsys.readouterr().out
    assert ("routing as logged at step 50 (2 MoE layers): the busiest of 4 expert ranks takes "
            "1.50x the mean rank's assignments, and every rank waits for it: +") in out, out


@pytest.mark.parametrize("entry,allowed", [
    ("train", "--config, --workdir, --coordinator, --num_processes, --process_id, "
              "--heartbeat_timeout_s"),
    ("plan", "--config, --mesh, --hbm_gib, --devices_per_host, --target, --search, "
             "--expert_load")])
def test_an_unknown_flag_names_the_entry_points_own(argv, entry, allowed):
    argv("--config=configs/tiny.py", "--workdr=w")
    with pytest.raises(SystemExit) as e:
        cli.run(never) if entry == "train" else plan_main()
    close = "did you mean --workdir? " if entry == "train" else ""
    assert e.value.code == (f"error: unknown flag --workdr; {close}allowed: {allowed}, "
                            "--config.KEY=VALUE")  # not absl's own (--log_dir, ...)


def test_good_flags_reach_main(argv):
    argv("--config=configs/tiny.py:smoke", "--config.model.num_experts=4", "--workdir=w")
    seen = {}
    cli.run(lambda argv: seen.update(experts=flags.FLAGS.config.model.num_experts))
    assert seen == {"experts": 4}


# ---------------------------------------------------------------------------------------------
# Every entry point: --help, and bad input as one line (generate, convert, bench, scaling).

HELP = [  # module, the help flag, texts the usage holds
    ("moejax.train", "--help", ["Train an MoE (or dense) language model.",
                                "python -m moejax.train --config", "--workdir:", "--config:",
                                "--coordinator:", "--config.KEY=VALUE"]),
    ("moejax.plan", "-h", ["Size a run before paying for it", "python -m moejax.plan --config",
                           "--mesh:", "--hbm_gib:", "--config:"]),
    ("moejax.generate", "--help", ["Generate text from the newest checkpoint",
                                   "python -m moejax.generate --workdir", "--workdir:",
                                   "--prompt:", "--tokens:", "--top_p:", "--hf_tokenizer:"]),
    ("moejax.convert", "--help", ["Weights in from and out to Hugging Face",
                                  "python -m moejax.convert from-hf SRC --workdir DIR",
                                  "python -m moejax.convert to-hf OUT --workdir DIR",
                                  "--workdir:", "--mesh:", "--dtype:", "--shard_gib:"]),
    ("moejax.bench", "-h", ["Benchmarks of the MoE layer",
                            "python -m moejax.bench layer|train|compile", "--experts:",
                            "--dispatch:", "--config:", "--layers:", "--config.KEY=VALUE"]),
    ("moejax.data", "--help", ["Tokenize a corpus once, in parallel",
                               "python -m moejax.data prepare --config", "--out:",
                               "--num_proc:", "--config:"]),
    ("moejax.quant_check", "-h", ["What weight-only int8 / int4 experts cost",
                                  "python -m moejax.quant_check --workdir", "--workdir:",
                                  "--batches:", "--prompts:", "--tokens:"]),
    ("moejax.scaling", "--help", ["Switch Transformer's scaling result",
                                  "python -m moejax.scaling --config configs/switch_scaling.py",
                                  "--variants:", "--out:", "--workdir:", "--config:"]),
]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


# Asked as processes, as a user types them: train and plan (they define absl's global flags)
# and quant_check (no other test runs its `python -m`). The others parse their own flags and
# are asked in-process; their `python -m` runs in other tests (generate, convert, bench and
# scaling below, data in tests/test_store.py).
AS_PROCESS = ("moejax.train", "moejax.plan", "moejax.quant_check")


@pytest.mark.parametrize("module,flag,listed", HELP, ids=[m for m, _, _ in HELP])
def test_help_prints_the_usage_and_exits_0(module, flag, listed, capsys):
    if module in AS_PROCESS:
        out = subprocess.run([sys.executable, "-m", module, flag], cwd=REPO,
                             capture_output=True, text=True, timeout=120, env=ENV)
        assert out.returncode == 0, out.stderr[-3000:]
        stdout = out.stdout
    else:
        main = importlib.import_module(module + (".__main__" if module == "moejax.data"
                                                 else "")).main
        with pytest.raises(SystemExit) as e:
            main([module, flag])
        assert e.value.code in (0, None)
        stdout = capsys.readouterr().out
    for text in listed:
        assert text in stdout, stdout
    assert "\n\n\n" not in stdout and "Nothing is allocated" not in stdout  # the summary


ALLOWED_GENERATE = ("--workdir, --prompt, --tokens, --temperature, --top_p, --seed, "
                    "--hf_tokenizer, --quantize, --routing_out")
ALLOWED_LAYER = ("--experts, --tokens, --d_model, --d_ff, --top_k, --capacity_factor, --dtype, "
                 "--dispatch, --repeats")
BAD_INPUTS = [  # module, arguments, the whole message (what stderr shows); {tmp}: tmp_path
    ("generate", [], "missing --workdir; allowed: a run's directory (train or convert from-hf)"),
    ("generate", ["--workdir=w", "--bogus=1"],
     f"unknown flag --bogus; allowed: {ALLOWED_GENERATE}"),
    ("generate", ["--workdir=w", "--tokens=0"], "flag --tokens=0: 0 is not a positive integer"),
    ("generate", ["--workdir", "w", "--tokens", "-3"],
     "flag --tokens=-3: -3 is not a positive integer"),
    ("generate", ["--workdir=w", "--top_p=0"], "flag --top_p=0.0: must be in (0, 1]"),
    ("generate", ["--workdir=w", "--top_p=1.5"], "flag --top_p=1.5: must be in (0, 1]"),
    ("generate", ["--workdir=w", "--temperature=-1"],
     "flag --temperature=-1.0: must be a finite number >= 0 (0 = greedy)"),
    ("generate", ["--workdir=w", "hello"], "'hello': unexpected argument; allowed: flags only"),
    ("generate", ["--workdir={tmp}"], "--workdir='{tmp}': no config.json in it; allowed: the "
     "workdir of a run (train) or of a conversion (convert from-hf)"),
    ("convert", [], "missing --workdir; allowed: from-hf: the run to create; to-hf: the run to "
     "read"),
    ("convert", ["--workdir=w"], "missing COMMAND; allowed: from-hf, to-hf"),
    ("convert", ["export", "--workdir=w"], "COMMAND='export': unknown; allowed: from-hf, to-hf"),
    ("convert", ["from-hf", "--workdir=w"], "missing SRC; allowed: a local folder with "
     "config.json + *.safetensors, or a hub name like org/model"),
    ("convert", ["to-hf", "--workdir=w"],
     "missing OUT; allowed: the folder to write the transformers checkpoint into"),
    ("convert", ["from-hf", "a", "b", "--workdir=w"],
     "'b': unexpected argument; allowed: COMMAND SRC"),
    ("convert", ["to-hf", "out", "--workdir=w", "--mesh=fsdp=8"],
     "--mesh: not a flag of to-hf; allowed: --workdir, --dtype, --shard_gib, --quantize, "
     "--overwrite"),
    ("convert", ["from-hf", "src", "--workdir=w", "--dtype=bfloat16"],
     "--dtype: not a flag of from-hf; allowed: --workdir, --mesh"),
    ("convert", ["to-hf", "out", "--workdir=w", "--dtype=int8"],
     "flag --dtype=int8: value should be one of <float32|bfloat16|float16>"),
    ("convert", ["to-hf", "out", "--workdir=w", "--shard_gib=0"],
     "flag --shard_gib=0.0: must be finite and > 0 (GiB per file)"),
    ("convert", ["from-hf", "src", "--workdir=w", "--bogus"],
     "unknown flag --bogus; allowed: --workdir, --mesh, --dtype, --shard_gib, --quantize, "
     "--overwrite"),
    ("bench", [], "missing MODE; allowed: layer, train, compile"),
    ("bench", ["sweep"], "MODE='sweep': unknown; allowed: layer, train, compile"),
    ("bench", ["layer", "--experts=8,x"],
     "flag --experts=8,x: allowed: comma-separated integers >= 1, e.g. 8,64"),
    ("bench", ["layer", "--experts", "8", "64"], "'64': unexpected argument; allowed: MODE"),
    ("bench", ["layer", "--dispatch=capacity,sorted"], "flag --dispatch=capacity,sorted: "
     "allowed: comma-separated of capacity, dropless, dropless_ring"),
    ("bench", ["layer", "--repeats=0"], "flag --repeats=0: 0 is not a positive integer"),
    ("bench", ["layer", "--bogus=1"], "unknown flag --bogus; allowed: --experts, --tokens, "
     "--d_model, --d_ff, --top_k, --capacity_factor, --dtype, --dispatch, --routing, --repeats, "
     "--config, --vocab_size, --batch_size, --seq_len, --layers, --config.KEY=VALUE"),
    ("bench", ["layer", "--config.model.num_experts=4"],
     f"--config.model.num_experts: not a flag of layer; allowed: {ALLOWED_LAYER}"),
    ("bench", ["train", "--layers=4"], "--layers: not a flag of train; allowed: --config, "
     "--vocab_size, --batch_size, --seq_len, --dispatch, --routing, --repeats"),
    ("bench", ["train", "--config=configs/nosuch.py"],
     "--config=configs/nosuch.py: no such file; allowed: a configs/<name>.py file"),
    ("bench", ["compile", "--config.model.num_expert=4"],  # on the default configs/tiny.py
     "unknown key model.num_expert; did you mean model.num_experts?"),
    ("scaling", [], "missing --config; allowed: configs/switch_scaling.py[:variant]; a variant, "
     "e.g. :smoke, goes after each of --variants (e4 -> e4,smoke)"),
    ("scaling", ["--config=configs/switch_scaling.py", "--variants=dense,e3"],
     "--variants=dense,e3: unknown variant 'e3'; allowed: dense, e2, e4, e8, e16"),
    ("scaling", ["--config=configs/switch_scaling.py:smoke", "--variants=e3"],
     "--variants=e3 (each ,smoke from --config): unknown variant 'e3'; allowed: dense, e2"),
    ("scaling", ["--config=configs/switch_scaling.py", "--config.train.stepz=1"],
     "unknown key train.stepz; did you mean train.steps?"),
    ("scaling", ["--config=configs/switch_scaling.py", "--bogus"], "unknown flag --bogus; "
     "allowed: --config, --variants, --out, --workdir, --config.KEY=VALUE"),
    ("scaling", ["--config=configs/switch_scaling.py", "extra"],
     "'extra': unexpected argument; allowed: flags only"),
    ("scaling", ["--config=configs/nosuch.py"],
     "--config=configs/nosuch.py: no such file; allowed: a configs/<name>.py file"),
]


def matches(message: str, want: str) -> bool:
    """The whole message; a want naming a config's variants may stop after the first few."""
    return message == want or ("unknown variant" in want and message.startswith(want))


@pytest.mark.parametrize("module,args,error", BAD_INPUTS,
                         ids=[f"{m} {' '.join(a)}" for m, a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_flag(monkeypatch, tmp_path, module, args, error):
    """In this process (a subprocess costs seconds of importing jax; one per module runs as a
    process below): main exits with the line that Python prints to stderr, exit code 1."""
    main = importlib.import_module(f"moejax.{module}").main
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        main([module, *(a.format(tmp=tmp_path) for a in args)])
    message = e.value.code
    assert isinstance(message, str) and "\n" not in message, message
    assert matches(message, "error: " + error.format(tmp=tmp_path)), message


PROCESSES = [("generate", ["--workdir=w", "--top_p=1.5"]), ("convert", ["export", "--workdir=w"]),
             ("bench", ["layer", "--experts=8,x"]),
             ("scaling", ["--config=configs/switch_scaling.py", "--config.train.stepz=1"])]


@pytest.mark.parametrize("module,args", PROCESSES, ids=[m for m, _ in PROCESSES])
def test_bad_input_as_a_process_prints_one_line_and_no_traceback(module, args):
    error = next(e for m, a, e in BAD_INPUTS if (m, a) == (module, args))
    out = subprocess.run([sys.executable, "-m", f"moejax.{module}", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env=ENV)
    assert out.returncode != 0 and out.stdout == "", out
    assert out.stderr.splitlines() == [f"error: {error}"], out.stderr
