"""Issue #5: preemption, broken checkpoints, non-finite steps and bad input never lose work.

Fast tests call the pieces directly; `slow` ones drive real `python -m moejax.train`
processes: SIGTERM mid-run (one process and two), SIGKILL mid-save, a damaged checkpoint.
"""

import functools
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import huggingface_hub.constants
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config_lib, parallel, train
from moejax.data import text
from moejax.data.batches import make_batches
from moejax.model.transformer import Transformer
from moejax.run import state
from moejax.run.checkpoint import Checkpoints
from tests.test_multihost import losses, run, start, wait
from tests.test_train import smoke

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Config validation: one line naming the key, its value and what is allowed, before compiling.

@pytest.fixture
def files(tmp_path):
    """A few small inputs: text too short for one batch, a non-UTF-8 file, a plain file."""
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "a.txt").write_text("too short for one sequence")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "good.txt").write_text("def f(x):\n    return x\n" * 200)
    (tmp_path / "mixed" / "latin1.txt").write_bytes(b"caf\xe9 au lait\n" * 50)
    (tmp_path / "a_file").write_text("")
    return tmp_path


INVALID = [  # overrides, then the start of the one-line error
    ({"mesh.expert": 3}, "model.num_experts=8: must be a multiple of mesh.expert=3"),
    ({"mesh.data": 4, "mesh.expert": 4},
     "mesh='data=4 x fsdp=1 x expert=4 x context=1 x tensor=1': needs 16 devices; allowed: at "
     "most the 8 that exist"),
    ({"mesh.fsdp": -1}, "mesh='data=-1, fsdp=-1, expert=1, context=1, tensor=1': allowed: at "
     "most one axis -1"),
    ({"mesh.tensor": 0}, "mesh.tensor=0: must be >= 1, or -1 for all remaining devices"),
    ({"model.remat": "some"}, "model.remat='some': unknown; allowed: none, full, matmuls, offload"),
    ({"model.num_kv_heads": 3}, "model.num_kv_heads=3: must be a divisor of num_heads=2"),
    ({"mesh.expert": 0}, "mesh.expert=0: must be >= 1, or -1 for all remaining devices"),
    ({"model.top_k": 9}, "model.top_k=9: must be in 1..num_experts=8"),
    ({"model.top_k": 0}, "model.top_k=0: must be in 1..num_experts=8"),
    ({"model.capacity_factor": 0.0}, "model.capacity_factor=0.0: must be > 0"),
    ({"model.capacity_factor": -1.25}, "model.capacity_factor=-1.25: must be > 0"),
    ({"model.eval_capacity_factor": 0.0}, "model.eval_capacity_factor=0.0: must be > 0"),
    ({"model.num_experts": -2}, "model.num_experts=-2: must be >= 0 (0 = dense)"),
    ({"data.batch_size": 12},
     "data.batch_size=12: must be a multiple of data x fsdp x expert x grad_accum = 8 x 1"),
    ({"train.grad_accum": 4}, "data.batch_size=16: must be a multiple of data x fsdp x expert x "
     "grad_accum = 8 x 4"),
    ({"model.activation": "swish"},
     "model.activation='swish': unknown; allowed: swiglu, geglu, clamped_swiglu, gelu, relu"),
    ({"model.dtype": "float16"}, "model.dtype='float16': unknown; allowed: float32, bfloat16"),
    ({"model.head_dim": 15}, "model.head_dim=15: must be even (rotary pairs)"),
    ({"data.seq_len": 4096}, "data.seq_len=4096: must be in 1..model.max_seq_len=2048"),
    ({"data.source": "s3"}, "data.source='s3': unknown; allowed: stdlib, files, hub"),
    ({"data.source": "files", "data.path": "{tmp}/missing/*.txt"},
     "data.path='{tmp}/missing/*.txt': no file matches; allowed: a glob of local files"),
    ({"data.source": "files", "data.path": "{tmp}/mixed/*.txt", "data.format": "csv"},
     "data.format='csv': unknown; allowed: text, json, parquet"),
    ({"data.source": "hub", "data.path": ""},
     "data.path='': empty; allowed: a Hugging Face dataset name"),
    ({"data.on_error": "ignore"}, "data.on_error='ignore': unknown; allowed: skip, fail"),
    ({"train.schedule": "linear"}, "train.schedule='linear': unknown; allowed: cosine, rsqrt"),
    ({"train.max_nonfinite_steps": 0}, "train.max_nonfinite_steps=0: must be >= 1"),
    ({"train.ckpt_every": 0}, "train.ckpt_every=0: must be >= 1"),
    ({"train.warmup_steps": 6}, "train.warmup_steps=6: must be in 0..train.steps-1=5"),
    ({"model.router_score": "tanh"},
     "model.router_score='tanh': unknown; allowed: softmax, sigmoid"),
    ({"model.routing": "hash"},
     "model.routing='hash': unknown; allowed: tokens, experts, balanced"),
    ({"model.bias_rate": -0.1}, "model.bias_rate=-0.1: must be >= 0"),
    ({"model.dispatch": "dropless", "model.routing": "experts"},
     "model.dispatch='dropless': allowed with model.routing=experts: capacity"),
    ({"model.dispatch": "ragged"},
     "model.dispatch='ragged': unknown; allowed: capacity, dropless, dropless_ring"),
    ({"train.collapse_threshold": 1.5}, "train.collapse_threshold=1.5: must be in [0, 1)"),
    ({"data.tokenizer": "btye"}, "data.tokenizer='btye': cannot load ("),
    ({"data.tokenizer": "{tmp}/a_file"}, "data.tokenizer='{tmp}/a_file': cannot load ("),
    ({"data.source": "files", "data.path": "{tmp}/short/*.txt"},
     "data.path='{tmp}/short/*.txt': the train split holds 0 sequences of data.seq_len + 1 = "
     "33 tokens; allowed: at least data.batch_size=16"),
    ({"data.source": "files", "data.path": "{tmp}/mixed/*.txt", "data.on_error": "fail"},
     "data.on_error='fail': {tmp}/mixed/latin1.txt: not UTF-8: invalid continuation byte; "
     "allowed: readable UTF-8 files, or data.on_error='skip'"),
    ({"workdir": "{tmp}/a_file/run"}, "--workdir='{tmp}/a_file/run': not writable (Not a "
     "directory); allowed: a directory this user can create and write"),
]


