"""Glm4MoeForCausalLM's config.json (GLM-4.5, GLM-4.5-Air) <-> the moejax model keys:
grouped-query attention with q/k/v biases (attention_bias) and optional per-head q/k RMSNorm
(use_qk_norm), partial rotary (partial_rotary_factor: the first int(head_dim * factor) dims of
each head rotate in pairs (i, i + r/2), the rest pass; model.rope_fraction), DeepSeek-V3's
router (sigmoid scores, the correction bias, groups, routed_scaling_factor), dense first
layers, shared experts and multi-token prediction layers model.layers.{L + k} laid out as
DeepSeek-V3's. Its weights are maps.py's."""

from moejax.config_lib import ConfigError
from moejax.hf.fields import GLM, flag, integer, needs, real, rope_of, rope_theta

# transformers' Glm4MoeConfig sets partial_rotary_factor 0.5 where config.json has none.
DEFAULT_FRACTION = 0.5


def glm_config(hf: dict) -> dict:
    """model_config of a Glm4MoeForCausalLM config.json, as GLM ships it (rope_theta and
    partial_rotary_factor at the top level) or as transformers 5 writes it (inside
    rope_parameters). A key absent takes Glm4MoeConfig's default, as transformers does, but
    num_nextn_predict_layers: 0 (transformers computes no MTP layer; their tensors, where
    a checkpoint has them, come with the key)."""

    def refuse(key, value, allowed):
        raise ConfigError(f"config.json {key}={value!r}: not supported for {GLM}; allowed: "
                          f"{allowed}")

    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", hf["hidden_act"], "silu")
    rope_key, rope = rope_of(hf)
    if rope.get("rope_type", "default") != "default":
        refuse(f"{rope_key}.rope_type", rope["rope_type"], "default (no scaling)")
    theta = rope_theta(hf, rope_key, rope)
    hidden, heads = integer(hf, "hidden_size", 4096), integer(hf, "num_attention_heads", 96)
    head_dim = integer(hf, "head_dim", None) or hidden // heads
    fraction = partial_rotary_factor(hf, rope_key, rope)
    if int(head_dim * fraction) % 2 or int(head_dim * fraction) < 2:
        refuse("partial_rotary_factor", fraction, f"a factor rotating an even number >= 2 of "
               f"head_dim={head_dim}")
    layers = integer(hf, "num_hidden_layers", 46)
    dense = integer(hf, "first_k_dense_replace", 1, low=0)
    if dense >= layers:
        refuse("first_k_dense_replace", dense, f"< num_hidden_layers={layers} (an MoE layer)")
    experts, top_k = integer(hf, "n_routed_experts", 128), integer(hf, "num_experts_per_tok", 8)
    return dict(
        vocab_size=integer(hf, "vocab_size", 151552), d_model=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=integer(hf, "num_key_value_heads", 8), head_dim=head_dim,
        attention="gqa", d_ff=integer(hf, "moe_intermediate_size", 1408),
        dense_d_ff=integer(hf, "intermediate_size", 10944), activation="swiglu",
        rope_theta=theta, rope_fraction=fraction,
        norm_eps=real(hf, "rms_norm_eps", 1e-5),
        qk_norm="head" if flag(hf, "use_qk_norm", False) else "none",
        qkv_bias=flag(hf, "attention_bias", False),
        max_seq_len=integer(hf, "max_position_embeddings", 131072), sliding_window=0,
        tie_embeddings=flag(hf, "tie_word_embeddings", False),
        num_experts=experts, top_k=top_k, moe_every=1, first_dense_layers=dense,
        renormalize=flag(hf, "norm_topk_prob", True),
        # transformers drops no token: dropless, and at eval a capacity of every token
        dispatch="dropless", eval_capacity_factor=experts / top_k,
        router_score="sigmoid", routing="tokens", bias_rate=0.0,
        n_group=integer(hf, "n_group", 1), topk_group=integer(hf, "topk_group", 1),
        routed_scaling_factor=real(hf, "routed_scaling_factor", 1.0),
        # one shared MLP n_shared_experts * moe_intermediate_size wide, as moejax's are
        num_shared_experts=integer(hf, "n_shared_experts", 1), shared_gate=False,
        jitter_eps=0.0, mtp_layers=integer(hf, "num_nextn_predict_layers", 0, low=0),
    )


