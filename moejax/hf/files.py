"""What the converter reads and writes, checked: a transformers checkpoint's JSON and
safetensors files in (each file whole, each tensor once, the index and the files agreeing, a
tokenizer moejax reads, DeepSeek's block-scaled FP8 weights dequantized), and folders out that
never take a user's files: from-hf's workdir new or empty and left as it was if the writing
fails, to-hf's export written beside OUT and renamed into place whole."""

import contextlib
import errno
import glob
import json
import math
import os
import shutil
import tempfile

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from moejax.config_lib import ConfigError, first_line
from moejax.hf.fields import ROUTER_FILE, ROUTER_JSON

INDEX = "model.safetensors.index.json"
FLOATS = ("F64", "F32", "BF16", "F16")  # safetensors dtypes a weight may have
# float8 dtypes safetensors' NumPy reader cannot make: read from the file's bytes here
RAW = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


def read_json(path: str) -> dict:
    """The JSON object in `path`, or one line naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except ValueError as e:  # not JSON, or not UTF-8
        raise ConfigError(f"{path}: not JSON ({first_line(e)}); allowed: the file "
                          "save_pretrained writes") from None
    if not isinstance(out, dict):
        raise ConfigError(f"{path}: a JSON {type(out).__name__}, not an object; allowed: the "
                          "file save_pretrained writes")
    return out


# --- in ----------------------------------------------------------------------------------

class Tensors:
    """The safetensors files of a checkpoint folder, opened lazily: name -> one tensor. Their
    headers are read and checked here: each file whole, each tensor in one file, and where
    model.safetensors.index.json is, exactly the files and tensors it names (another file is
    a leftover of another export: reading it would mix two models). ROUTER_FILE, which no
    index names (transformers does not read it), adds its tensors where it is."""

    def __init__(self, folder: str):
        self.files, self.headers = {}, {}  # name -> path; name -> (dtype, shape)
        router = os.path.join(folder, ROUTER_FILE)
        paths = sorted(set(glob.glob(os.path.join(folder, "*.safetensors"))) - {router})
        if not paths:
            raise ConfigError(f"{folder}: no *.safetensors files; allowed: a folder that "
                              "save_pretrained wrote (safetensors, not .bin)")
        index, named = os.path.join(folder, INDEX), None
        if os.path.exists(index):
            named = read_json(index).get("weight_map")
            if not isinstance(named, dict):
                raise ConfigError(f"{index}: weight_map={named!r}: not an object of tensor "
                                  "names to files; allowed: the index save_pretrained writes")
            if stale := sorted({os.path.basename(p) for p in paths} - set(named.values())):
                raise ConfigError(f"{os.path.join(folder, stale[0])}: not named by {INDEX} "
                                  f"({len(stale)} such file(s), a leftover of another "
                                  "export?); allowed: the files the index names (move the "
                                  "others away)")
        for path in paths + ([router] if os.path.exists(router) else []):
            for name, header in read_headers(path).items():
                if name in self.files:
                    raise ConfigError(f"{folder}: tensor {name} is in both "
                                      f"{os.path.basename(self.files[name])} and "
                                      f"{os.path.basename(path)}; allowed: each tensor in one "
                                      "file (a leftover of another export?)")
                self.files[name], self.headers[name] = path, header
        for name in sorted(set(named or {}) | set(self.files)) if named is not None else ():
            where = os.path.basename(self.files[name]) if name in self.files else None
            if named.get(name) != where:
                raise ConfigError(f"{index}: tensor {name}: the index says {named.get(name)}, "
                                  f"the files say {where}; allowed: an index that matches its "
                                  "files")

    def shape(self, name):
        return self.headers[name][1]

    def dtype(self, name) -> str:
        return self.headers[name][0]

    def get(self, name) -> np.ndarray:
        if self.dtype(name) in RAW:
            return read_raw(self.files[name], name)
        with safe_open(self.files[name], "np") as f:  # memory-mapped: reads this tensor only
            return f.get_tensor(name)


def router_keys(folder: str) -> dict:
    """The model keys ROUTER_JSON in `folder` gives ({} if none): bias_rate (a finite number
    >= 0) and router_score (a string; the caller checks it against the architecture's)."""
    path = os.path.join(folder, ROUTER_JSON)
    if not os.path.exists(path):
        if os.path.exists(os.path.join(folder, ROUTER_FILE)):
            raise ConfigError(f"{folder}: {ROUTER_FILE} without {ROUTER_JSON} (the bias_rate "
                              "that moves its bias); allowed: both, as to-hf writes them, or "
                              "neither")
        return {}
    keys = read_json(path)
    if unknown := sorted(keys.keys() - {"bias_rate", "router_score"}):
        raise ConfigError(f"{path}: {unknown[0]}: unknown; allowed: bias_rate, router_score")
    score = keys.get("router_score")
    if not isinstance(score, str):
        raise ConfigError(f"{path}: router_score={score!r}: not a string; allowed: the "
                          "router_score to-hf wrote (softmax or sigmoid)")
    rate = keys.get("bias_rate")
    if (isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate)
            or rate < 0):
        raise ConfigError(f"{path}: bias_rate={rate!r}: not a finite number >= 0; allowed: "
                          "a finite number >= 0")
    return {"bias_rate": float(rate), "router_score": score}


