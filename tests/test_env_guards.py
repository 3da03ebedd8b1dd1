"""Issue #31, classes 4-6: a failure of the environment (a full disk, an unwritable path, an
empty stream, a dense run asked for experts) is one line and loses nothing; `generate` reads a
run that is still training as `train` resumes it; a resume onto another mesh keeps the capacity
groups. And every numeric flag of generate and quant_check is checked (class 2)."""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from moejax import config_lib, generate as gen, parallel, quant_check, train
from moejax.data import loader, store
from moejax.data.__main__ import main as prepare_main
from moejax.hf import convert as hf
from moejax.run import checkpoint, state
from moejax.run.checkpoint import Checkpoints
from tests.test_checkpoint_guards import config, first_param, hashes, run, saved
from tests.test_reliability import REPO, toy_state

assert run and saved  # fixtures: a copy of a smoke run with checkpoints/3, /6, best/3

FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def one_line(call) -> str:
    """The one line a ConfigError or an entry point's SystemExit ends with."""
    with pytest.raises((SystemExit, config_lib.ConfigError)) as e:
        call()
    line = e.value.code if isinstance(e.value, SystemExit) else f"error: {e.value}"
    assert isinstance(line, str) and "\n" not in line, line
    return line


# ---------------------------------------------------------------------------------------------
# Class 4: a full disk while saving a checkpoint: one line, the newest intact one kept.

async def _full_json(self, x, directory):  # orbax's background writer of the meta item
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))


def _full_data(self, directory, args):  # our data-state item, written in the save call
    raise FULL


@pytest.mark.parametrize("where", ["orbax background write", "data state write"])
def test_a_full_disk_while_saving_keeps_the_newest_checkpoint(run, monkeypatch, where):
    before = hashes(run)
    if where == "orbax background write":
        monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", _full_json)
    else:
        monkeypatch.setattr(loader.DataState, "save", _full_data)
    ckpt = Checkpoints(str(run), 1, True)  # keeps 1: a save that completed would delete 3, 6

    def save_and_close():
        try:
            ckpt.save(9, toy_state(9), {"step": 9}, eval_loss=0.5, data={"next_index": 9})
        finally:
            ckpt.close()  # where an error of the background write shows, if not above

    assert one_line(save_and_close) == (
        f"error: --workdir={str(run)!r}: cannot save a checkpoint (no space left on the "
        f"device); the newest intact one is {run}/checkpoints/6; allowed: free space there (or "
        "a --workdir on a disk with room), then run the same command again to resume")
    monkeypatch.undo()
    after = hashes(run)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing good touched
    assert not [k for k in after if k not in before and "orbax-checkpoint-tmp" not in k]
    abstract = state.setup(config(), parallel.make_mesh({})).abstract
    restored, meta = Checkpoints(str(run), 2, True).restore_latest(abstract)
    assert meta["step"] == 6 and first_param(restored["params"]) == 6


# ---------------------------------------------------------------------------------------------
# Class 4: preparing a store: a full disk, an empty or unwritable --out, a hub without network.

def prepare(tmp_path, *args):
    docs = tmp_path / "docs.txt"
    docs.write_text("def f(x):\n    return x\n" * 40)
    return prepare_main(["data", "prepare", "--config=configs/tiny.py", "--num_proc=1",
                         "--config.data.source=files", f"--config.data.path={docs}",
                         "--config.data.eval_fraction=0.0", *args])


def full_tokens(real_open):
    """open() for store.py whose token files refuse every write, as on a full disk."""
    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.f.name)

        def close(self):
            self.f.close()

    return lambda path, mode="r", *a, **k: (
        Full(real_open(path, mode, *a, **k)) if str(path).endswith("tokens.bin")
        else real_open(path, mode, *a, **k))


@pytest.mark.parametrize("case", ["full disk", "--out=''", "--out=FILE/sub",
                                  "hub dataset, no network"])
