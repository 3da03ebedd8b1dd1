"""Weights in from and out to Hugging Face transformers: Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE.

  python -m moejax.convert from-hf SRC --workdir DIR [--mesh fsdp=8,expert=8]
  python -m moejax.convert to-hf --workdir DIR OUT [--dtype bfloat16] [--shard_gib 4]

from-hf: SRC is a local folder with config.json and *.safetensors, or a hub name (fetched with
huggingface_hub). DIR gets config.py (the model as a moejax config, fine-tuning defaults for
the rest), config.json, hf/ (SRC's config and tokenizer files) and checkpoints/0 (the weights
and a fresh AdamW state), which `train` resumes from and `generate` samples from. Each weight
is built on the devices in its training layout one layer at a time, every device reading only
its own slice of that layer's tensors: host memory holds one layer of one weight, never the
model. Run it on every host of a pod, like `train`.

to-hf: the newest checkpoint of DIR as config.json + *.safetensors files of at most
--shard_gib each (+ model.safetensors.index.json), which AutoModelForCausalLM loads; one
tensor is fetched from the devices at a time, one file's tensors are held at a time.
"""

import argparse
import contextlib
import dataclasses
import glob
import importlib.util
import json
import os
import pprint
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (numpy learns bfloat16, which safetensors' numpy reader needs)
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import save_file

from moejax import config_lib, parallel, state
from moejax.checkpoint import Checkpoints, path_name
from moejax.config_lib import ConfigError
from moejax.model import layer_stacks

HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")


@dataclasses.dataclass(frozen=True)
class Arch:
    model_type: str
    moe: str  # the MoE block of a layer
    experts: tuple[str, str, str]  # an expert's gate, up and down projections
    qk_norm: str  # moejax model.qk_norm


ARCHS = {
    "MixtralForCausalLM": Arch("mixtral", "block_sparse_moe", ("w1", "w3", "w2"), "none"),
    "Qwen3MoeForCausalLM": Arch("qwen3_moe", "mlp", ("gate_proj", "up_proj", "down_proj"),
                                "head"),
    "OlmoeForCausalLM": Arch("olmoe", "mlp", ("gate_proj", "up_proj", "down_proj"), "all"),
    "Qwen2MoeForCausalLM": Arch("qwen2_moe", "mlp", ("gate_proj", "up_proj", "down_proj"),
                                "none"),
}


def arch_of(hf: dict) -> str:
    name = (hf.get("architectures") or ["?"])[0]
    if name not in ARCHS:
        raise ConfigError(f"config.json architectures={name!r}: unknown; allowed: "
                          f"{', '.join(ARCHS)}")
    return name


def model_config(hf: dict) -> dict:
    """The moejax model keys computing what transformers computes for this config.json; a
    feature moejax lacks fails with one line naming its key."""
    name = arch_of(hf)
    arch = ARCHS[name]

    def refuse(key, allowed):
        raise ConfigError(f"config.json {key}={hf.get(key)!r}: not supported for {name}; "
                          f"allowed: {allowed}")

    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        refuse("rope_parameters", "rope_type default (no scaling)")
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "silu")
    for key in ("attention_bias", "clip_qkv"):
        if hf.get(key):
            refuse(key, "null / false")
    if hf.get("mlp_only_layers"):
        refuse("mlp_only_layers", "[]")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if arch.qk_norm == "all" and head_dim * heads != hf["hidden_size"]:
        refuse("head_dim", "hidden_size / num_attention_heads")
    max_len = hf.get("max_position_embeddings", 4096)
    # A sliding window no sequence can exceed is plain causal attention: cap the length there.
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    num_experts = hf.get("num_local_experts") or hf.get("num_experts")
    d_ff = hf.get("moe_intermediate_size") or hf["intermediate_size"]
    shared = hf.get("shared_expert_intermediate_size", 0) if name == "Qwen2MoeForCausalLM" else 0
    if shared % d_ff:  # moejax's shared experts are d_ff wide each
        refuse("shared_expert_intermediate_size", f"a multiple of moe_intermediate_size={d_ff}")
    return dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
        d_ff=d_ff,
        dense_d_ff=hf["intermediate_size"] if "moe_intermediate_size" in hf else 0,
        activation="swiglu",
        rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10_000.0),
        norm_eps=hf.get("rms_norm_eps", 1e-6), qk_norm=arch.qk_norm,
        max_seq_len=min(max_len, window or max_len),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        num_experts=num_experts, top_k=hf["num_experts_per_tok"],
        moe_every=hf.get("decoder_sparse_step", 1), first_dense_layers=0,
        renormalize=name == "MixtralForCausalLM" or bool(hf.get("norm_topk_prob", False)),
        # transformers drops no token: dropless in training, and at eval a capacity of every
        # token of the group (C = T when eval_capacity_factor = E / k).
        dropless=True, eval_capacity_factor=num_experts / hf["num_experts_per_tok"],
        router_score="softmax", routing="tokens", bias_rate=0.0,
        num_shared_experts=shared // d_ff, shared_gate=bool(shared),
        qkv_bias=name == "Qwen2MoeForCausalLM" and bool(hf.get("qkv_bias", True)), jitter_eps=0.0,
    )


