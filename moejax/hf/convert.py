"""Transformers checkpoints in and out, tensor by tensor: `from_hf` builds a moejax run from a
folder of safetensors files (or a hub name), each weight on the devices in its training layout;
`to_hf` writes a run's newest checkpoint as files AutoModelForCausalLM loads. The command
line and what it writes are moejax/convert.py's docstring; the per-architecture names are
maps.py's, the weight-only experts' format compressed.py's."""

import contextlib
import functools
import json
import os
import pprint
import re
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (numpy learns bfloat16, which safetensors' numpy reader needs)
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from moejax import config_lib, parallel
from moejax.config_lib import ConfigError, first_line
from moejax.hf import compressed, mxfp4
from moejax.hf.fields import OWN_BIAS, ROUTER_FILE, ROUTER_JSON
from moejax.hf.files import (
    FLOATS,
    INDEX,
    BlockFP8,
    Tensors,
    check_new_workdir,
    check_out,
    check_shard_gib,
    make_aside,
    put_in_place,
    read_json,
    router_keys,
    tokenizer_of,
    undone_on_failure,
)
from moejax.hf.maps import (
    ARCHS,
    FLOAT32,
    arch_of,
    copies,
    hf_config,
    model_config,
    real,
    weight_map,
)
from moejax.moe import quant
from moejax.run import state
from moejax.run.checkpoint import Checkpoints, path_name, read_params

HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "special_tokens_map.json", "tokenizer.model", "vocab.json",
            "merges.txt")


def moejax_config(hf: dict, tokenizer: str, mesh: dict):
    config = config_lib.defaults()
    config.model.update(model_config(hf))
    # The default sequence length, unless the model's positions end before it (a window does
    # not shorten them: longer sequences attend within it).
    config.data.update(tokenizer=tokenizer,
                       seq_len=min(config.data.seq_len, config.model.max_seq_len))
    # Fine-tuning defaults: a small constant-ish learning rate, no decay of released weights.
    config.train.update(lr=1e-5, warmup_steps=10, weight_decay=0.0, steps=1000,
                        balance_coef=real(hf, "router_aux_loss_coef", 0.0, positive=False),
                        z_coef=real(hf, "router_z_loss_coef", 0.0, positive=False))
    config.mesh.update({a: 1 for a in parallel.AXES})
    config.mesh.update(mesh or {"fsdp": -1})
    return config


# --- from-hf -----------------------------------------------------------------------------

def resolve(src: str) -> str:
    """A local folder, or the hub name's files downloaded (cached) by huggingface_hub."""
    if os.path.isdir(src):
        if not os.path.exists(os.path.join(src, "config.json")):
            raise ConfigError(f"SRC={src!r}: no config.json in it; allowed: a folder that "
                              "save_pretrained wrote, or a hub name like org/model")
        return src
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", src) or os.path.exists(src):
        raise ConfigError(f"SRC={src!r}: not a folder; allowed: a local folder with "
                          "config.json + *.safetensors, or a hub name like org/model")
    import huggingface_hub

    try:
        # Mistral's repositories also hold its own format's consolidated*.safetensors,
        # which the index does not name.
        return huggingface_hub.snapshot_download(
            src, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt"],
            ignore_patterns=["consolidated*"])
    except Exception as e:  # offline, gated or misspelled: all mean this SRC cannot be had
        raise ConfigError(f"SRC={src!r}: cannot download ({config_lib.first_line(e)}); "
                          "allowed: a local folder or a hub name you can access") from None