def checks_before_compiling(config, workdir):
    """What train_and_evaluate checks, in its order, before it builds the model."""
    config_lib.validate(config, jax.device_count())
    config_lib.check_workdir(workdir)
    tokenizer = text.make_tokenizer(config.data.tokenizer)
    make_batches(config.data, tokenizer, "train", config.seed)


@pytest.mark.parametrize("overrides,error", INVALID,
                         ids=["+".join(f"{k}={v}" for k, v in o.items()) for o, _ in INVALID])
def test_invalid_config_is_one_line_naming_the_key(files, monkeypatch, overrides, error):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network
    overrides = {k: v.format(tmp=files) if isinstance(v, str) else v
                 for k, v in overrides.items()}
    workdir = overrides.pop("workdir", str(files / "run"))
    config = smoke(**{"data.eval_fraction": 0.0, **overrides})
    with pytest.raises(config_lib.ConfigError) as e:
        checks_before_compiling(config, workdir)
    message = str(e.value)
    assert message.startswith(error.format(tmp=files)), message
    assert "\n" not in message and ("allowed" in message or "must be" in message)


@pytest.fixture(scope="module")
def eight_experts(tmp_path_factory):
    """A workdir holding a checkpoint of a fresh smoke model (8 experts; nothing compiled)."""
    workdir = tmp_path_factory.mktemp("eight_experts")
    config = smoke(**{"model.vocab_size": 257})
    params = nnx.state(Transformer(config.model, mesh=None, rngs=nnx.Rngs(0)))
    ckpt = Checkpoints(str(workdir), 2, False)
    ckpt.save(6, {"params": params, "opt_state": ()}, {"step": 6})
    ckpt.close()
    return workdir


def test_resuming_a_different_model_names_the_param(eight_experts):
    config = smoke(**{"model.vocab_size": 257, "model.num_experts": 4})
    abstract = nnx.state(nnx.eval_shape(lambda: Transformer(config.model, mesh=None,
                                                            rngs=nnx.Rngs(0))))
    with pytest.raises(config_lib.ConfigError) as e:
        Checkpoints(str(eight_experts), 2, False).check_shapes(abstract)
    assert str(e.value) == (
        f"model: stacks.0.blocks.0.ffn.router: checkpoint (2, 32, 8) vs config (2, 32, 4) in "
        f"{eight_experts}/checkpoints/6; allowed: the model config the run started with, or a "
        "new --workdir")