def base_config():
    """configs/tiny.py next to the package: the data and train defaults of every run."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "configs", "tiny.py")
    spec = importlib.util.spec_from_file_location("tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def moejax_config(hf: dict, tokenizer: str, mesh: dict):
    config = base_config()
    config.model.update(model_config(hf))
    config.data.update(tokenizer=tokenizer)
    # Fine-tuning defaults: a small constant-ish learning rate, no decay of released weights.
    config.train.update(lr=1e-5, warmup_steps=10, weight_decay=0.0, steps=1000,
                        balance_coef=float(hf.get("router_aux_loss_coef") or 0.0),
                        z_coef=float(hf.get("router_z_loss_coef") or 0.0))
    config.mesh.update({a: 1 for a in parallel.AXES})
    config.mesh.update(mesh or {"fsdp": -1})
    return config


# --- the tensor map ----------------------------------------------------------------------

def block_tensors(arch: Arch, cfg, layer: int, name: str, expert: int | None):
    """HF tensors making block weight `name` of `layer` (of one expert, for expert weights):
    (their names, ours from theirs, theirs from ours)."""
    d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    p = f"model.layers.{layer}"
    a = f"{p}.self_attn"

    def heads(w, n):  # [n * hd, d] -> [d, n, hd]
        return w.reshape(n, hd, d).transpose(2, 0, 1)

    def unheads(w):  # [d, n, hd] -> [n * hd, d]
        return w.transpose(1, 2, 0).reshape(-1, d)

    def ffn(prefix):  # w_in [d, 2, f] from gate and up [f, d]; w_out [f, d] from down [d, f]
        gate, up, down = (f"{prefix}.{n}.weight" for n in arch.experts)
        return {"ffn.w_in": ([gate, up], lambda g, u: np.stack([g.T, u.T], 1),
                             lambda w: [w[:, 0].T, w[:, 1].T]),
                "ffn.w_out": ([down], lambda w: w.T, lambda w: [w.T])}

    table = {
        "attn_norm.scale": ([f"{p}.input_layernorm.weight"], None, None),
        "ffn_norm.scale": ([f"{p}.post_attention_layernorm.weight"], None, None),
        "attn.q": ([f"{a}.q_proj.weight"], lambda w: heads(w, h), lambda w: [unheads(w)]),
        "attn.kv": ([f"{a}.k_proj.weight", f"{a}.v_proj.weight"],
                    lambda k, v: np.stack([heads(k, kv), heads(v, kv)], 1),
                    lambda w: [unheads(w[:, 0]), unheads(w[:, 1])]),
        "attn.out": ([f"{a}.o_proj.weight"], lambda w: w.T.reshape(h, hd, d),
                     lambda w: [w.reshape(h * hd, d).T]),
        # Qwen3: [hd], shared by the heads; OLMoE: [heads * hd], over the whole projection.
        "attn.q_norm.scale": ([f"{a}.q_norm.weight"], lambda w: w.reshape(-1, hd).squeeze(0)
                              if cfg.qk_norm == "head" else w.reshape(h, hd),
                              lambda w: [w.reshape(-1)]),
        "attn.k_norm.scale": ([f"{a}.k_norm.weight"], lambda w: w.reshape(-1, hd).squeeze(0)
                              if cfg.qk_norm == "head" else w.reshape(kv, hd),
                              lambda w: [w.reshape(-1)]),
        "ffn.router": ([f"{p}.{arch.moe}.gate.weight"], lambda w: w.T, lambda w: [w.T]),
        # Qwen2-MoE: biases of q, k, v; the shared expert and its gate [1, d]
        "attn.q_bias": ([f"{a}.q_proj.bias"], lambda b: b.reshape(h, hd),
                        lambda b: [b.reshape(-1)]),
        "attn.kv_bias": ([f"{a}.k_proj.bias", f"{a}.v_proj.bias"],
                         lambda k, v: np.stack([k.reshape(kv, hd), v.reshape(kv, hd)]),
                         lambda b: [b[0].reshape(-1), b[1].reshape(-1)]),
        "ffn.shared_gate": ([f"{p}.mlp.shared_expert_gate.weight"], lambda w: w.T,
                            lambda w: [w.T]),
    }
    shared = ffn(f"{p}.mlp.shared_expert")
    table.update({"ffn.shared_in": shared["ffn.w_in"], "ffn.shared_out": shared["ffn.w_out"]})
    table.update(ffn(f"{p}.{arch.moe}.experts.{expert}" if expert is not None else f"{p}.mlp"))
    names, ours, theirs = table[name]
    return names, ours or (lambda w: w), theirs or (lambda w: [w])


TOP = {  # weights outside the blocks: (HF name, ours from theirs, theirs from ours)
    "embed": ("model.embed_tokens.weight", lambda w: w, lambda w: w),
    "unembed": ("lm_head.weight", lambda w: w.T, lambda w: w.T),
    "final_norm.scale": ("model.norm.weight", lambda w: w, lambda w: w),
}


def weight_map(arch: Arch, cfg, abstract_params):
    """name -> (leading dims, part(*leading ids) -> (HF names, ours from theirs, theirs from
    ours)) for every moejax parameter. Leading dims: () outside the blocks, (layers,) for a
    block's weights, (layers, experts) for its experts'."""
    firsts, first = [], 0
    for repeats, period in layer_stacks(cfg):
        firsts.append((first, period))
        first += repeats * period
    out = {}
    for path, a in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        name = path_name(path)
        if name in TOP:
            hf_name, ours, theirs = TOP[name]
            out[name] = ((), lambda hf_name=hf_name, ours=ours, theirs=theirs:
                         ([hf_name], ours, lambda w: [theirs(w)]))
            continue
        _, s, _, j, local = name.split(".", 4)  # stacks.S.blocks.J.local
        start, period = firsts[int(s)]
        # [L, E, d, 2, f] and [L, E, f, d] are experts; a dense FFN's lack the E axis.
        expert = a.ndim == {"ffn.w_in": 5, "ffn.w_out": 4}.get(local)
        lead = a.shape[:2] if expert else a.shape[:1]

        def part(r, e=None, start=start, period=period, j=int(j), local=local):
            return block_tensors(arch, cfg, start + r * period + j, local, e)

        out[name] = (lead, part)
    return out


# --- from-hf -----------------------------------------------------------------------------

class Tensors:
    """The safetensors files of a checkpoint folder, opened lazily: name -> one tensor."""

    def __init__(self, folder: str):
        self.files = {}
        paths = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not paths:
            raise ConfigError(f"{folder}: no *.safetensors files; allowed: a folder that "
                              "save_pretrained wrote (safetensors, not .bin)")
        for path in paths:
            with safe_open(path, "np") as f:
                for name in f.keys():
                    self.files[name] = path

    def shape(self, name):
        with safe_open(self.files[name], "np") as f:
            return tuple(f.get_slice(name).get_shape())

    def get(self, name) -> np.ndarray:
        with safe_open(self.files[name], "np") as f:  # memory-mapped: reads this tensor only
            return f.get_tensor(name)


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
        return huggingface_hub.snapshot_download(
            src, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt"])
    except Exception as e:  # offline, gated or misspelled: all mean this SRC cannot be had
        raise ConfigError(f"SRC={src!r}: cannot download ({config_lib.first_line(e)}); "
                          "allowed: a local folder or a hub name you can access") from None


def from_hf(src: str, workdir: str, mesh: dict | None = None) -> str:
    """Convert SRC into a moejax run in workdir; returns the config file's path."""
    folder = resolve(src)
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    arch = ARCHS[arch_of(hf)]
    config_lib.check_workdir(workdir)
    with contextlib.closing(Checkpoints(workdir, 1, False)) as ckpt:
        taken = ckpt.latest_step() is not None
    if taken:
        raise ConfigError(f"--workdir={workdir!r}: already holds a checkpoint; allowed: a new "
                          "or empty folder (a good checkpoint is never overwritten)")
    hf_dir = os.path.join(os.path.abspath(workdir), "hf")
    os.makedirs(hf_dir, exist_ok=True)
    for name in HF_FILES:
        if os.path.exists(os.path.join(folder, name)):
            shutil.copy(os.path.join(folder, name), hf_dir)
    tokenizer = hf_dir if os.path.exists(os.path.join(hf_dir, "tokenizer.json")) else "byte"
    config = moejax_config(hf, tokenizer, mesh)
    sizes = parallel.mesh_sizes(config.mesh, jax.device_count())
    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    config.data.batch_size = -(-config.data.batch_size // shards) * shards
    config_lib.validate(config, jax.device_count())
    tensors = Tensors(folder)
    mesh = parallel.make_mesh(sizes)
    setup = state.setup(config, mesh)
    wmap = weight_map(arch, config.model, setup.abstract["params"])
    check_tensors(wmap, setup.abstract["params"], tensors, folder)

    def load(path, a):
        """One parameter, made a layer at a time: the host holds one layer's tensors for its
        own devices (make_array_from_callback gathers every local shard before copying)."""
        lead, part = wmap[path_name(path)]

        def read(ids, index):
            names, ours, _ = part(*ids)
            return ours(*(tensors.get(n) for n in names)).astype(a.dtype)[index]

        if not lead:
            return jax.make_array_from_callback(a.shape, a.sharding, lambda i: read((), i))
        spec = (*a.sharding.spec, *(None,) * (a.ndim - len(a.sharding.spec)))
        one_layer = NamedSharding(mesh, P(*spec[1:]))  # the layer axis is never split

        def layer(r):
            def shard(index):  # this device's experts, one at a time
                if len(lead) == 1:
                    return read((r,), index)
                return np.stack([read((r, e), index[1:]) for e in range(lead[1])[index[0]]])

            return jax.make_array_from_callback(a.shape[1:], one_layer, shard)

        out = jax.jit(lambda: jnp.zeros(a.shape, a.dtype), out_shardings=a.sharding)()
        put = jax.jit(lambda out, x, r: jax.lax.dynamic_update_index_in_dim(out, x, r, 0),
                      out_shardings=a.sharding, donate_argnums=0)
        for r in range(lead[0]):
            out = put(out, layer(r), r)
        return out

    params = jax.tree_util.tree_map_with_path(load, setup.abstract["params"])
    opt_state = jax.jit(setup.tx.init, out_shardings=setup.shardings["opt_state"])(params)
    ckpt = Checkpoints(workdir, config.train.keep_checkpoints, keep_best=False)
    ckpt.save(0, {"params": params, "opt_state": opt_state}, {"step": 0, "tokens_seen": 0})
    ckpt.close()
    config_path = os.path.join(workdir, "config.py")
    if jax.process_index() == 0:
        with open(config_path, "w") as f:
            f.write(CONFIG_FILE.format(src=src, workdir=workdir, path=config_path,
                                       config=pprint.pformat(config.to_dict(), width=96,
                                                             sort_dicts=False)))
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    return config_path


def check_tensors(wmap, abstract, tensors: Tensors, folder: str):
    """Every tensor the model needs is there with its shape, and none is left over (a tensor
    moejax would ignore is a computation it would get wrong). Headers only: reads no data."""
    want = {}
    for path, a in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        lead, part = wmap[path_name(path)]
        one = jax.ShapeDtypeStruct(a.shape[len(lead):], a.dtype)
        shapes = [s.shape for s in jax.eval_shape(part(*(0,) * len(lead))[2], one)]
        for ids in np.ndindex(*lead):
            for n, shape in zip(part(*ids)[0], shapes, strict=True):
                want[n] = path_name(path), shape
    for n, (ours, shape) in want.items():
        if n not in tensors.files:
            raise ConfigError(f"{folder}: tensor {n} (for {ours}) is missing; allowed: a "
                              "complete checkpoint of the architecture in config.json")
        if tensors.shape(n) != shape:
            raise ConfigError(f"{folder}: tensor {n} is {list(tensors.shape(n))}, config.json "
                              f"makes it {list(shape)}; allowed: the checkpoint of this config")
    if extra := sorted(tensors.files.keys() - want.keys()):
        raise ConfigError(f"{folder}: tensor {extra[0]} has no place in the moejax model "
                          f"({len(extra)} such); allowed: the tensors of "
                          "the architecture in config.json only")


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

def hf_config(config, dtype: str, saved: dict | None) -> dict:
    """config.json for the model of `config`: the imported one's if there was one (its token
    ids and other fields survive), with every field the weights depend on set from ours."""
    m = config.model
    if m.num_shared_experts:
        name = "Qwen2MoeForCausalLM"
    elif m.qk_norm == "head":
        name = "Qwen3MoeForCausalLM"
    elif m.qk_norm == "all":
        name = "OlmoeForCausalLM"
    else:
        name = "MixtralForCausalLM"

    def need(ok, key, value, allowed):
        if not ok:
            raise ConfigError(f"model.{key}={value!r}: {name} cannot compute it; allowed: "
                              f"{allowed}")

    need(m.num_experts > 0, "num_experts", m.num_experts, "> 0 (an MoE)")
    need(m.activation == "swiglu", "activation", m.activation, "swiglu")
    need(m.router_score == "softmax" and m.routing == "tokens", "router_score",
         m.router_score, "softmax with routing=tokens")
    need(m.bias_rate == 0, "bias_rate", m.bias_rate, "0")
    need(bool(m.shared_gate) == bool(m.num_shared_experts), "shared_gate", m.shared_gate,
         "True exactly when num_shared_experts > 0 (Qwen2-MoE)")
    need(not m.qkv_bias or name == "Qwen2MoeForCausalLM", "qkv_bias", m.qkv_bias,
         "False unless num_shared_experts > 0 (Qwen2-MoE)")
    need(m.qk_norm == "none" or name != "Qwen2MoeForCausalLM", "qk_norm", m.qk_norm,
         "none for Qwen2-MoE (num_shared_experts > 0)")
    need(m.first_dense_layers == 0, "first_dense_layers", m.first_dense_layers, "0")
    need(m.moe_every == 1 or name.startswith("Qwen"), "moe_every", m.moe_every,
         "1 (Qwen2/3-MoE: any)")
    need(m.renormalize or name != "MixtralForCausalLM", "renormalize", m.renormalize,
         "True for Mixtral (a model without qk_norm)")
    out = dict(saved or {})
    out.update(architectures=[name], model_type=ARCHS[name].model_type,
               vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.num_layers,
               num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads or m.num_heads,
               head_dim=m.head_dim, num_experts_per_tok=m.top_k, rms_norm_eps=m.norm_eps,
               rope_theta=m.rope_theta, tie_word_embeddings=bool(m.tie_embeddings),
               hidden_act="silu", dtype=dtype, torch_dtype=dtype)
    out.setdefault("max_position_embeddings", m.max_seq_len)
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": m.rope_theta}
    out.pop("rope_scaling", None)
    if name == "MixtralForCausalLM":
        out.update(num_local_experts=m.num_experts, intermediate_size=m.d_ff)
    elif name.startswith("Qwen"):
        out.update(num_experts=m.num_experts, moe_intermediate_size=m.d_ff,
                   intermediate_size=m.dense_d_ff or m.d_ff, decoder_sparse_step=m.moe_every,
                   mlp_only_layers=[], norm_topk_prob=bool(m.renormalize))
        out.pop("num_local_experts", None)
        if name == "Qwen2MoeForCausalLM":
            out.update(shared_expert_intermediate_size=m.num_shared_experts * m.d_ff,
                       qkv_bias=bool(m.qkv_bias))
    else:
        out.update(num_experts=m.num_experts, intermediate_size=m.d_ff,
                   norm_topk_prob=bool(m.renormalize))
    return out


def restore_params(workdir: str, abstract):
    """The newest checkpoint's parameters only (not the optimizer state, twice their size)."""
    path = os.path.join(os.path.abspath(workdir), "checkpoints")
    mgr = ocp.CheckpointManager(path, item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    with contextlib.closing(mgr):
        step = mgr.latest_step()
        if step is None:
            raise ConfigError(f"--workdir={workdir!r}: no checkpoint in {path}; allowed: the "
                              "workdir of a run that saved one")
        target = {"params": abstract}
        out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))
    return out.state["params"], step


