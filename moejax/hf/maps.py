"""How a transformers checkpoint maps onto moejax, per architecture: config.json <-> the model
config, and each HF tensor <-> a slice of one moejax parameter. Pure: no files, no devices
(moejax/convert.py does the reading and writing).

Our layouts: attention q [d, heads, hd], kv [d, 2, kv_heads, hd], out [heads, hd, d]; an FFN's
w_in [d, 2, f] (gate, then up) and w_out [f, d]; experts with a leading [E]; a block's weights
with a leading layer axis. transformers keeps Linear weights as [out, in].

DeepseekV3ForCausalLM (DeepSeek-V3/R1/V3.1, Kimi K2, Moonlight): multi-head latent attention
(moejax/model/mla.py; its rotary columns permuted from DeepSeek's interleaved pairs (2i, 2i+1)
to moejax's halves (i, i + r/2) where rope_interleave is true, which changes no score), sigmoid
routing with the correction bias, groups, dense first layers, shared experts, and the
multi-token prediction layers model.layers.{L + k}.* <-> mtp.k.* (their embed_tokens and
shared_head.head are copies of the model's: COPIES).
"""

import dataclasses
import math

import jax
import numpy as np

from moejax.config_lib import ConfigError
from moejax.model.transformer import layer_stacks
from moejax.run.checkpoint import path_name


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
    "DeepseekV3ForCausalLM": Arch("deepseek_v3", "mlp", ("gate_proj", "up_proj", "down_proj"),
                                  "none"),
}
DEEPSEEK = "DeepseekV3ForCausalLM"
# Tensors written float32 whatever the export's dtype: DeepSeek's release and transformers
# (_keep_in_fp32_modules) keep the router's correction bias so, as moejax does.
FLOAT32 = (".e_score_correction_bias",)


def arch_of(hf: dict) -> str:
    names = hf.get("architectures") or ["?"]
    name = names[0] if isinstance(names, list) else names
    if name not in ARCHS:
        raise ConfigError(f"config.json architectures={name!r}: unknown; allowed: "
                          f"{', '.join(ARCHS)}")
    return name


REQUIRED = object()


def integer(hf: dict, key: str, default=REQUIRED, low: int = 1):
    """config.json's `key`: an integer >= low (null or absent: `default`), else one line
    naming the key and its value. JSON's true is no integer here, nor is 32.0."""
    value = hf.get(key)
    if value is None:
        if default is REQUIRED:
            raise ConfigError(f"config.json {key}: missing; allowed: an integer >= {low} (a "
                              f"{arch_of(hf)} config.json has it)")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"config.json {key}={value!r}: not an integer >= {low}; allowed: "
                          f"an integer >= {low}")
    return value


def real(hf: dict, key: str, default, positive: bool = True, label: str = "") -> float:
    """config.json's `key` (`label` in messages, default the key): a finite number > 0
    (`positive`) or >= 0 (null or absent: `default`), else one line naming it and its value."""
    value = hf.get(key)
    if value is None:
        return default
    bound = "> 0" if positive else ">= 0"
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or value < 0 or (positive and value == 0)):
        raise ConfigError(f"config.json {label or key}={value!r}: not a finite number {bound}; "
                          f"allowed: a finite number {bound}")
    return float(value)


def flag(hf: dict, key: str, default: bool) -> bool:
    """config.json's `key`: true or false (null or absent: `default`); "false" is no false."""
    value = hf.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"config.json {key}={value!r}: not a boolean; allowed: true or "
                          "false")
    return value


def rope_of(hf: dict) -> tuple[str, dict]:
    """(the key it came from, the rotary embedding's parameters): rope_parameters
    (transformers 5) or rope_scaling (4), which must agree where both are given, with
    `type` read as `rope_type`."""
    given = {}
    for key in ("rope_parameters", "rope_scaling"):
        value = hf.get(key)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"config.json {key}={value!r}: not an object; allowed: null or "
                              '{"rope_type": "default", "rope_theta": ...}')
        if value:
            rope = {k: v for k, v in value.items() if k != "type"}
            rope["rope_type"] = value.get("rope_type", value.get("type", "default"))
            given[key] = rope
    if len(given) == 2:
        ours, old = given["rope_parameters"], given["rope_scaling"]
        if differ := sorted(k for k in ours.keys() & old.keys() if ours[k] != old[k]):
            raise ConfigError(
                f"config.json rope_scaling={hf['rope_scaling']!r}: disagrees with "
                f"rope_parameters={hf['rope_parameters']!r} ({differ[0]}); allowed: one of "
                "them, or both saying the same")
    key = next(iter(given), "rope_parameters")
    return key, given.get(key, {})