def run_cli(workdir, *args, env=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "moejax.train", "--config",
                           "configs/tiny.py:smoke", "--workdir", str(workdir), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("args,error", [
    (["--config.model.top_k=0"], "error: model.top_k=0: must be in 1..num_experts=8"),
    (["--config.model.num_experts=4"], "error: model: stacks.0.blocks.0.ffn.router: "
     "checkpoint (2, 32, 8) vs config (2, 32, 4)"),
])
def test_cli_prints_one_line_and_compiles_nothing(eight_experts, args, error):
    # JAX_LOG_COMPILES has jax log each trace and compilation as `WARNING:jax...` lines.
    out = run_cli(eight_experts, *args, env={"JAX_LOG_COMPILES": "1"})
    assert out.returncode != 0
    assert "Compiling" not in out.stderr and "compilation" not in out.stderr, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if not ln.startswith("WARNING:jax")]
    assert len(lines) == 1 and lines[0].startswith(error), out.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Data errors: unreadable or non-UTF-8 files are skipped and counted, or stop the run.

def test_bad_files_are_skipped_and_counted(files, caplog):
    os.symlink(files / "nowhere.txt", files / "mixed" / "dangling.txt")
    cfg = smoke(**{"data.source": "files", "data.path": str(files / "mixed" / "*.txt"),
                   "data.eval_fraction": 0.0}).data
    with caplog.at_level(logging.WARNING):
        docs = text.load_documents(cfg, "train")
    assert docs == [(files / "mixed" / "good.txt").read_text()]
    assert (f"data: skipped 2 of 3 files: {files}/mixed/dangling.txt (No such file or "
            f"directory); {files}/mixed/latin1.txt (not UTF-8: invalid continuation byte)"
            ) in caplog.text


# ---------------------------------------------------------------------------------------------
# Broken checkpoints: detected on restore, set aside with a warning, older one used.

def toy_state(x: float):
    return {"params": {"w": jnp.full((32, 32), x), "b": jnp.arange(3.0) + x},
            "opt_state": (jnp.int32(x),)}


def damage(path, how):
    if how == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        os.remove(path)


def largest_file(root):
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("how,name", [
    ("truncate", None), ("delete", None),  # None: the largest file, the array data
    ("truncate", "state/_METADATA"), ("delete", "state/manifest.ocdbt"),
    ("delete", "meta/metadata"),
])
def test_damaged_checkpoint_falls_back_to_the_older_one(tmp_path, caplog, how, name):
    ckpt = Checkpoints(str(tmp_path), 2, False)
    for step in (3, 6):
        ckpt.save(step, toy_state(step), {"step": step})
    ckpt.close()
    newest = tmp_path / "checkpoints" / "6"
    damage(largest_file(newest) if name is None else newest / name, how)

    ckpt = Checkpoints(str(tmp_path), 2, False)
    with caplog.at_level(logging.WARNING):
        state, meta = ckpt.restore_latest(toy_state(0))
    assert meta == {"step": 3}
    jax.tree.map(np.testing.assert_array_equal, state, toy_state(3))
    assert f"checkpoint {newest} does not restore (" in caplog.text
    assert f"): skipped, moved to {newest}.broken-" in caplog.text
    # The broken one is kept for a post-mortem but out of the way: step 6 can be saved again,
    # and the rotation then drops 3 only once 9 is complete.
    assert [p.name.split("-")[0] for p in tmp_path.joinpath("checkpoints").iterdir()
            if "broken" in p.name] == ["6.broken"]
    for step in (6, 9):
        ckpt.save(step, toy_state(step), {"step": step})
    ckpt.close()
    assert Checkpoints(str(tmp_path), 2, False).latest.all_steps() == [6, 9]


def test_half_written_checkpoint_is_reported_and_skipped(tmp_path, caplog):
    ckpt = Checkpoints(str(tmp_path), 2, False)
    ckpt.save(3, toy_state(3), {"step": 3})
    ckpt.close()
    # What a process killed mid-save leaves: orbax's temporary directory, never renamed.
    half = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "checkpoints" / "3", half)
    damage(largest_file(half), "truncate")

    ckpt = Checkpoints(str(tmp_path), 2, False)
    with caplog.at_level(logging.WARNING):
        _, meta = ckpt.restore_latest(toy_state(0))
    assert meta == {"step": 3}
    assert (f"checkpoint {half} is half-written (the run stopped while saving it): skipped"
            in caplog.text)
    ckpt.save(6, toy_state(6), {"step": 6})  # replaces the temporary directory
    ckpt.close()
    assert not half.exists()
    assert Checkpoints(str(tmp_path), 2, False).restore_latest(toy_state(0))[1] == {"step": 6}