def partial_rotary_factor(hf: dict, rope_key: str, rope: dict) -> float:
    """The share of each head's dims that rotate: config.json's partial_rotary_factor or the
    one inside rope_of's parameters (they must agree where both are given), else 0.5."""
    top = real(hf, "partial_rotary_factor", None)
    inner = real(rope, "partial_rotary_factor", None, label=f"{rope_key}.partial_rotary_factor")
    if None not in (top, inner) and top != inner:
        raise ConfigError(f"config.json partial_rotary_factor={hf['partial_rotary_factor']!r}: "
                          f"disagrees with {rope_key}.partial_rotary_factor="
                          f"{rope['partial_rotary_factor']!r}; allowed: one of them, or both "
                          "the same")
    fraction = inner or top or DEFAULT_FRACTION
    if fraction > 1:
        key = "partial_rotary_factor" if top else f"{rope_key}.partial_rotary_factor"
        raise ConfigError(f"config.json {key}={fraction!r}: not supported for {GLM}; allowed: "
                          "a number in (0, 1]")
    return fraction


def glm_hf_config(m, dtype: str, saved: dict | None) -> dict:
    """config.json of Glm4MoeForCausalLM for a grouped-query model with sigmoid routing and a
    shared expert, keeping an imported one's other fields. The rotary base and share are
    written both inside rope_parameters (transformers 5) and at the top level (GLM's own
    files, transformers 4)."""
    need = needs(GLM)
    need(m.num_experts > 0, "num_experts", m.num_experts, "> 0 (an MoE)")
    need(m.activation == "swiglu", "activation", m.activation, "swiglu")
    need(m.router_score == "sigmoid" and m.routing == "tokens", "router_score", m.router_score,
         "sigmoid with routing=tokens")
    need(m.moe_every == 1, "moe_every", m.moe_every, "1 (MoE in every layer after the "
         "first_dense_layers)")
    need(m.num_shared_experts >= 1, "num_shared_experts", m.num_shared_experts, ">= 1")
    need(not m.shared_gate, "shared_gate", m.shared_gate, "False")
    need(m.qk_norm in ("none", "head"), "qk_norm", m.qk_norm, "none or head")
    need(m.get("rope_scaling", "none") == "none", "rope_scaling", m.get("rope_scaling"),
         "none (GLM-4.5 ships no scaling)")
    need(not m.get("sliding_window", 0), "sliding_window", m.get("sliding_window"), "0")
    for key in ("attention_sinks", "out_bias", "moe_bias"):  # gpt-oss's
        need(not m.get(key, False), key, m.get(key), "False")
    fraction = m.get("rope_fraction", 1.0)
    out = dict(saved or {})
    for key in ("rope_scaling", "quantization_config", "num_experts", "num_local_experts"):
        out.pop(key, None)
    out.update(
        architectures=[GLM], model_type="glm4_moe", vocab_size=m.vocab_size,
        hidden_size=m.d_model, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads or m.num_heads, head_dim=m.head_dim,
        intermediate_size=m.dense_d_ff or m.d_ff, moe_intermediate_size=m.d_ff,
        n_routed_experts=m.num_experts, num_experts_per_tok=m.top_k,
        n_shared_experts=m.num_shared_experts, n_group=m.n_group, topk_group=m.topk_group,
        routed_scaling_factor=m.routed_scaling_factor, norm_topk_prob=bool(m.renormalize),
        first_k_dense_replace=m.first_dense_layers, num_nextn_predict_layers=m.mtp_layers,
        use_qk_norm=m.qk_norm == "head", attention_bias=bool(m.qkv_bias),
        rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, partial_rotary_factor=fraction,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta,
                         "partial_rotary_factor": fraction},
        tie_word_embeddings=bool(m.tie_embeddings), hidden_act="silu", dtype=dtype,
        torch_dtype=dtype)
    out.setdefault("max_position_embeddings", m.max_seq_len)
    return out