def to_hf(workdir: str, out: str, dtype: str | None = None, shard_gib: float = 4.0) -> list:
    """Write the newest checkpoint of workdir to `out`; returns the files written."""
    import ml_collections

    if jax.process_count() > 1:  # every tensor is fetched whole from the devices
        raise ConfigError("to-hf: runs on one host (it fetches each tensor whole); allowed: "
                          "one process, with the host's devices")
    if not os.path.exists(os.path.join(workdir, "config.json")):
        raise ConfigError(f"--workdir={workdir!r}: no config.json in it; allowed: the workdir "
                          "of a moejax run or conversion")
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    saved, saved_path = None, os.path.join(workdir, "hf", "config.json")
    if os.path.exists(saved_path):
        with open(saved_path) as f:
            saved = json.load(f)
    dtype = dtype or (saved or {}).get("dtype") or (saved or {}).get("torch_dtype") or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype={dtype!r}: unknown; allowed: float32, bfloat16, float16")
    hf = hf_config(config, dtype, saved)
    arch = ARCHS[hf["architectures"][0]]
    mesh = parallel.make_mesh({"fsdp": jax.device_count()})
    setup = state.setup(config, mesh)
    params, step = restore_params(workdir, setup.abstract["params"])
    wmap = weight_map(arch, config.model, setup.abstract["params"])
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16,
                "float16": np.float16}[dtype]
    os.makedirs(out, exist_ok=True)

    def tensors():  # (HF name, numpy array), one fetched from the devices at a time
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
            lead, part = wmap[path_name(path)]
            for ids in np.ndindex(*lead):
                names, _, theirs = part(*ids)
                w = np.asarray(jax.device_get(x[ids] if ids else x))
                for n, t in zip(names, theirs(w), strict=True):
                    yield n, np.ascontiguousarray(t.astype(np_dtype))

    files, chunk, size, weight_map_ = [], {}, 0, {}
    limit = int(shard_gib * 2**30)

    def flush():
        nonlocal chunk, size
        if chunk:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(chunk, os.path.join(out, name), metadata={"format": "pt"})
            files.append(name)
            weight_map_.update({n: name for n in chunk})
        chunk, size = {}, 0

    for n, t in tensors():
        if size and size + t.nbytes > limit:
            flush()
        chunk[n] = t
        size += t.nbytes
    flush()
    total = sum(os.path.getsize(os.path.join(out, f)) for f in files)
    names = {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in
             enumerate(files)}
    if len(files) == 1:
        names = {files[0]: "model.safetensors"}
    for old, new in names.items():
        os.replace(os.path.join(out, old), os.path.join(out, new))
    if len(files) > 1:
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total},
                       "weight_map": {n: names[f] for n, f in sorted(weight_map_.items())}},
                      f, indent=2)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    for name in HF_FILES[1:]:  # generation config and tokenizer, as imported
        if os.path.exists(os.path.join(workdir, "hf", name)):
            shutil.copy(os.path.join(workdir, "hf", name), out)
    print(f"wrote step {step} of {workdir} to {out}: {len(files)} safetensors file(s), "
          f"{total / 2**20:.1f} MiB ({dtype}), config.json ({hf['architectures'][0]})")
    return [names[f] for f in files]