def model_config(hf: dict) -> dict:
    """The moejax model keys computing what transformers computes for this config.json; a
    feature moejax lacks, a missing key or a value of the wrong kind fails with one line
    naming its key."""
    name = arch_of(hf)
    arch = ARCHS[name]
    if name == DEEPSEEK:
        return deepseek_config(hf)

    def refuse(key, allowed):
        raise ConfigError(f"config.json {key}={hf.get(key)!r}: not supported for {name}; "
                          f"allowed: {allowed}")

    rope_key, rope = rope_of(hf)
    if rope.get("rope_type") not in (None, "default"):
        refuse(rope_key, "rope_type default (no scaling)")
    theta = real(hf, "rope_theta", None)
    inner = real(rope, "rope_theta", None, label=f"{rope_key}.rope_theta")
    if None not in (theta, inner) and theta != inner:
        raise ConfigError(f"config.json rope_theta={hf['rope_theta']!r}: disagrees with "
                          f"{rope_key}.rope_theta={rope['rope_theta']!r}; allowed: one of them, "
                          "or both the same")
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "silu")
    for key in ("attention_bias", "clip_qkv"):
        if hf.get(key):
            refuse(key, "null / false")
    if hf.get("mlp_only_layers"):
        refuse("mlp_only_layers", "[]")
    hidden, heads = integer(hf, "hidden_size"), integer(hf, "num_attention_heads")
    head_dim = integer(hf, "head_dim", None) or hidden // heads
    if arch.qk_norm == "all" and head_dim * heads != hidden:
        refuse("head_dim", "hidden_size / num_attention_heads")
    max_len = integer(hf, "max_position_embeddings", 4096)
    # A sliding window no sequence can exceed is plain causal attention: cap the length there.
    window = (integer(hf, "sliding_window", None, low=0) if flag(hf, "use_sliding_window", True)
              else None)  # 0: none
    experts_key = next((k for k in ("num_local_experts", "num_experts") if hf.get(k) is not None),
                       "num_local_experts" if name == "MixtralForCausalLM" else "num_experts")
    num_experts, top_k = integer(hf, experts_key), integer(hf, "num_experts_per_tok")
    intermediate = integer(hf, "intermediate_size")
    moe_d_ff = integer(hf, "moe_intermediate_size", None)
    d_ff = moe_d_ff or intermediate
    shared = (integer(hf, "shared_expert_intermediate_size", 0, low=0)
              if name == "Qwen2MoeForCausalLM" else 0)
    if shared % d_ff:  # moejax's shared experts are d_ff wide each
        refuse("shared_expert_intermediate_size", f"a multiple of moe_intermediate_size={d_ff}")
    return dict(
        vocab_size=integer(hf, "vocab_size"), d_model=hidden,
        num_layers=integer(hf, "num_hidden_layers"), num_heads=heads,
        num_kv_heads=integer(hf, "num_key_value_heads", None) or heads, head_dim=head_dim,
        d_ff=d_ff, dense_d_ff=intermediate if moe_d_ff else 0, activation="swiglu",
        rope_theta=theta or inner or 10_000.0,
        norm_eps=real(hf, "rms_norm_eps", 1e-6), qk_norm=arch.qk_norm,
        max_seq_len=min(max_len, window or max_len),
        tie_embeddings=flag(hf, "tie_word_embeddings", False),
        num_experts=num_experts, top_k=top_k,
        moe_every=integer(hf, "decoder_sparse_step", 1), first_dense_layers=0,
        renormalize=name == "MixtralForCausalLM" or flag(hf, "norm_topk_prob", False),
        # transformers drops no token: dropless in training, and at eval a capacity of every
        # token of the group (C = T when eval_capacity_factor = E / k).
        dispatch="dropless", eval_capacity_factor=num_experts / top_k,
        router_score="softmax", routing="tokens", bias_rate=0.0,
        num_shared_experts=shared // d_ff, shared_gate=bool(shared),
        qkv_bias=name == "Qwen2MoeForCausalLM" and flag(hf, "qkv_bias", True), jitter_eps=0.0,
    )