def test_no_checkpoint_restores_none(tmp_path):
    assert Checkpoints(str(tmp_path), 2, False).restore_latest(toy_state(0)) is None


# ---------------------------------------------------------------------------------------------
# Non-finite loss or gradients: the step changes nothing, is counted, and too many stop the run.

def test_nonfinite_step_changes_nothing(monkeypatch):
    config = smoke(**{"model.vocab_size": 257, "model.num_experts": 0})  # compiles faster
    setup = state.setup(config, parallel.make_mesh({}))
    train_state = state.init(setup)

    def step_fn():  # a new jit traces again, so it sees the loss_fn of the moment
        return jax.jit(functools.partial(state.train_step, graphdef=setup.graphdef, tx=setup.tx,
                                         lr=setup.lr, config=config))

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                        strict=True))

    tokens = jax.random.randint(jax.random.key(0), (16, 33), 0, 257)
    step, train_step = 3, step_fn()
    after, m = train_step(train_state, tokens, step)
    assert not m["skipped"] and not same(after, train_state)

    # Token ids past the vocabulary: the label logits read as NaN, so the loss is NaN.
    after, m = train_step(train_state, tokens + 1000, step)
    assert m["skipped"] and not np.isfinite(m["loss"]) and same(after, train_state)

    # A finite loss whose gradient is NaN: d/dw sqrt(0 * w) = inf * 0.
    real = state.loss_fn

    def nan_grads(params, *args, **kwargs):
        loss, metrics = real(params, *args, **kwargs)
        return loss + jnp.sqrt(0.0 * jax.tree.leaves(params)[0].sum()), metrics

    monkeypatch.setattr(state, "loss_fn", nan_grads)
    after, m = step_fn()(train_state, tokens, step)
    assert m["skipped"] and np.isfinite(m["loss"]) and not np.isfinite(m["grad_norm"])
    assert same(after, train_state)


