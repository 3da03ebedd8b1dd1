"""Issue 31, the converter's share: its outputs never overwrite or mix (class 1), it checks
what it reads (class 3), its numeric flag is finite and in range (class 2), and a full disk or
an unwritable or empty OUT is one line that loses nothing (class 4); and `python -m
moejax.scaling` leaves the checked-in docs/scaling.md alone unless told. Each case runs the
command line's `main` and asserts the exit (one line, status 1), what is on disk after (files
that were there byte for byte, nothing new), and no temporary folder left behind."""

import contextlib
import errno
import io
import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
from safetensors import SafetensorError
from safetensors.numpy import save_file

from moejax import convert, scaling
from moejax.hf import compressed, convert as hf_convert
from tests.test_convert import FIXTURES, REPO, tensors

MIXTRAL = os.path.join(FIXTURES, "mixtral")


def snapshot(root) -> dict:
    """relative path -> bytes of every file under root; {} if there is no root."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def fails(capsys, argv) -> str:
    """`python -m moejax.convert ARGV` in this process: its exit message, asserted one line
    with status 1 (sys.exit of a string) and no traceback on stderr."""
    with pytest.raises(SystemExit) as e:
        convert.main(["convert", *argv])
    assert isinstance(e.value.code, str), e.value.code  # a string: exit status 1
    assert "\n" not in e.value.code and e.value.code.startswith("error: ")
    assert "Traceback" not in capsys.readouterr().err
    return e.value.code


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The Mixtral fixture imported: a run's workdir with checkpoints/0, config.json, hf/."""
    work = str(tmp_path_factory.mktemp("guards") / "run")
    with contextlib.redirect_stdout(io.StringIO()):
        convert.from_hf(MIXTRAL, work, {"data": 1})
    return work


# --- class 1: outputs never overwrite or mix ------------------------------------------------

def another_model(out):
    """OUT holding a model already: the Qwen3-MoE fixture's files."""
    shutil.copytree(os.path.join(FIXTURES, "qwen3_moe_top2"), out)


def user_notes(out):
    os.makedirs(out)
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("mine\n")


def a_file(out):
    with open(out, "w") as f:
        f.write("mine\n")


TO_HF_REFUSED = [  # (id, OUT relative to tmp_path or "RUN..." inside the run, set-up, flags,
    #                  the message after "error: OUT='<OUT>': ")
    ("non-empty OUT holding a model", "out", another_model, [],
     "not empty (holds config.json, ...); allowed: a new or empty folder, or --overwrite to "
     "replace an earlier export whole"),
    ("OUT is the run's workdir (its config.json)", "RUN", None, [],
     "inside the run --workdir='{run}' (its config.json would be overwritten); allowed: a "
     "folder outside the run"),
    ("OUT inside the run's workdir", "RUN/export", None, ["--overwrite"],
     "inside the run --workdir='{run}' (its config.json would be overwritten); allowed: a "
     "folder outside the run"),
    ("--overwrite of OUT holding the run", "RUN/..", None, ["--overwrite"],
     "holds the run --workdir='{run}'; allowed: a folder outside the run"),
    ("--overwrite of a folder that is no export", "out", user_notes, ["--overwrite"],
     "--overwrite replaces an earlier export, and this folder holds no config.json (it holds "
     "notes.txt); allowed: a new or empty folder, or an earlier export"),
    ("OUT a file", "out", a_file, [], "not a folder; allowed: a new or empty folder"),
    ("OUT under a regular file (unwritable, even for root)", "a_file/out",
     lambda out: a_file(os.path.dirname(out)), [],
     "cannot write in {tmp}/a_file (not a folder); allowed: a folder this user can create "
     "and write"),
]


@pytest.mark.parametrize("name,out,setup,flags,message", TO_HF_REFUSED,
                         ids=[c[0] for c in TO_HF_REFUSED])
def test_to_hf_refuses_what_it_would_overwrite(run, tmp_path, capsys, name, out, setup, flags,
                                               message):
    out = out.replace("RUN", run) if out.startswith("RUN") else str(tmp_path / out)
    if setup:
        setup(out)
    before, run_before = snapshot(tmp_path), snapshot(run)
    got = fails(capsys, ["to-hf", out, "--workdir", run, *flags])
    assert got == f"error: OUT={out!r}: " + message.format(run=run,
                                                            tmp=os.path.realpath(tmp_path))
    assert snapshot(tmp_path) == before and snapshot(run) == run_before


def test_to_hf_refuses_an_empty_out(run, capsys):
    assert fails(capsys, ["to-hf", "", "--workdir", run]) == (
        "error: OUT='': empty; allowed: the folder to write the transformers checkpoint into")