def from_hf(src: str, workdir: str, mesh: dict | None = None) -> str:
    """Convert SRC into a moejax run in workdir (a new or empty folder); returns the config
    file's path. Everything SRC holds is checked before anything is written; what a failure
    while writing (a full disk) leaves is removed."""
    folder = resolve(src)
    hf = read_json(os.path.join(folder, "config.json"))
    arch = ARCHS[arch_of(hf)]
    check_new_workdir(workdir)
    hf_dir = os.path.join(os.path.abspath(workdir), "hf")
    config = moejax_config(hf, tokenizer_of(folder, hf_dir), mesh)
    router = router_state(folder, config)
    sizes = parallel.mesh_sizes(config.mesh, jax.device_count())
    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    config.data.batch_size = -(-config.data.batch_size // shards) * shards
    config_lib.validate(config, jax.device_count())
    tensors = Tensors(folder)
    qc = hf.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "fp8":  # DeepSeek's block FP8
        tensors = BlockFP8(tensors, qc)
    elif isinstance(qc, dict) and qc.get("quant_method") == "mxfp4":  # gpt-oss's experts
        tensors = mxfp4.Dequantized(tensors, qc)
    elif "quantization_config" in hf:  # compressed-tensors: dequantized as it is read
        tensors = compressed.Dequantized(tensors, qc)
    mesh = parallel.make_mesh(sizes)
    setup = state.setup(config, mesh)
    wmap = weight_map(arch, config.model, setup.abstract["params"], hf)
    check_tensors(wmap, setup.abstract["params"], tensors, folder, copies(config.model))
    existed = os.path.isdir(workdir)
    if jax.process_count() > 1:  # all have looked at the workdir before any writes to it
        multihost_utils.sync_global_devices("from-hf: inputs checked")
    config_lib.check_workdir(workdir)

    def load(path, a):
        """One parameter, made a layer at a time: the host holds one layer's tensors for its
        own devices (make_array_from_callback gathers every local shard before copying), and
        reads each of them once, however many of its devices take a slice."""
        lead, part = wmap[path_name(path)]

        def read(ids):  # one layer (of one expert) of this weight, in our layout
            names, ours, _ = part(*ids)
            theirs = [tensors.get(n) for n in names]
            for n, t in zip(names, theirs, strict=True):
                if not np.isfinite(t).all():
                    raise ConfigError(f"{folder}: tensor {n} holds NaN or inf; allowed: "
                                      "finite weights")
            return ours(*theirs).astype(a.dtype)

        if not lead:
            whole = functools.cache(read)
            return jax.make_array_from_callback(a.shape, a.sharding, lambda i: whole(())[i])
        spec = (*a.sharding.spec, *(None,) * (a.ndim - len(a.sharding.spec)))
        one_layer = NamedSharding(mesh, P(*spec[1:]))  # the layer axis is never split

        def layer(r):
            once = functools.cache(read)  # shared by this host's devices, gone after the layer

            def shard(index):  # this device's slice of the layer (of its experts)
                if len(lead) == 1:
                    return once((r,))[index]
                return np.stack([once((r, e))[index[1:]] for e in range(lead[1])[index[0]]])

            return jax.make_array_from_callback(a.shape[1:], one_layer, shard)

        out = jax.jit(lambda: jnp.zeros(a.shape, a.dtype), out_shardings=a.sharding)()
        put = jax.jit(lambda out, x, r: jax.lax.dynamic_update_index_in_dim(out, x, r, 0),
                      out_shardings=a.sharding, donate_argnums=0)
        for r in range(lead[0]):
            out = put(out, layer(r), r)
        return out

    config_path = os.path.join(workdir, "config.py")
    with undone_on_failure(workdir, existed):
        params = jax.tree_util.tree_map_with_path(load, setup.abstract["params"])
        opt_state = jax.jit(setup.tx.init, out_shardings=setup.shardings["opt_state"])(params)
        with contextlib.closing(Checkpoints(workdir, config.train.keep_checkpoints,
                                            keep_best=False)) as ckpt:
            ckpt.save(0, {"params": params, "opt_state": opt_state},
                      {"step": 0, "tokens_seen": 0})
        if jax.process_index() == 0:
            os.makedirs(hf_dir)
            for name in HF_FILES:
                if os.path.exists(os.path.join(folder, name)):
                    shutil.copyfile(os.path.join(folder, name), os.path.join(hf_dir, name))
            with open(config_path, "w") as f:
                f.write(CONFIG_FILE.format(src=src, workdir=workdir, path=config_path,
                                           config=pprint.pformat(config.to_dict(), width=96,
                                                                 sort_dicts=False)))
            with open(os.path.join(workdir, "config.json"), "w") as f:  # last: the run is whole
                f.write(config.to_json_best_effort(indent=2))
    if router:
        print(router)
    return config_path


def router_state(folder: str, config) -> str | None:
    """Set the model keys that move the router's bias in training from SRC's ROUTER_JSON, if
    it has one (a moejax export's); returns the line that says so."""
    keys = router_keys(folder)
    if not keys:
        return None
    if keys["router_score"] != config.model.router_score:
        raise ConfigError(f"{os.path.join(folder, ROUTER_JSON)}: router_score="
                          f"{keys['router_score']!r}: config.json's architecture routes by "
                          f"{config.model.router_score}; allowed: {config.model.router_score}")
    config.model.bias_rate = keys["bias_rate"]
    has_file = os.path.exists(os.path.join(folder, ROUTER_FILE))
    return (f"router state from {ROUTER_JSON}: bias_rate {keys['bias_rate']:g}"
            + (f", each MoE layer's selection bias from {ROUTER_FILE}" if has_file else ""))


def check_tensors(wmap, abstract, tensors: Tensors, folder: str, copied: dict | None = None):
    """Every tensor the model needs is there with its shape, and none is left over (a tensor
    moejax would ignore is a computation it would get wrong), each a float; the `copied`
    ones ({copy: original}, maps.copies) equal their originals. Headers only, but for those."""
    want = {}
    for path, a in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        lead, part = wmap[path_name(path)]
        one = jax.ShapeDtypeStruct(a.shape[len(lead):], a.dtype)
        shapes = [s.shape for s in jax.eval_shape(part(*(0,) * len(lead))[2], one)]
        for ids in np.ndindex(*lead):
            for n, shape in zip(part(*ids)[0], shapes, strict=True):
                want[n] = path_name(path), shape
    for copy, original in (copied or {}).items():
        want[copy] = f"a copy of {original}", want[original][1]
    for n, (ours, shape) in want.items():
        if n not in tensors.files:
            raise ConfigError(f"{folder}: tensor {n} (for {ours}) is missing; allowed: a "
                              "complete checkpoint of the architecture in config.json")
        if tensors.shape(n) != shape:
            raise ConfigError(f"{folder}: tensor {n} is {list(tensors.shape(n))}, config.json "
                              f"makes it {list(shape)}; allowed: the checkpoint of this config")
        if tensors.dtype(n) not in FLOATS:
            raise ConfigError(f"{folder}: tensor {n} is {tensors.dtype(n)}; allowed: a "
                              f"weight's dtypes, {', '.join(FLOATS)}")
    if extra := sorted(tensors.files.keys() - want.keys()):
        raise ConfigError(f"{folder}: tensor {extra[0]} has no place in the moejax model "
                          f"({len(extra)} such); allowed: the tensors of "
                          "the architecture in config.json only")
    for copy, original in (copied or {}).items():
        if not same_tensor(tensors, copy, original):
            raise ConfigError(f"{folder}: tensor {copy} differs from {original}; allowed: "
                              "the multi-token prediction layer's copy of the model's own "
                              "(moejax keeps one)")


def same_tensor(tensors, a: str, b: str, rows: int = 4096) -> bool:
    """Whether tensors a and b hold the same values, compared a slice of rows at a time."""
    if (tensors.dtype(a), tensors.shape(a)) != (tensors.dtype(b), tensors.shape(b)):
        return False
    base = tensors
    while not isinstance(base, Tensors):  # a dequantizing view: the copies are plain floats
        base = base.tensors
    if a not in base.files or b not in base.files:
        return np.array_equal(tensors.get(a), tensors.get(b))
    with safe_open(base.files[a], "np") as fa, safe_open(base.files[b], "np") as fb:
        total = tensors.shape(a)[0] if tensors.shape(a) else 0
        if not total:
            return np.array_equal(fa.get_tensor(a), fb.get_tensor(b))
        for start in range(0, total, rows):
            stop = min(start + rows, total)
            if not np.array_equal(fa.get_slice(a)[start:stop], fb.get_slice(b)[start:stop]):
                return False
    return True


CONFIG_FILE = '''"""Converted from {src} by `python -m moejax.convert from-hf`.

Fine-tune (resumes from the converted step 0) or sample:
  python -m moejax.train --config {path} --workdir {workdir} [--config.a.b=v]
  python -m moejax.generate --workdir {workdir} --prompt "..."
"""

import ml_collections


def get_config(arg=None):
    return ml_collections.ConfigDict({config})
'''


# --- to-hf -------------------------------------------------------------------------------

def to_hf(workdir: str, out: str, dtype: str | None = None, shard_gib: float = 4.0,
          quantize: str = "none", overwrite: bool = False) -> list:
    """Write the newest checkpoint of workdir to the folder `out`, its routed experts
    weight-only `quantize`d (none | int8 | int4); returns the files written. They are written
    into a folder beside `out` and renamed into place whole: `out` new or empty, or with
    `overwrite` an earlier export, replaced whole (never a mix of two models)."""

    if jax.process_count() > 1:  # every tensor is fetched whole from the devices
        raise ConfigError("to-hf: runs on one host (it fetches each tensor whole); allowed: "
                          "one process, with the host's devices")
    check_shard_gib(shard_gib)
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype={dtype!r}: unknown; allowed: float32, bfloat16, float16")
    if quantize not in ("none", *quant.WEIGHT_ONLY):
        raise ConfigError(f"--quantize={quantize!r}: unknown; allowed: none, "
                          + ", ".join(quant.WEIGHT_ONLY))
    target = check_out(out, workdir, overwrite)
    config = config_lib.run_config(workdir)
    saved_path = os.path.join(workdir, "hf", "config.json")
    saved = read_json(saved_path) if os.path.exists(saved_path) else None
    # A quantized release without a dtype (gpt-oss's MXFP4) keeps its other weights in
    # bfloat16, which holds its dequantized experts exactly.
    given = (saved or {}).get("dtype") or (saved or {}).get("torch_dtype")
    dtype = dtype or given or ("bfloat16" if "quantization_config" in (saved or {}) else
                               "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"{saved_path}: dtype={dtype!r}: unknown; allowed: --dtype float32, "
                          "bfloat16 or float16")
    hf = hf_config(config, dtype, saved)
    hf.pop("quantization_config", None)  # an imported one's: these weights are ours
    aside = make_aside(target, out)  # now: an OUT that cannot be written fails before the work
    try:
        files, total, step, quantizer = write_export(aside, workdir, config, hf, dtype,
                                                     shard_gib, quantize)
        put_in_place(aside, target)
    except (OSError, SafetensorError) as e:  # a full disk, a folder taken away
        why = getattr(e, "strerror", None) or first_line(e)
        what = "nothing was changed there" if os.path.isdir(target) else "nothing was written"
        raise ConfigError(f"OUT={out!r}: cannot write ({why}); {what}; allowed: a folder this "
                          "user can write, on a disk with room for the export") from None
    finally:
        shutil.rmtree(aside, ignore_errors=True)  # gone if it was renamed into place
    print(f"wrote step {step} of {workdir} to {out}: {len(files)} safetensors file(s), "
          f"{total / 2**20:.1f} MiB ({dtype}), config.json ({hf['architectures'][0]})")
    if os.path.exists(os.path.join(out, ROUTER_FILE)):
        print(f"router state: the selection bias in {ROUTER_FILE}, bias_rate in {ROUTER_JSON}; "
              f"transformers reads neither ({hf['architectures'][0]} has no such tensor) and "
              "routes without the bias; from-hf reads both back")
    elif config.model.bias_rate > 0:
        print(f"router state: bias_rate {config.model.bias_rate:g} in {ROUTER_JSON}, for "
              "from-hf (the bias itself is in the model's files)")
    if quantizer:
        print(quantizer.line())
    return files


def write_export(folder: str, workdir: str, config, hf: dict, dtype: str, shard_gib: float,
                 quantize: str):
    """The export in `folder`: (its safetensors files, their bytes, the step, the quantizer)."""
    arch = ARCHS[hf["architectures"][0]]
    mesh = parallel.make_mesh({"fsdp": jax.device_count()})
    setup = state.setup(config, mesh)
    # As generate reads: the newest intact step, else best/; a step its run deletes meanwhile
    # is no loss.
    step, params = read_params(workdir, "--workdir", setup.abstract["params"])
    wmap = weight_map(arch, config.model, setup.abstract["params"], hf)
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16,
                "float16": np.float16}[dtype]
    quantizer = compressed.Quantizer(quantize, np_dtype) if quantize != "none" else None
    copied = {}  # original -> its copies (DeepSeek's MTP layers)
    for copy, original in copies(config.model).items():
        copied.setdefault(original, []).append(copy)

    def tensors():  # (HF name, numpy array), one fetched from the devices at a time
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
            name = path_name(path)
            lead, part = wmap[name]
            # routed experts: a [layers, experts] lead, or [experts] in an MTP module's block
            expert = len(lead) == 2 or (name.startswith("mtp.") and len(lead) == 1)
            for ids in np.ndindex(*lead):
                names, _, theirs = part(*ids)
                w = np.asarray(jax.device_get(x[ids] if ids else x))
                for n, t in zip(names, theirs(w), strict=True):
                    if n.endswith(FLOAT32):  # DeepSeek's correction bias: float32 always
                        ts = {n: t.astype(np.float32)}
                    else:  # quantized from float32
                        ts = quantizer(n, t, expert) if quantizer else {n: t.astype(np_dtype)}
                    for k, v in ts.items():
                        for c in (k, *copied.get(k, ())):
                            yield c, np.ascontiguousarray(v)

    files, chunk, size, weight_map_, router = [], {}, 0, {}, {}
    limit = int(shard_gib * 2**30)

    def flush():
        nonlocal chunk, size
        if chunk:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(chunk, os.path.join(folder, name), metadata={"format": "pt"})
            files.append(name)
            weight_map_.update({n: name for n in chunk})
        chunk, size = {}, 0

    for n, t in tensors():
        if n.endswith(OWN_BIAS):  # the architecture has no such tensor: beside the model's
            router[n] = t
            continue
        if size and size + t.nbytes > limit:
            flush()
        chunk[n] = t
        size += t.nbytes
    flush()
    total = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    names = {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in
             enumerate(files)}
    if len(files) == 1:
        names = {files[0]: "model.safetensors"}
    for old, new in names.items():
        os.replace(os.path.join(folder, old), os.path.join(folder, new))
    if len(files) > 1:
        with open(os.path.join(folder, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total},
                       "weight_map": {n: names[f] for n, f in sorted(weight_map_.items())}},
                      f, indent=2)
    if router:
        save_file(router, os.path.join(folder, ROUTER_FILE), metadata={"format": "pt"})
    if config.model.bias_rate > 0 or router:
        with open(os.path.join(folder, ROUTER_JSON), "w") as f:
            json.dump({"bias_rate": config.model.bias_rate,
                       "router_score": config.model.router_score}, f, indent=2)
    if quantizer:
        hf["quantization_config"] = quantizer.config()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    for name in HF_FILES[1:]:  # generation config and tokenizer, as imported
        if os.path.exists(os.path.join(workdir, "hf", name)):
            shutil.copyfile(os.path.join(workdir, "hf", name), os.path.join(folder, name))
    return [names[f] for f in files], total, step, quantizer