def test_prepare_fails_in_one_line_and_presents_no_half_store(tmp_path, monkeypatch, case):
    monkeypatch.chdir(REPO)
    (tmp_path / "file").write_text("a file, not a folder\n")
    out, extra = str(tmp_path / "store"), []
    if case == "full disk":
        monkeypatch.setattr(store, "open", full_tokens(open), raising=False)
        want = (f"--out={out!r}: cannot write the store (No space left on device: "
                f"{out}/train/tokens.bin); left unfinished (its .incomplete marker says so: "
                "nothing trains from it); allowed: free space there (or another --out), then "
                "the same command again")
    elif case == "--out=''":
        out, want = "", "--out='': empty; allowed: a new or empty folder"
    elif case == "--out=FILE/sub":
        out = str(tmp_path / "file" / "sub")
        want = (f"--out={out!r}: cannot be created ({tmp_path}/file is not a folder); allowed: "
                "a new or empty folder this user can write")
    else:
        import datasets

        def offline(*a, **k):
            raise ConnectionError("Couldn't reach 'nobody/nothing' on the Hub (LocalEntryNotFo"
                                  "undError)")

        monkeypatch.setattr(datasets, "load_dataset", offline)
        extra = ["--config.data.source=hub", "--config.data.path=nobody/nothing"]
        want = ("data.path='nobody/nothing': cannot load from the hub (Couldn't reach "
                "'nobody/nothing' on the Hub (LocalEntryNotFoundError)); allowed: a hub dataset "
                "you can reach, or data.source='files'")
    line = one_line(lambda: prepare(tmp_path, f"--out={out}", *extra))
    assert line == f"error: {want}"
    if case == "full disk":  # what is there is marked unfinished, and training refuses it
        assert sorted(os.listdir(out)) == [".cache", ".incomplete", "eval", "train"]
        with pytest.raises(config_lib.ConfigError, match="an unfinished prepare"):
            store.read_manifest(out)
    else:
        assert not os.path.exists(tmp_path / "store")
    assert (tmp_path / "file").read_text() == "a file, not a folder\n"


# ---------------------------------------------------------------------------------------------
# Class 4: train's workdir, a streamed eval split that is empty, a dense run asked for its
# experts, a tokenizer larger than the model's vocabulary.

def stream_config(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n"
                            for i in range(40)))
    c = tiny.get_config("smoke")
    c.data.update(source="files", path=str(docs), format="json", streaming=True,
                  eval_fraction=0.0)
    return c


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A dense smoke run's workdir (num_experts = 0): checkpoints/2 and config.json."""
    workdir = tmp_path_factory.mktemp("dense")
    c = tiny.get_config("smoke")
    c.model.update(num_experts=0, vocab_size=257)
    abstract = state.setup(c, parallel.make_mesh({})).abstract
    ckpt = Checkpoints(str(workdir), 1, False)
    ckpt.save(2, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract), {"step": 2})
    ckpt.close()
    (workdir / "config.json").write_text(c.to_json_best_effort())
    return workdir


def big_tokenizer(tmp_path):
    """A tokenizer.json of 300 tokens: more than the smoke run's 257."""
    import tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(299)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.save(str(tmp_path / "tokenizer.json"))
    return str(tmp_path / "tokenizer.json")