def read_raw(path: str, name: str) -> np.ndarray:
    """One float8 tensor of a safetensors file, from its bytes: an 8-byte little-endian header
    length, the JSON header (dtype, shape, data_offsets from the end of the header), the data."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(size))[name]
        start, end = entry["data_offsets"]
        f.seek(8 + size + start)
        data = f.read(end - start)
    return np.frombuffer(data, RAW[entry["dtype"]]).reshape(entry["shape"])


class BlockFP8:
    """A checkpoint in DeepSeek's own FP8 format (DeepSeek-V3/R1, Kimi K2: config.json's
    quantization_config {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [bo, bi]})
    seen as the float32 tensors it stands for: <m>.weight float8_e4m3fn [out, in] times
    <m>.weight_scale_inv float32 [ceil(out / bo), ceil(in / bi)], each scale over its bo x bi
    block (edge blocks cropped), one tensor at a time. `files`, `shape`, `dtype` and `get` as
    Tensors has them; every pair is checked from the headers before any data is read."""

    def __init__(self, tensors, qc: dict):
        def refuse(key, allowed):
            raise ConfigError(f"config.json quantization_config{key}={qc.get(key[1:])!r}: not "
                              f"supported; allowed: {allowed}")

        block = qc.get("weight_block_size")
        if qc.get("fmt", "e4m3") != "e4m3":
            refuse(".fmt", "e4m3")
        if (not isinstance(block, list) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0
                           for b in block)):
            refuse(".weight_block_size", "[rows, columns], two integers > 0 (DeepSeek: "
                   "[128, 128])")
        self.tensors, self.block, self.files = tensors, tuple(block), dict(tensors.files)
        self.scaled = set()
        for name in tensors.files:
            if not name.endswith(".weight_scale_inv"):
                continue
            w = name.removesuffix("_scale_inv")
            if w not in tensors.files:
                raise ConfigError(f"tensor {name}: no {w} beside it; allowed: a float8 weight "
                                  "and its weight_scale_inv")
            if tensors.dtype(w) != "F8_E4M3" or tensors.dtype(name) not in FLOATS:
                raise ConfigError(f"tensor {w} / {name} are {tensors.dtype(w)}, "
                                  f"{tensors.dtype(name)}; allowed: F8_E4M3 and a float")
            shape, scale = tensors.shape(w), tensors.shape(name)
            want = (tuple(-(-n // b) for n, b in zip(shape, self.block, strict=True))
                    if len(shape) == 2 else None)
            if scale != want:
                raise ConfigError(f"tensor {name} is {list(scale)}, and weight_block_size "
                                  f"{list(self.block)} over {w} {list(shape)} makes it "
                                  f"{list(want) if want else 'nothing (not a matrix)'}; "
                                  "allowed: the blocks it was quantized with")
            del self.files[name]
            self.scaled.add(w)

    def dtype(self, name) -> str:
        return "F32" if name in self.scaled else self.tensors.dtype(name)

    def shape(self, name):
        return self.tensors.shape(name)

    def get(self, name) -> np.ndarray:
        if name not in self.scaled:
            return self.tensors.get(name)
        return dequantize_blocks(self.tensors.get(name),
                                 self.tensors.get(f"{name}_scale_inv"), self.block)


def dequantize_blocks(q: np.ndarray, scale_inv: np.ndarray, block) -> np.ndarray:
    """q [out, in] (float8) times its block's scale -> float32 [out, in]."""
    (out, n), (bo, bi) = q.shape, block
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), bo, 0), bi, 1)[:out, :n]
    return q.astype(np.float32) * s


def read_headers(path: str) -> dict:
    """name -> (dtype, shape) of every tensor in a safetensors file; one line naming the file
    if it is not one (truncated, garbage)."""
    try:
        with safe_open(path, "np") as f:
            return {n: (f.get_slice(n).get_dtype(), tuple(f.get_slice(n).get_shape()))
                    for n in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{path}: not a readable safetensors file ({first_line(e)}); "
                          "allowed: the files save_pretrained wrote, whole") from None


def tokenizer_of(folder: str, hf_dir: str) -> str:
    """data.tokenizer for the run: its tokenizer.json, copied to hf_dir; byte if the folder has
    no tokenizer at all. One moejax cannot read (SentencePiece's tokenizer.model, a slow
    tokenizer's vocab.json) is refused rather than trained with another one."""
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        return hf_dir
    for name in ("tokenizer.model", "vocab.json", "tiktoken.model"):  # tiktoken: Kimi K2's
        if os.path.exists(os.path.join(folder, name)):
            raise ConfigError(f"{folder}: its tokenizer is {name} without tokenizer.json, "
                              "which moejax cannot read; allowed: a folder with tokenizer.json "
                              "too (AutoTokenizer.from_pretrained(SRC).save_pretrained(SRC) "
                              "writes it)")
    return "byte"