def test_to_hf_refuses_an_unwritable_parent(run, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into a 0o500 folder; 'OUT under a regular file' covers root")
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        got = fails(capsys, ["to-hf", str(parent / "out"), "--workdir", run])
    finally:
        parent.chmod(0o700)
    assert got == (f"error: OUT={str(parent / 'out')!r}: cannot write in {parent} (Permission "
                   "denied); allowed: a folder this user can create and write")
    assert os.listdir(parent) == []


def test_to_hf_replaces_an_export_whole_and_as_readable_as_config_json(run, tmp_path):
    """A sharded export, then --overwrite with one file: OUT holds the second export only (no
    stale shard or index to mix in), every file 0644 and the folder 0755 under umask 022
    (safetensors' own writes are 0600), and nothing is left beside it."""
    out = tmp_path / "out"
    mask = os.umask(0o022)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            first = convert.to_hf(run, str(out), shard_gib=60_000 / 2**30)
            assert len(first) > 1 and (out / hf_convert.INDEX).exists()
            files = convert.to_hf(run, str(out), overwrite=True)
    finally:
        os.umask(mask)
    assert files == ["model.safetensors"]
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json",
                                       "model.safetensors"]
    assert os.listdir(tmp_path) == ["out"]
    for name in os.listdir(out):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o644, name
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    ref, got = tensors(MIXTRAL), tensors(str(out))
    assert got.keys() == ref.keys()
    assert all(got[k].tobytes() == ref[k].tobytes() for k in ref)


def test_from_hf_refuses_a_folder_holding_files(tmp_path, capsys):
    work = tmp_path / "run"
    work.mkdir()
    (work / "config.py").write_text("# the user's own\n")
    got = fails(capsys, ["from-hf", MIXTRAL, "--workdir", str(work), "--mesh", "data=1"])
    assert got == (f"error: --workdir={str(work)!r}: not empty (holds config.py); allowed: a "
                   "new or empty folder (from-hf writes over nothing)")
    assert snapshot(work) == {"config.py": b"# the user's own\n"}


# --- class 3: the converter checks what it reads -------------------------------------------

def edit_config(**changes):
    def edit(src):
        with open(os.path.join(src, "config.json")) as f:
            hf = json.load(f)
        for key, value in changes.items():
            if value is None:
                del hf[key]
            else:
                hf[key] = value
        with open(os.path.join(src, "config.json"), "w") as f:
            json.dump(hf, f)
    return edit


def write(name, data: bytes):
    def edit(src):
        with open(os.path.join(src, name), "wb") as f:
            f.write(data)
    return edit