def main(argv=None):
    from moejax.plan import parse_mesh

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("from-hf", help="a transformers checkpoint -> a moejax run")
    a.add_argument("src", help="local folder with config.json + *.safetensors, or a hub name")
    a.add_argument("--workdir", required=True)
    a.add_argument("--mesh", default="", help="layout of the written state, e.g. fsdp=8 "
                   "(default: fsdp over all devices); also the config's mesh")
    b = sub.add_parser("to-hf", help="a moejax run's newest checkpoint -> transformers")
    b.add_argument("out")
    b.add_argument("--workdir", required=True)
    b.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the "
                   "imported checkpoint's, else float32)")
    b.add_argument("--shard_gib", type=float, default=4.0, help="largest file, in GiB")
    args = p.parse_args(argv)
    config_lib.init_distributed(None, None, None)
    try:
        if args.command == "from-hf":
            mesh = parse_mesh(args.mesh) if args.mesh else None
            path = from_hf(args.src, args.workdir, mesh)
            print(f"wrote {args.workdir}: checkpoint 0 and {path}; fine-tune with\n"
                  f"  python -m moejax.train --config {path} --workdir {args.workdir}")
        else:
            to_hf(args.workdir, args.out, args.dtype, args.shard_gib)
    except (ConfigError, ValueError) as e:
        sys.exit(f"error: {config_lib.first_line(e)}")


if __name__ == "__main__":
    main()