def deepseek_config(hf: dict) -> dict:
    """model_config of a DeepseekV3ForCausalLM config.json, as transformers writes it
    (rope_parameters) or as DeepSeek and Moonshot ship it (rope_scaling with `type`,
    rope_theta beside it, scoring_func, topk_method, moe_layer_freq, Kimi K2's model_type
    kimi_k2 and auto_map). A key absent takes DeepseekV3Config's default, as transformers does."""
    name = DEEPSEEK

    def refuse(key, value, allowed):
        raise ConfigError(f"config.json {key}={value!r}: not supported for {name}; allowed: "
                          f"{allowed}")

    for key, allowed in (("hidden_act", ("silu",)), ("scoring_func", (None, "sigmoid")),
                         ("topk_method", (None, "noaux_tc")), ("moe_layer_freq", (None, 1))):
        if hf.get(key, allowed[0]) not in allowed:  # transformers computes only these
            refuse(key, hf.get(key), " or ".join(str(a) for a in allowed if a is not None))
    if hf.get("attention_bias"):
        refuse("attention_bias", hf["attention_bias"], "false")
    rope_key, rope = rope_of(hf)
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "yarn"):
        refuse(f"{rope_key}.rope_type", kind, "default or yarn")
    theta = real(hf, "rope_theta", None)
    inner = real(rope, "rope_theta", None, label=f"{rope_key}.rope_theta")
    if None not in (theta, inner) and theta != inner:
        raise ConfigError(f"config.json rope_theta={hf['rope_theta']!r}: disagrees with "
                          f"{rope_key}.rope_theta={rope['rope_theta']!r}; allowed: one of them, "
                          "or both the same")
    if real(rope, "partial_rotary_factor", 1.0, label=f"{rope_key}.partial_rotary_factor") != 1:
        refuse(f"{rope_key}.partial_rotary_factor", rope["partial_rotary_factor"], "1")
    max_len = integer(hf, "max_position_embeddings", 4096)
    yarn = {}
    if kind == "yarn":
        original = integer(rope, "original_max_position_embeddings", REQUIRED)
        factor = real(rope, "factor", max_len / original, label=f"{rope_key}.factor")
        if factor < 1:
            refuse(f"{rope_key}.factor", rope.get("factor"), ">= 1")
        if rope.get("truncate", True) is not True:
            refuse(f"{rope_key}.truncate", rope["truncate"], "true (the default)")
        # transformers reads `beta_fast or 32`, `beta_slow or 1`: a 0 is the default
        fast = real(rope, "beta_fast", 0.0, positive=False, label=f"{rope_key}.beta_fast") or 32.0
        slow = real(rope, "beta_slow", 0.0, positive=False, label=f"{rope_key}.beta_slow") or 1.0
        mscale = real(rope, "mscale", 0.0, positive=False, label=f"{rope_key}.mscale")
        all_dim = real(rope, "mscale_all_dim", 0.0, positive=False,
                       label=f"{rope_key}.mscale_all_dim")
        if rope.get("attention_factor") is not None:
            from moejax.model.layers import Rope

            ours = Rope(1.0, "yarn", factor, original, fast, slow, mscale,
                        all_dim).attention_factor()
            if real(rope, "attention_factor", None, label=f"{rope_key}.attention_factor") != ours:
                refuse(f"{rope_key}.attention_factor", rope["attention_factor"],
                       f"null or {ours!r} (what factor, mscale and mscale_all_dim give)")
        yarn = dict(rope_scaling="yarn", rope_factor=factor, rope_original_max_len=original,
                    rope_beta_fast=fast, rope_beta_slow=slow, rope_mscale=mscale,
                    rope_mscale_all_dim=all_dim)
    flag(hf, "rope_interleave", True)  # read by weight_map: checked here
    hidden, heads = integer(hf, "hidden_size", 7168), integer(hf, "num_attention_heads", 128)
    if integer(hf, "num_key_value_heads", heads) != heads:  # transformers' MLA needs as many
        refuse("num_key_value_heads", hf["num_key_value_heads"], f"{heads} "
               "(num_attention_heads) or null")
    layers = integer(hf, "num_hidden_layers", 61)
    dense = integer(hf, "first_k_dense_replace", 3, low=0)
    if dense >= layers:
        refuse("first_k_dense_replace", dense, f"< num_hidden_layers={layers} (an MoE layer)")
    nope, rope_dim = integer(hf, "qk_nope_head_dim", 128), integer(hf, "qk_rope_head_dim", 64)
    experts, n_group = integer(hf, "n_routed_experts", 256), integer(hf, "n_group", 8)
    top_k = integer(hf, "num_experts_per_tok", 8)
    return dict(
        vocab_size=integer(hf, "vocab_size", 129280), d_model=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=heads, head_dim=nope + rope_dim,
        attention="mla",  # q_lora_rank null: a full-rank query; absent: the default
        q_lora_rank=integer(hf, "q_lora_rank", 0 if "q_lora_rank" in hf else 1536),
        kv_lora_rank=integer(hf, "kv_lora_rank", 512), qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim, v_head_dim=integer(hf, "v_head_dim", 128),
        d_ff=integer(hf, "moe_intermediate_size", 2048),
        dense_d_ff=integer(hf, "intermediate_size", 18432), activation="swiglu",
        rope_theta=theta or inner or 10_000.0, **yarn,
        norm_eps=real(hf, "rms_norm_eps", 1e-6), qk_norm="none", max_seq_len=max_len,
        tie_embeddings=flag(hf, "tie_word_embeddings", False),
        num_experts=experts, top_k=top_k, moe_every=1, first_dense_layers=dense,
        renormalize=flag(hf, "norm_topk_prob", True),
        dispatch="dropless", eval_capacity_factor=experts / top_k,
        router_score="sigmoid", routing="tokens", bias_rate=0.0,
        n_group=n_group, topk_group=integer(hf, "topk_group", 4),
        routed_scaling_factor=real(hf, "routed_scaling_factor", 2.5),
        num_shared_experts=integer(hf, "n_shared_experts", 1, low=0), shared_gate=False,
        qkv_bias=False, jitter_eps=0.0,
        mtp_layers=integer(hf, "num_nextn_predict_layers", 0, low=0),
    )