def poison(monkeypatch, steps):
    """Make training steps `steps` (1-based) read token ids past the vocabulary."""
    def poisoned(cfg, tokenizer, split, seed, model=None):
        batches = make_batches(cfg, tokenizer, split, seed, model)
        if split == "train":  # row p is in batch p // batch_size, which step p // B + 1 takes
            batches.rows = batches.rows.map_with_index(
                lambda p, row: row + (1000 if p // cfg.batch_size + 1 in steps else 0))
        return batches

    monkeypatch.setattr(train, "make_batches", poisoned)


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch, capsys):
    poison(monkeypatch, {2, 4, 5})
    config = smoke(**{"mesh.data": 1, "train.max_nonfinite_steps": 2, "train.log_every": 1,
                      "train.eval_every": 100, "train.eval_batches": 1,
                      "train.keep_best": False})
    with pytest.raises(train.NonFiniteError) as e:
        train.train_and_evaluate(config, str(tmp_path))
    assert str(e.value) == (
        "train.max_nonfinite_steps=2: steps 4..5 all had a non-finite loss or gradients (first "
        "non-finite: the loss, with every parameter finite); the last good state is checkpoint "
        f"3 in {tmp_path}")
    out = capsys.readouterr().out
    assert ("step 2: non-finite loss or gradients, skipped (1 in a row); first non-finite: the "
            "loss, with every parameter finite") in out
    assert "step 5: non-finite loss or gradients, skipped (2 in a row)" in out
    ckpt = Checkpoints(str(tmp_path), 2, False)
    assert ckpt.latest.all_steps() == [3]  # nothing saved after the last good step
    params = ckpt.latest.restore(3).state["params"]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------------------------
# Preemption: SIGTERM finishes the step, saves, exits 0; the relaunch picks up exactly there.

LONG = ["--config.train.steps=500", "--config.train.log_every=10",
        "--config.train.eval_every=1000", "--config.train.ckpt_every=1000"]


def wait_until(ready, proc, what, timeout=300):
    """Poll ready() while proc runs; fail if it ends first or `what` takes over timeout s."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended early"
        assert time.time() < deadline, f"{what} never happened"
        time.sleep(0.2)


def wait_for(log, text, proc, timeout=300):
    def appeared():
        log.seek(0)
        return text in log.read()
    wait_until(appeared, proc, f"{text!r} in the log", timeout)


def preempt(procs, victim, after="step 20/"):
    """SIGTERM one process once process 0 logs `after`; every process must exit 0."""
    wait_for(procs[0][1], after, procs[0][0])
    procs[victim][0].send_signal(signal.SIGTERM)
    outs = [wait(p, 300) for p in procs]
    for (p, _), out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outs


@pytest.mark.slow
def test_sigterm_saves_and_the_relaunch_matches_an_uninterrupted_run(tmp_path):
    run(tmp_path / "straight", 1, *LONG)
    out = preempt(start(tmp_path / "cut", 1, *LONG), 0)[0]
    (line,) = [ln for ln in out.splitlines() if ln.startswith("preempted:")]
    saved = int(line.split()[3])
    assert line == (f"preempted: saved step {saved} in {tmp_path / 'cut'}; run the same "
                    "command again to resume")
    assert 20 <= saved < 500
    resumed = run(tmp_path / "cut", 1, *LONG)[0]
    assert f"resumed from {tmp_path / 'cut'} at step {saved}" in resumed
    straight, cut = losses(tmp_path / "straight"), losses(tmp_path / "cut")
    assert cut[500] == straight[500]  # the same final loss, to the bit


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    extra = ["--config.train.steps=100000", "--config.train.log_every=10",
             "--config.train.eval_every=100000", "--config.train.ckpt_every=100000"]
    outs = preempt(start(tmp_path, 2, *extra), victim=1)
    (line,) = [ln for ln in outs[0].splitlines() if ln.startswith("preempted:")]
    saved = int(line.split()[3])
    assert (tmp_path / "checkpoints" / str(saved)).is_dir()
    outs = run(tmp_path, 2, "--config.train.steps=100000",
               f"--config.train.stop_at={saved + 2}")
    assert f"resumed from {tmp_path} at step {saved}" in outs[0]


def finalized_steps(workdir):
    """Steps whose save finished: orbax renames a step's temporary directory to its number."""
    path = workdir / "checkpoints"
    return [n for n in os.listdir(path) if n.isdigit()] if path.is_dir() else []


@pytest.mark.slow
def test_sigkill_while_saving_keeps_an_intact_checkpoint(tmp_path):
    # A save every step and only one kept: the one window where deleting the old checkpoint
    # too early would leave nothing.
    extra = ["--config.train.steps=100000", "--config.train.ckpt_every=1",
             "--config.train.keep_checkpoints=1", "--config.train.keep_best=false",
             "--config.train.eval_every=100000", "--config.train.log_every=1"]
    rng = random.Random(0)
    for _ in range(3):
        ((proc, log),) = start(tmp_path, 1, *extra)
        wait_for(log, "/100000 loss", proc)
        # The first run logs step 1 before saving it: kill only once a save has finished,
        # or "no checkpoint left" may mean none was ever made rather than one was lost.
        wait_until(lambda: finalized_steps(tmp_path), proc, "a finished save")
        time.sleep(rng.uniform(0.2, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert Checkpoints(str(tmp_path), 1, False).latest.all_steps(), "no checkpoint left"
    last = Checkpoints(str(tmp_path), 1, False).latest_step()
    out = run(tmp_path, 1, *extra, f"--config.train.stop_at={last + 2}")[0]
    assert f"resumed from {tmp_path} at step {last}" in out and "does not restore" not in out


@pytest.mark.slow
def test_damaged_newest_checkpoint_resumes_from_the_older_one(tmp_path):
    straight = train.train_and_evaluate(smoke(), str(tmp_path / "a"))["train_loss"]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    os.remove(tmp_path / "b" / "metrics.jsonl")
    damage(largest_file(tmp_path / "b" / "checkpoints" / "6"), "truncate")
    out = run_cli(tmp_path / "b")  # 8 devices, like this process
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"checkpoint {tmp_path}/b/checkpoints/6 does not restore (" in out.stderr
    assert f"resumed from {tmp_path / 'b'} at step 3" in out.stdout
    assert losses(tmp_path / "b")[6] == straight[6]