def truncate(src):
    path = os.path.join(src, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    write("model.safetensors", data[:-100])(src)


def duplicate(src):  # a second file holding one of the first's tensors
    save_file({"model.norm.weight": tensors(src)["model.norm.weight"]},
              os.path.join(src, "extra.safetensors"))


def stale(src):
    """Two exports into one folder: the index of the newer names its model.safetensors, the
    older one's shard is still there."""
    names = sorted(tensors(src))
    with open(os.path.join(src, hf_convert.INDEX), "w") as f:
        json.dump({"weight_map": {n: "model.safetensors" for n in names}}, f)
    save_file({names[0]: tensors(src)[names[0]]},
              os.path.join(src, "model-00001-of-00002.safetensors"))


def retype(name, dtype):
    def edit(src):
        t = tensors(src)
        t[name] = t[name].astype(np.float32).astype(dtype)
        save_file(t, os.path.join(src, "model.safetensors"))
    return edit


def nan_weight(src):
    t = tensors(src)
    t["model.norm.weight"] = np.full(t["model.norm.weight"].shape, np.nan, np.float32)
    save_file(t, os.path.join(src, "model.safetensors"))


def int8_export_saying_4_bits(src):
    """The Qwen2-MoE fixture's routed experts as to-hf --quantize int8 writes them, and a
    quantization_config saying 4 bits."""
    shutil.rmtree(src)
    shutil.copytree(os.path.join(FIXTURES, "qwen2_moe"), src)
    quantizer, out = compressed.Quantizer("int8", np.float32), {}
    for n, w in tensors(src).items():
        out.update(quantizer(n, w.astype(np.float32), ".mlp.experts." in n))
    save_file(out, os.path.join(src, "model.safetensors"))
    qc = quantizer.config()
    qc["config_groups"]["group_0"]["weights"]["num_bits"] = 4
    edit_config(quantization_config=qc)(src)


FROM_HF_REFUSED = [  # (id, how the Mixtral fixture's copy SRC is broken, the message after
    #                  "error: ", {src} for SRC)
    ("a tensor in two files", duplicate,
     "{src}: tensor model.norm.weight is in both extra.safetensors and model.safetensors; "
     "allowed: each tensor in one file (a leftover of another export?)"),
    ("a file the index does not name (stale)", stale,
     "{src}/model-00001-of-00002.safetensors: not named by model.safetensors.index.json (1 "
     "such file(s), a leftover of another export?); allowed: the files the index names (move "
     "the others away)"),
    ("an int32 norm weight", retype("model.norm.weight", np.int32),
     "{src}: tensor model.norm.weight is I32; allowed: a weight's dtypes, F64, F32, BF16, F16"),
    ("a NaN weight", nan_weight,
     "{src}: tensor model.norm.weight holds NaN or inf; allowed: finite weights"),
    ("rope_scaling disagrees with rope_parameters",
     edit_config(rope_scaling={"rope_type": "linear", "factor": 4.0}),
     "config.json rope_scaling={{'rope_type': 'linear', 'factor': 4.0}}: disagrees with "
     "rope_parameters={{'rope_theta': 1000000.0, 'rope_type': 'default'}} (rope_type); "
     "allowed: one of them, or both saying the same"),
    ("rope_theta disagrees with rope_parameters", edit_config(rope_theta=10_000.0),
     "config.json rope_theta=10000.0: disagrees with rope_parameters.rope_theta=1000000.0; "
     "allowed: one of them, or both the same"),
    ("int8 export whose header says 4 bits", int8_export_saying_4_bits,
     "tensor model.layers.0.mlp.experts.0.down_proj.weight_packed is [32, 4], and "
     "quantization_config.config_groups.group_0.weights.num_bits=4 packs weight_shape [32, 16] "
     "into [32, 2]; allowed: the bit width it was packed with"),
    ("only a SentencePiece tokenizer.model", write("tokenizer.model", b"\x0a\x05<unk>"),
     "{src}: its tokenizer is tokenizer.model without tokenizer.json, which moejax cannot "
     "read; allowed: a folder with tokenizer.json too "
     "(AutoTokenizer.from_pretrained(SRC).save_pretrained(SRC) writes it)"),
    ("a truncated .safetensors", truncate,
     "{src}/model.safetensors: not a readable safetensors file (Error while deserializing "
     "header: incomplete metadata, file not fully covered); allowed: the files "
     "save_pretrained wrote, whole"),
    ("a garbage .safetensors", write("model.safetensors", b"garbage" * 20),
     "{src}/model.safetensors: not a readable safetensors file (Error while deserializing "
     "header: header too large); allowed: the files save_pretrained wrote, whole"),
    ("config.json missing hidden_size", edit_config(hidden_size=None),
     "config.json hidden_size: missing; allowed: an integer >= 1 (a MixtralForCausalLM "
     "config.json has it)"),
    ("config.json hidden_size a string", edit_config(hidden_size="32"),
     "config.json hidden_size='32': not an integer >= 1; allowed: an integer >= 1"),
    ("config.json rms_norm_eps a string", edit_config(rms_norm_eps="1e-5"),
     "config.json rms_norm_eps='1e-5': not a finite number > 0; allowed: a finite number > 0"),
    ("config.json tie_word_embeddings a string", edit_config(tie_word_embeddings="false"),
     "config.json tie_word_embeddings='false': not a boolean; allowed: true or false"),
    ("config.json not JSON", write("config.json", b"{not json"),
     "{src}/config.json: not JSON (Expecting property name enclosed in double quotes: line 1 "
     "column 2 (char 1)); allowed: the file save_pretrained writes"),
]


@pytest.mark.parametrize("name,breaks,message", FROM_HF_REFUSED,
                         ids=[c[0] for c in FROM_HF_REFUSED])
def test_from_hf_refuses_what_it_cannot_read_right(tmp_path, capsys, name, breaks, message):
    src, work = str(tmp_path / "src"), tmp_path / "run"
    shutil.copytree(MIXTRAL, src)
    breaks(src)
    before = snapshot(src)
    got = fails(capsys, ["from-hf", src, "--workdir", str(work), "--mesh", "data=1"])
    assert got == "error: " + message.format(src=src)
    assert not work.exists()  # not even made: nothing half-written
    assert snapshot(src) == before and sorted(os.listdir(tmp_path)) == ["src"]


# --- class 2: the converter's numeric flag, finite and in range ---------------------------

@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1"])
def test_shard_gib_finite_and_positive(value, capsys):
    got = fails(capsys, ["to-hf", "out", "--workdir", "w", f"--shard_gib={value}"])
    assert got == (f"error: flag --shard_gib={float(value)}: must be finite and > 0 (GiB per "
                   "file)")
    with pytest.raises(ValueError, match=r"--shard_gib=.*: must be finite and > 0"):
        convert.to_hf("w", "out", shard_gib=float(value))


# --- class 4: a full disk while converting --------------------------------------------------

def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def disk_full_in_rust(*args, **kwargs):  # what safetensors' own writer raises
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os "
                          "error 28)")