def interleave_perm(r: int) -> np.ndarray:
    """Our rotary column j is DeepSeek's interleaved column perm[j]: pairs (2i, 2i + 1) become
    (i, i + r/2)."""
    return np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2)])


def block_tensors(arch: Arch, cfg, layer: int, name: str, expert: int | None,
                  interleave: bool = True):
    """HF tensors making block weight `name` of `layer` (of one expert, for expert weights):
    (their names, ours from theirs, theirs from ours)."""
    d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    p = f"model.layers.{layer}"
    a = f"{p}.self_attn"

    def heads(w, n):  # [n * hd, d] -> [d, n, hd]
        return w.reshape(n, hd, d).transpose(2, 0, 1)

    def unheads(w):  # [d, n, hd] -> [n * hd, d]
        return w.transpose(1, 2, 0).reshape(-1, d)

    n, r, v = cfg.get("qk_nope_head_dim", 0), cfg.get("qk_rope_head_dim", 0), cfg.get(
        "v_head_dim", 0)
    perm = interleave_perm(r) if interleave else np.arange(r)
    back = np.argsort(perm)

    def rope_cols(w, order):  # the last r columns of the last axis, reordered
        width = w.shape[-1]
        return w[..., np.concatenate([np.arange(width - r), width - r + order])]

    def query(w):  # [h * (n + r), in] -> [in, h, n + r], rotary columns ours
        return rope_cols(w.reshape(h, n + r, -1).transpose(2, 0, 1), perm)

    def unquery(w):
        return [rope_cols(w, back).transpose(1, 2, 0).reshape(h * (n + r), -1)]

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
    table.update({  # multi-head latent attention (DeepseekV3)
        "attn.q_down": ([f"{a}.q_a_proj.weight"], lambda w: w.T, lambda w: [w.T]),
        "attn.q_norm.scale": ([f"{a}.q_a_layernorm.weight"], None, None)
        if cfg.get("attention") == "mla" else table["attn.q_norm.scale"],
        "attn.q_up": ([f"{a}.q_b_proj.weight"], query, unquery),
        "attn.kv_down": ([f"{a}.kv_a_proj_with_mqa.weight"], lambda w: rope_cols(w.T, perm),
                         lambda w: [rope_cols(w, back).T]),
        "attn.kv_norm.scale": ([f"{a}.kv_a_layernorm.weight"], None, None),
        "attn.kv_up": ([f"{a}.kv_b_proj.weight"],
                       lambda w: w.reshape(h, n + v, -1).transpose(2, 0, 1),
                       lambda w: [w.transpose(1, 2, 0).reshape(h * (n + v), -1)]),
        "ffn.router_bias": ([f"{p}.mlp.gate.e_score_correction_bias"], None, None),
    })
    if cfg.get("attention") == "mla":
        table["attn.q"] = ([f"{a}.q_proj.weight"], query, unquery)
        table["attn.out"] = ([f"{a}.o_proj.weight"], lambda w: w.T.reshape(h, v, d),
                             lambda w: [w.reshape(h * v, d).T])
    shared = ffn(f"{p}.mlp.shared_experts" if arch.model_type == "deepseek_v3" else
                 f"{p}.mlp.shared_expert")
    table.update({"ffn.shared_in": shared["ffn.w_in"], "ffn.shared_out": shared["ffn.w_out"]})
    table.update(ffn(f"{p}.{arch.moe}.experts.{expert}" if expert is not None else f"{p}.mlp"))
    names, ours, theirs = table[name]
    return names, ours or (lambda w: w), theirs or (lambda w: [w])