# --- out ---------------------------------------------------------------------------------

def check_new_workdir(workdir: str) -> None:
    """from-hf makes a new run: in a new or empty folder only, so it overwrites nothing."""
    if not workdir:
        raise ConfigError("--workdir='': empty; allowed: the folder to make the run in")
    held = sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []
    if "checkpoints" in held and os.listdir(os.path.join(workdir, "checkpoints")):
        raise ConfigError(f"--workdir={workdir!r}: already holds a checkpoint; allowed: a new "
                          "or empty folder (a good checkpoint is never overwritten)")
    if held:
        raise ConfigError(f"--workdir={workdir!r}: not empty (holds {held[0]}"
                          f"{', ...' if len(held) > 1 else ''}); allowed: a new or empty "
                          "folder (from-hf writes over nothing)")


@contextlib.contextmanager
def undone_on_failure(workdir: str, existed: bool):
    """A conversion that fails while writing (a full disk, Ctrl-C) leaves workdir as it was:
    removed if new, emptied if it was empty. An OSError becomes one line naming it."""
    try:
        yield
    except BaseException as e:
        if jax.process_index() == 0:
            for name in os.listdir(workdir) if existed else ():
                path = os.path.join(workdir, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
            if not existed:
                shutil.rmtree(workdir, ignore_errors=True)
        if isinstance(e, OSError):
            raise ConfigError(f"--workdir={workdir!r}: cannot write ({e.strerror or e}); "
                              "nothing was left there; allowed: a folder this user can write, "
                              "on a disk with room for the run") from None
        raise


SHARD_GIB = "must be finite and > 0 (GiB per file)"


def check_shard_gib(shard_gib: float) -> None:
    """to-hf's --shard_gib, as the command line checks it."""
    if not (isinstance(shard_gib, int | float) and math.isfinite(shard_gib) and shard_gib > 0):
        raise ConfigError(f"--shard_gib={shard_gib}: {SHARD_GIB}")


def check_out(out: str, workdir: str, overwrite: bool) -> str:
    """to-hf's OUT as a real path, if writing it loses nothing: not the run or a folder
    around or inside it, and new or empty, or (`overwrite`) an earlier export."""
    if not out:
        raise ConfigError("OUT='': empty; allowed: the folder to write the transformers "
                          "checkpoint into")
    target, run = os.path.realpath(out), os.path.realpath(workdir)
    if target == run or target.startswith(run + os.sep):
        raise ConfigError(f"OUT={out!r}: inside the run --workdir={workdir!r} (its config.json "
                          "would be overwritten); allowed: a folder outside the run")
    if run.startswith(target.rstrip(os.sep) + os.sep):
        raise ConfigError(f"OUT={out!r}: holds the run --workdir={workdir!r}; allowed: a "
                          "folder outside the run")
    if os.path.lexists(target) and not os.path.isdir(target):
        raise ConfigError(f"OUT={out!r}: not a folder; allowed: a new or empty folder")
    held = sorted(os.listdir(target)) if os.path.isdir(target) else []
    if held and not overwrite:
        raise ConfigError(f"OUT={out!r}: not empty (holds {held[0]}"
                          f"{', ...' if len(held) > 1 else ''}); allowed: a new or empty "
                          "folder, or --overwrite to replace an earlier export whole")
    if held and "config.json" not in held:
        raise ConfigError(f"OUT={out!r}: --overwrite replaces an earlier export, and this "
                          f"folder holds no config.json (it holds {held[0]}); allowed: a new "
                          "or empty folder, or an earlier export")
    return target


def make_aside(target: str, out: str) -> str:
    """A new folder beside `target`, on its file system: the export is renamed from it."""
    parent = os.path.dirname(target)
    try:
        if os.path.lexists(parent) and not os.path.isdir(parent):
            raise NotADirectoryError(errno.ENOTDIR, "not a folder")
        os.makedirs(parent, exist_ok=True)
        return tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".partial",
                                dir=parent)
    except OSError as e:
        raise ConfigError(f"OUT={out!r}: cannot write in {parent} ({e.strerror or e}); "
                          "allowed: a folder this user can create and write") from None


def put_in_place(aside: str, target: str) -> None:
    """Rename `aside` to `target` (new, empty, or an earlier export): whole, never mixed.
    An earlier export is renamed away first, then deleted; back if the second rename fails."""
    mask = os.umask(0)  # read it back: files get the permissions open() gives config.json
    os.umask(mask)
    for name in os.listdir(aside):
        os.chmod(os.path.join(aside, name), 0o666 & ~mask)  # safetensors' temp files: 0600
    os.chmod(aside, 0o777 & ~mask)  # mkdtemp's: 0700
    if not (os.path.isdir(target) and os.listdir(target)):
        os.rename(aside, target)  # replaces an empty folder
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".old",
                           dir=os.path.dirname(target))
    os.rename(target, old)
    try:
        os.rename(aside, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