@pytest.mark.parametrize("raises,earlier", [(disk_full, False), (disk_full_in_rust, True)],
                         ids=["OSError into a new OUT", "SafetensorError over an export"])
def test_to_hf_on_a_full_disk_changes_nothing(run, tmp_path, capsys, monkeypatch, raises,
                                              earlier):
    out = tmp_path / "out"
    if earlier:
        another_model(str(out))
    before = snapshot(tmp_path)
    monkeypatch.setattr(hf_convert, "save_file", raises)
    got = fails(capsys, ["to-hf", str(out), "--workdir", run]
                + (["--overwrite"] if earlier else []))
    why = ("No space left on device" if raises is disk_full else
           "Error while serializing: I/O error: No space left on device (os error 28)")
    what = "nothing was changed there" if earlier else "nothing was written"
    assert got == (f"error: OUT={str(out)!r}: cannot write ({why}); {what}; allowed: a folder "
                   "this user can write, on a disk with room for the export")
    assert snapshot(tmp_path) == before  # OUT as it was, no .partial folder beside it
    assert sorted(os.listdir(tmp_path)) == (["out"] if earlier else [])


def test_from_hf_on_a_full_disk_leaves_no_workdir(tmp_path, capsys, monkeypatch):
    work = tmp_path / "run"
    monkeypatch.setattr(hf_convert.Checkpoints, "save", disk_full)
    got = fails(capsys, ["from-hf", MIXTRAL, "--workdir", str(work), "--mesh", "data=1"])
    assert got == (f"error: --workdir={str(work)!r}: cannot write (No space left on device); "
                   "nothing was left there; allowed: a folder this user can write, on a disk "
                   "with room for the run")
    assert os.listdir(tmp_path) == []


def test_the_command_line_prints_one_line(run, tmp_path):
    """The issue's first example through `python -m`: to-hf into the run's own workdir."""
    before = snapshot(run)
    proc = subprocess.run([sys.executable, "-m", "moejax.convert", "to-hf", run, "--workdir",
                           run], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1
    assert proc.stderr == (f"error: OUT={run!r}: inside the run --workdir={run!r} (its "
                           "config.json would be overwritten); allowed: a folder outside the "
                           "run\n")
    assert snapshot(run) == before


# --- scaling: the checked-in docs/scaling.md changes only when asked -----------------------

def test_scaling_writes_into_its_workdir_by_default(tmp_path, monkeypatch):
    def trained(variant, config, workdir):  # no training: a record as run_variant returns
        return {"variant": variant, "experts": 0, "total": 1, "active": 1, "router": 0,
                "flops": 1e6, "moe_layers": [], "eval": {config.train.steps: 2.5},
                "wall_s": None, "commit": None, "routing": []}

    monkeypatch.setattr(scaling, "run_variant", trained)
    monkeypatch.setattr(scaling, "plot", lambda *args: False)
    docs = [os.path.join(REPO, "docs", name) for name in ("scaling.md", "scaling.png")]
    before = [open(path, "rb").read() for path in docs]
    with contextlib.redirect_stdout(io.StringIO()):
        scaling.main(["scaling", "--config", f"{scaling.SWITCH}:smoke", "--variants=dense",
                      f"--workdir={tmp_path}"])
    assert [open(path, "rb").read() for path in docs] == before
    assert "| dense,smoke | - | 1 | 1 | 1.00 | 2.5000 | **2.5000** |" in \
        (tmp_path / "scaling.md").read_text()


@pytest.mark.parametrize("key,value,error", [
    ("rope_scaling", "yarn", "model.rope_scaling='yarn': MixtralForCausalLM cannot compute it; "
     "allowed: none (these architectures' exports carry no scaling yet)"),
    ("n_group", 2, "model.n_group=2: MixtralForCausalLM cannot compute it; allowed: 1 with "
     "routed_scaling_factor 1.0 (no group-limited routing)"),
    ("routed_scaling_factor", 2.5, "model.n_group=1: MixtralForCausalLM cannot compute it; "
     "allowed: 1 with routed_scaling_factor 1.0 (no group-limited routing)"),
])
def test_to_hf_refuses_what_its_architectures_would_drop(key, value, error):
    # An export that silently dropped the scaling or the group limit would give other logits.
    from configs import tiny
    from moejax.config_lib import ConfigError
    from moejax.hf import maps

    config = tiny.get_config()
    config.model[key] = value
    with pytest.raises(ConfigError) as e:
        maps.hf_config(config, "float32", None)
    assert str(e.value) == error