CASES = {
    "--workdir=''": lambda t, run, dense: (
        lambda: train.train_and_evaluate(tiny.get_config("smoke"), ""),
        "--workdir='': not writable (No such file or directory); allowed: a directory this "
        "user can create and write"),
    "--workdir=FILE/sub": lambda t, run, dense: (
        lambda: train.train_and_evaluate(tiny.get_config("smoke"), f"{t}/file/sub"),
        f"--workdir='{t}/file/sub': not writable (Not a directory); allowed: a directory this "
        "user can create and write"),
    "streamed eval split empty": lambda t, run, dense: (
        lambda: train.train_and_evaluate(stream_config(t), f"{t}/w"),
        "data.eval_fraction=0.0: the eval stream ran out (it holds 0 eval tokens per pass) at "
        "batch 0; allowed: a larger data.eval_fraction, more documents, or fewer held-out "
        "batches (train.eval_batches)"),
    "generate --quantize int8, dense run": lambda t, run, dense: (
        lambda: gen.main(["generate", f"--workdir={dense}", "--quantize=int8"]),
        f"--quantize=int8: --workdir={str(dense)!r} is a dense run (no MoE layer: "
        "model.num_experts=0), it has no routed experts; allowed: none"),
    "quant_check, dense run": lambda t, run, dense: (
        lambda: quant_check.main(["quant_check", f"--workdir={dense}"]),
        f"quant_check: --workdir={str(dense)!r} is a dense run (no MoE layer: "
        "model.num_experts=0), it has no routed experts; allowed: the --workdir of an MoE run"),
    "generate --hf_tokenizer of 300 tokens > 257": lambda t, run, dense: (
        lambda: gen.main(["generate", f"--workdir={run}", f"--hf_tokenizer={big_tokenizer(t)}"]),
        f"--hf_tokenizer='{t}/tokenizer.json': 300 tokens, more than the model's vocabulary "
        "of 257; allowed: the run's tokenizer ('byte', the default) or one of at most 257 "
        "tokens"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_environment_failures_are_one_line_before_anything_is_built(
        case, tmp_path, run, dense, monkeypatch):
    (tmp_path / "file").write_text("a file\n")
    call, want = CASES[case](tmp_path, run, dense)

    def built(*a, **k):
        raise AssertionError("built the train state: the check came too late")

    if not case.startswith(("generate", "quant_check")):  # they check once the run is read
        monkeypatch.setattr(train.state, "setup", built)
    before = hashes(run), hashes(dense)
    assert one_line(call) == f"error: {want}"
    assert (hashes(run), hashes(dense)) == before
    assert (tmp_path / "file").read_text() == "a file\n"


RESTORE = """
import sys
from configs import tiny
from moejax import parallel
from moejax.run import state
from moejax.run.checkpoint import Checkpoints
config = tiny.get_config()
config.model.vocab_size = 257
abstract = state.setup(config, parallel.make_mesh({})).abstract
print(Checkpoints(sys.argv[1], 2, False).restore_latest(abstract)[1]["step"])
"""


def test_a_damaged_checkpoint_fallback_prints_one_line(tmp_path):
    """The whole stderr of train's restore past a damaged checkpoint is its one warning. The
    tiny config's (not smoke's) arrays, every one of them truncated: orbax's reads of the step
    still running when its event loop closed printed dozens of 'Event loop is closed'."""
    c = tiny.get_config()
    c.model.vocab_size = 257
    abstract = state.setup(c, parallel.make_mesh({})).abstract
    ckpt = Checkpoints(str(tmp_path), 2, False)
    for step in (3, 6):
        rng = np.random.default_rng(step)
        ckpt.save(step, jax.tree.map(lambda a, rng=rng: rng.standard_normal(a.shape).astype(
            a.dtype), abstract), {"step": step})
    ckpt.close()
    for f in (tmp_path / "checkpoints" / "6" / "state" / "ocdbt.process_0" / "d").iterdir():
        os.truncate(f, f.stat().st_size // 2)
    out = subprocess.run([sys.executable, "-c", RESTORE, str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0 and out.stdout == "3\n", out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr, (
        out.stderr[-3000:])
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and (f"checkpoint {tmp_path}/checkpoints/6 does not restore ("
                                in lines[0]), out.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Class 5: reading a run that is still training: the step picked is deleted (the run's
# rotation) while it is read; checkpoints/ empty but best/ intact.

def deleted_while_read(run, monkeypatch, then):
    """The first parameters read (the newest step, 6) lose their folder first: `then(run)`."""
    real, calls = checkpoint.restore_params, []

    def reading(mgr, step, target):
        if not calls:
            then(run)
        calls.append(step)
        return real(mgr, step, target)

    monkeypatch.setattr(checkpoint, "restore_params", reading)
    return calls


def rotated(run):  # the run saved 7 (a copy of 6 will do) and kept only it
    shutil.copytree(run / "checkpoints" / "6", run / "checkpoints" / "7")
    for step in (3, 6):
        shutil.rmtree(run / "checkpoints" / str(step))


READS = [  # case, the step read, the value its arrays hold, the one line logged
    ("6 deleted mid-read", 3, 3,
     "checkpoint {run}/checkpoints/6 was deleted while it was read (its run saves on and "
     "rotates its checkpoints): reading the newest one again"),
    ("7 saved, 3 and 6 rotated away mid-read", 7, 6,
     "checkpoint {run}/checkpoints/6 was deleted while it was read (its run saves on and "
     "rotates its checkpoints): reading the newest one again"),
    ("checkpoints/ empty, best/ intact", 3, 3,
     "no checkpoint in {run}/checkpoints (none saved): using the best one, {run}/best/3"),
]


@pytest.mark.parametrize("reader,case,step,value,line", [
    ("generate", *r) for r in READS] + [("to-hf", *r) for r in READS[::2]],
    ids=[f"generate, {r[0]}" for r in READS] + [f"to-hf, {r[0]}" for r in READS[::2]])
def test_a_run_that_is_still_training_is_read_as_train_resumes(
        run, monkeypatch, caplog, capsys, reader, case, step, value, line):
    if case.startswith("6 deleted"):
        calls = deleted_while_read(run, monkeypatch,
                                   lambda r: shutil.rmtree(r / "checkpoints" / "6"))
    elif case.startswith("7 saved"):
        calls = deleted_while_read(run, monkeypatch, rotated)
    else:
        shutil.rmtree(run / "checkpoints")
        (run / "checkpoints").mkdir()
        calls = []
    with caplog.at_level(logging.WARNING, logger="moejax.run.checkpoint"):
        if reader == "generate":
            _, model, got = gen.load(str(run))
            assert (got, first_param(model)) == (step, value)
        else:
            exportable = config()
            exportable.model.renormalize = True  # Mixtral's routing; the parameters alike
            (run / "config.json").write_text(exportable.to_json_best_effort())
            hf.to_hf(str(run), str(run.parent / "out"))
            assert capsys.readouterr().out.startswith(f"wrote step {step} of {run} to ")
    assert [r.getMessage() for r in caplog.records] == [line.format(run=run)]
    assert calls == ([6, step] if "mid-read" in case else [])


# ---------------------------------------------------------------------------------------------
# Class 6: a resume onto another mesh keeps the capacity groups the checkpoint recorded.

@pytest.mark.parametrize("num_groups,saved,data,groups,kept", [
    (0, 4, 1, 4, True),     # data=4 -> one device: 4 groups of the checkpoint's, not 1
    (0, 8, 2, 8, True),
    (0, 4, 4, 4, None),     # same mesh: nothing to say
    (0, None, 1, 1, None),  # a checkpoint older than the record: the mesh decides, silently
    (0, 1, 4, 4, False),    # one device -> data=4: 1 group cannot span 4 shards; said
    (2, 4, 1, 2, False),    # the config names other groups: they win; said
])
def test_a_resume_keeps_the_checkpoints_capacity_groups(num_groups, saved, data, groups,
                                                        kept):
    c = tiny.get_config("smoke")
    c.model.num_groups = num_groups
    s, line = state.keep_groups(state.setup(c, parallel.make_mesh({"data": data})), saved)
    assert state.capacity_groups(s.config, s.mesh) == groups
    assert c.model.num_groups == num_groups  # the user's config (config.json) unchanged
    if kept is None:
        assert line is None
    elif kept:
        assert line == (f"capacity groups: {saved} per batch, as the checkpoint's run routed "
                        f"(this mesh's default would be {data}): the same tokens are dropped "
                        "as in an uninterrupted run")
    else:
        assert line == (f"capacity groups: {groups} per batch, the checkpoint's run routed in "
                        f"{saved}: other tokens exceed an expert's capacity, so the losses "
                        "differ from an uninterrupted run's (to keep them: "
                        f"model.num_groups={saved}, on a mesh whose data x fsdp x expert "
                        f"divides {saved})")


# ---------------------------------------------------------------------------------------------
# Class 2: every numeric flag of generate and quant_check, finite and in range.

FLAGS = [  # entry point, flag, the message
    ("generate", "--temperature=nan", "flag --temperature=nan: must be a finite number >= 0 "
     "(0 = greedy)"),
    ("generate", "--temperature=inf", "flag --temperature=inf: must be a finite number >= 0 "
     "(0 = greedy)"),
    ("generate", "--temperature=-1", "flag --temperature=-1.0: must be a finite number >= 0 "
     "(0 = greedy)"),
    ("generate", "--top_p=0", "flag --top_p=0.0: must be in (0, 1]"),
    ("generate", "--top_p=1.5", "flag --top_p=1.5: must be in (0, 1]"),
    ("generate", "--top_p=nan", "flag --top_p=nan: must be in (0, 1]"),
    ("generate", "--tokens=0", "flag --tokens=0: 0 is not a positive integer"),
    ("generate", "--tokens=-5", "flag --tokens=-5: -5 is not a positive integer"),
    ("generate", "--seed=-1",
     "flag --seed=-1: -1 is not an integer in the range [0, 2147483647]"),
    ("generate", "--seed=4294967296",
     "flag --seed=4294967296: 4294967296 is not an integer in the range [0, 2147483647]"),
    ("quant_check", "--batches=0", "flag --batches=0: 0 is not a positive integer"),
    ("quant_check", "--prompts=-1", "flag --prompts=-1: -1 is not a positive integer"),
    ("quant_check", "--tokens=0", "flag --tokens=0: 0 is not a positive integer"),
    ("quant_check", "--tokens=5000", "--tokens=5000: 16-token prompts + 5000 exceed "
     "model.max_seq_len=2048; allowed: at most 2032"),
]


@pytest.mark.parametrize("entry,flag,error", FLAGS, ids=[f"{e} {f}" for e, f, _ in FLAGS])
def test_numeric_flags_are_finite_and_in_range(run, entry, flag, error):
    main = {"generate": gen.main, "quant_check": quant_check.main}[entry]
    before = hashes(run)
    assert one_line(lambda: main([entry, f"--workdir={run}", flag])) == f"error: {error}"
    assert hashes(run) == before


def test_generate_refuses_nan_in_process():
    with pytest.raises(ValueError, match="temperature=nan must be finite"):
        gen.generate(None, [[1]], 1, temperature=float("nan"))


def test_a_data8_checkpoint_resumed_on_one_device_gives_the_same_loss(tmp_path, capsys):
    """A tiny:smoke checkpoint of step 1 that recorded 8 capacity groups (data=8), resumed for
    one step on data=8 and on one device (whose default is 1 group): the same loss, to float
    rounding (the groups followed the mesh before: 5.3811 against 5.3904 at step 4). The run
    records its own groups in the checkpoint it saves."""
    c = tiny.get_config("smoke")
    c.model.vocab_size = 257
    c.train.stop_at = 2
    abstract = state.setup(c, parallel.make_mesh({"data": 8})).abstract
    rng = np.random.default_rng(0)
    ckpt = Checkpoints(str(tmp_path / "data8"), 2, False)
    # Positive: AdamW's second moment under a square root (a negative one made every update
    # NaN, which the step now refuses).
    ckpt.save(1, jax.tree.map(lambda a: np.abs(0.02 * rng.standard_normal(a.shape)).astype(
        a.dtype), abstract), {"step": 1, "num_groups": 8})
    ckpt.close()
    shutil.copytree(tmp_path / "data8", tmp_path / "one")
    on8 = train.train_and_evaluate(c, str(tmp_path / "data8"))["train_loss"]
    capsys.readouterr()
    c.mesh.data = 1
    on1 = train.train_and_evaluate(c, str(tmp_path / "one"))["train_loss"]
    assert ("capacity groups: 8 per batch, as the checkpoint's run routed (this mesh's default "
            "would be 1): the same tokens are dropped as in an uninterrupted run"
            ) in capsys.readouterr().out.splitlines()
    assert sorted(on1) == sorted(on8) == [2]
    np.testing.assert_allclose(on1[2], on8[2], rtol=1e-6)
    for run_dir in ("data8", "one"):  # what the next resume keeps, whatever its mesh
        meta = json.loads((tmp_path / run_dir / "checkpoints" / "2" / "meta" / "metadata")
                          .read_text())
        assert meta["num_groups"] == 8
