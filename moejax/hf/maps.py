"""How a transformers checkpoint maps onto moejax, per architecture: config.json <-> the model
config (DeepseekV3's in deepseek.py, the keys read by fields.py), and each HF tensor <-> a slice
of one moejax parameter. Pure: no files, no devices (convert.py does the reading and writing).

Our layouts: attention q [d, heads, hd], kv [d, 2, kv_heads, hd], out [heads, hd, d]; an FFN's
w_in [d, 2, f] (gate, then up) and w_out [f, d]; experts with a leading [E]; a block's weights
with a leading layer axis. transformers keeps Linear weights as [out, in].

DeepseekV3ForCausalLM (DeepSeek-V3/R1/V3.1, Kimi K2, Moonlight): multi-head latent attention
(moejax/model/mla.py; its rotary columns permuted from DeepSeek's interleaved pairs (2i, 2i+1)
to moejax's halves (i, i + r/2) where rope_interleave is true, which changes no score), sigmoid
routing with the correction bias, groups, dense first layers, shared experts, and the
multi-token prediction layers model.layers.{L + k}.* <-> mtp.k.* (their embed_tokens and
shared_head.head are copies of the model's: COPIES).

Glm4MoeForCausalLM (GLM-4.5, GLM-4.5-Air): grouped-query attention with partial rotary
(glm.py reads its config.json), DeepSeek-V3's names for the router bias, shared experts and
MTP layers.
"""

import jax
import numpy as np

from moejax.config_lib import ConfigError
from moejax.hf.deepseek import deepseek_config, deepseek_hf_config
from moejax.hf.fields import (  # noqa: F401  (FLOAT32: convert.py reads it here)
    ARCHS,
    DEEPSEEK,
    FLOAT32,
    GLM,
    GPT_OSS,
    OWN_BIAS,
    Arch,
    arch_of,
    flag,
    integer,
    needs,
    real,
    rope_of,
    rope_theta,
)
from moejax.hf.glm import glm_config, glm_hf_config
from moejax.hf.gpt_oss import gpt_oss_config, gpt_oss_hf_config, tensors as gpt_oss_tensors
from moejax.model.transformer import layer_stacks
from moejax.run.checkpoint import path_name


def model_config(hf: dict) -> dict:
    """The moejax model keys computing what transformers computes for this config.json; a
    feature moejax lacks, a missing key or a value of the wrong kind fails with one line
    naming its key."""
    name = arch_of(hf)
    arch = ARCHS[name]
    if name == DEEPSEEK:
        return deepseek_config(hf)
    if name == GLM:
        return glm_config(hf)
    if name == GPT_OSS:
        return gpt_oss_config(hf)

    def refuse(key, allowed):
        raise ConfigError(f"config.json {key}={hf.get(key)!r}: not supported for {name}; "
                          f"allowed: {allowed}")

    rope_key, rope = rope_of(hf)
    if rope.get("rope_type") not in (None, "default"):
        refuse(rope_key, "rope_type default (no scaling)")
    theta = rope_theta(hf, rope_key, rope)
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
    window = sliding_window(hf, name, refuse)
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
        rope_theta=theta,
        norm_eps=real(hf, "rms_norm_eps", 1e-6), qk_norm=arch.qk_norm,
        max_seq_len=max_len, sliding_window=window if window < max_len else 0,
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


def sliding_window(hf: dict, name: str, refuse) -> int:
    """The window every layer attends within (0: none), as transformers 5 reads config.json:
    Mixtral's `sliding_window` for every layer; Qwen3-MoE's for every layer with
    `use_sliding_window`; Qwen2-MoE's for the layers `layer_types` (by default every other one
    below `max_window_layers`) marks sliding_attention, with `use_sliding_window`. Some layers
    windowed and others not is refused; OLMoE has none."""
    window = integer(hf, "sliding_window", None, low=0) or 0
    if name != "MixtralForCausalLM" and not flag(hf, "use_sliding_window", False):
        return 0
    if name == "Qwen2MoeForCausalLM":
        layers, first = integer(hf, "num_hidden_layers"), integer(hf, "max_window_layers", 28)
        types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 and i < first
                                          else "full_attention" for i in range(layers)]
        if window and set(types) != {"sliding_attention"}:
            if set(types) == {"full_attention"}:
                return 0
            refuse("layer_types", "every layer sliding_attention, or every layer "
                   "full_attention (one window for all layers)")
    return window if name != "OlmoeForCausalLM" else 0


# Model types naming DeepSeek-V3's router bias and shared experts (mlp.gate.
# e_score_correction_bias, mlp.shared_experts.*)
SIGMOID_FAMILIES = ("deepseek_v3", "glm4_moe")


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
        # DeepSeek-V3's and GLM's own tensor; the others have none: moejax's, in ROUTER_FILE
        "ffn.router_bias": ([f"{p}.mlp.gate.e_score_correction_bias"
                             if arch.model_type in SIGMOID_FAMILIES else
                             f"{p}.{arch.moe}.gate{OWN_BIAS}"], None, None),
    })
    if cfg.get("attention") == "mla":
        table["attn.q"] = ([f"{a}.q_proj.weight"], query, unquery)
        table["attn.out"] = ([f"{a}.o_proj.weight"], lambda w: w.T.reshape(h, v, d),
                             lambda w: [w.reshape(h * v, d).T])
    shared = ffn(f"{p}.mlp.shared_experts" if arch.model_type in SIGMOID_FAMILIES else
                 f"{p}.mlp.shared_expert")
    table.update({"ffn.shared_in": shared["ffn.w_in"], "ffn.shared_out": shared["ffn.w_out"]})
    table.update(ffn(f"{p}.{arch.moe}.experts.{expert}" if expert is not None else f"{p}.mlp"))
    if arch.model_type == "gpt_oss":
        table.update(gpt_oss_tensors(p, cfg.d_ff))
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
        # gpt-oss's come whole: a layer's experts in one tensor.
        expert = a.ndim == {"ffn.w_in": 5, "ffn.w_out": 4}.get(local) and arch.model_type != (
            "gpt_oss")
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
    if (m.router_score == "sigmoid" and m.num_shared_experts) or m.get("rope_fraction", 1) != 1:
        return glm_hf_config(m, dtype, saved)
    if m.get("attention_sinks") or m.get("moe_bias") or m.get("full_attention_every"):
        return gpt_oss_hf_config(m, dtype, saved)
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
         "0 (multi-token prediction: DeepseekV3ForCausalLM or Glm4MoeForCausalLM)")
    window = m.get("sliding_window", 0)
    need(not window or name != "OlmoeForCausalLM", "sliding_window", window,
         "0 for OLMoE (qk_norm=all), which has no window")
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
    out["sliding_window"] = window or None
    if name.startswith("Qwen"):
        out["use_sliding_window"] = bool(window)
    if name == "Qwen2MoeForCausalLM":  # its default layer_types would window every other one
        out["layer_types"] = [("sliding" if window else "full") + "_attention"] * m.num_layers
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