TOP = {  # weights outside the blocks: (HF name, ours from theirs, theirs from ours)
    "embed": ("model.embed_tokens.weight", lambda w: w, lambda w: w),
    "unembed": ("lm_head.weight", lambda w: w.T, lambda w: w.T),
    "final_norm.scale": ("model.norm.weight", lambda w: w, lambda w: w),
}


MTP_TOP = {  # a multi-token prediction module's own weights, beside its block
    "enorm.scale": ("enorm.weight", lambda w: w, lambda w: w),
    "hnorm.scale": ("hnorm.weight", lambda w: w, lambda w: w),
    "proj": ("eh_proj.weight", lambda w: w.T, lambda w: w.T),
    "head_norm.scale": ("shared_head.norm.weight", lambda w: w, lambda w: w),
}


def copies(cfg) -> dict:
    """HF tensors that repeat another: {copy: original}. DeepSeek's MTP layers hold the
    model's embedding and output head again (model.layers.{L + k}.embed_tokens and
    .shared_head.head); moejax keeps one of each, checks the copies on import and writes
    them on export."""
    head = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
    out = {}
    for k in range(cfg.get("mtp_layers", 0)):
        p = f"model.layers.{cfg.num_layers + k}"
        out.update({f"{p}.embed_tokens.weight": "model.embed_tokens.weight",
                    f"{p}.shared_head.head.weight": head})
    return out


def weight_map(arch: Arch, cfg, abstract_params, hf: dict | None = None):
    """name -> (leading dims, part(*leading ids) -> (HF names, ours from theirs, theirs from
    ours)) for every moejax parameter. Leading dims: () outside the blocks, (layers,) for a
    block's weights, (layers, experts) for its experts'; an MTP module's block has no layer
    axis: (), or (experts,). `hf`: the config.json read or written (rope_interleave)."""
    interleave = (hf or {}).get("rope_interleave", True)
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
        if name.startswith("mtp."):  # mtp.K.local or mtp.K.block.local: layer L + K
            _, k, local = name.split(".", 2)
            layer = cfg.num_layers + int(k)
            if local in MTP_TOP:
                hf_name, ours, theirs = MTP_TOP[local]
                out[name] = ((), lambda hf_name=f"model.layers.{layer}.{hf_name}", ours=ours,
                             theirs=theirs: ([hf_name], ours, lambda w: [theirs(w)]))
                continue
            local = local.removeprefix("block.")
            expert = a.ndim == {"ffn.w_in": 4, "ffn.w_out": 3}.get(local)

            def part(e=None, layer=layer, local=local):
                return block_tensors(arch, cfg, layer, local, e, interleave)

            out[name] = (a.shape[:1] if expert else (), part)
            continue
        _, s, _, j, local = name.split(".", 4)  # stacks.S.blocks.J.local
        start, period = firsts[int(s)]
        # [L, E, d, 2, f] and [L, E, f, d] are experts; a dense FFN's lack the E axis.
        expert = a.ndim == {"ffn.w_in": 5, "ffn.w_out": 4}.get(local)
        lead = a.shape[:2] if expert else a.shape[:1]

        def part(r, e=None, start=start, period=period, j=int(j), local=local):
            return block_tensors(arch, cfg, start + r * period + j, local, e, interleave)

        out[name] = (lead, part)
    return out


def hf_config(config, dtype: str, saved: dict | None) -> dict:
    """config.json for the model of `config`: the imported one's if there was one (its token
    ids and other fields survive), with every field the weights depend on set from ours."""
    m = config.model
    if m.get("attention", "gqa") == "mla":
        return deepseek_hf_config(m, dtype, saved)
    if m.num_shared_experts:
        name = "Qwen2MoeForCausalLM"
    elif m.qk_norm == "head":
        name = "Qwen3MoeForCausalLM"
    elif m.qk_norm == "all":
        name = "OlmoeForCausalLM"
    else:
        name = "MixtralForCausalLM"
    need = needs(name)
    need(m.num_experts > 0, "num_experts", m.num_experts, "> 0 (an MoE)")
    need(m.activation == "swiglu", "activation", m.activation, "swiglu")
    need(m.router_score == "softmax" and m.routing == "tokens", "router_score",
         m.router_score, "softmax with routing=tokens")
    need(m.bias_rate == 0, "bias_rate", m.bias_rate, "0")
    need(m.get("rope_scaling", "none") == "none", "rope_scaling", m.get("rope_scaling"),
         "none (these architectures' exports carry no scaling yet)")
    need(m.get("n_group", 1) == 1 and m.get("routed_scaling_factor", 1.0) == 1.0, "n_group",
         m.get("n_group"), "1 with routed_scaling_factor 1.0 (no group-limited routing)")
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
    need(m.get("mtp_layers", 0) == 0, "mtp_layers", m.get("mtp_layers"),
         "0 (multi-token prediction: attention=mla, DeepseekV3ForCausalLM)")
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


def needs(name: str):
    """need(ok, key, value, allowed): one line saying `name` cannot compute model.key=value."""
    def need(ok, key, value, allowed):
        if not ok:
            raise ConfigError(f"model.{key}={value!r}: {name} cannot compute it; allowed: "
                              f"{allowed}")

    return need


def deepseek_hf_config(m, dtype: str, saved: dict | None) -> dict:
    """config.json of DeepseekV3ForCausalLM for a model with attention=mla, as transformers
    writes it (rope_parameters, model_type deepseek_v3), keeping an imported one's other
    fields. A Kimi K2 import leaves as deepseek_v3: transformers' own class computes it, and
    its auto_map names code files the export does not hold."""
    name, need = DEEPSEEK, needs(DEEPSEEK)
    need(m.num_experts > 0, "num_experts", m.num_experts, "> 0 (an MoE)")
    need(m.activation == "swiglu", "activation", m.activation, "swiglu")
    need(m.router_score == "sigmoid" and m.routing == "tokens", "router_score", m.router_score,
         "sigmoid with routing=tokens (attention=mla exports as DeepSeek-V3)")
    need(m.moe_every == 1, "moe_every", m.moe_every, "1 (MoE in every layer after the "
         "first_dense_layers)")
    need(m.num_shared_experts >= 1, "num_shared_experts", m.num_shared_experts, ">= 1")
    need(not m.shared_gate, "shared_gate", m.shared_gate, "False")
    need(not m.qkv_bias, "qkv_bias", m.qkv_bias, "False")
    need(m.qk_norm == "none", "qk_norm", m.qk_norm, "none")
    out = dict(saved or {})
    for key in ("auto_map", "rope_scaling", "quantization_config", "num_experts",
                "num_local_experts"):
        out.pop(key, None)
    rope = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling == "yarn":
        rope.update(rope_type="yarn", factor=m.rope_factor,
                    original_max_position_embeddings=m.rope_original_max_len or m.max_seq_len,
                    beta_fast=m.rope_beta_fast, beta_slow=m.rope_beta_slow)
        rope.update({k: v for k, v in (("mscale", m.rope_mscale),
                                       ("mscale_all_dim", m.rope_mscale_all_dim)) if v})
    nope, rope_dim = m.qk_nope_head_dim, m.qk_rope_head_dim
    out.update(
        architectures=[name], model_type="deepseek_v3", vocab_size=m.vocab_size,
        hidden_size=m.d_model, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_heads, q_lora_rank=m.q_lora_rank or None,
        kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim,
        qk_head_dim=nope + rope_dim, head_dim=rope_dim, v_head_dim=m.v_head_dim,
        intermediate_size=m.dense_d_ff or m.d_ff, moe_intermediate_size=m.d_ff,
        n_routed_experts=m.num_experts, num_experts_per_tok=m.top_k,
        n_shared_experts=m.num_shared_experts, n_group=m.n_group, topk_group=m.topk_group,
        routed_scaling_factor=m.routed_scaling_factor, norm_topk_prob=bool(m.renormalize),
        first_k_dense_replace=m.first_dense_layers, num_nextn_predict_layers=m.mtp_layers,
        scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1,
        rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, rope_parameters=rope,
        rope_interleave=(saved or {}).get("rope_interleave", True), attention_bias=False,
        tie_word_embeddings=bool(m.tie_embeddings), hidden_act="silu", dtype=dtype,
        torch_dtype=dtype)
    out.setdefault("max_position_embeddings", m.max_seq_len)
    return out
