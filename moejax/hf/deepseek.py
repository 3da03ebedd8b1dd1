"""DeepseekV3ForCausalLM's config.json (DeepSeek-V3/R1/V3.1, Kimi K2, Moonlight) <-> the
moejax model keys: multi-head latent attention, YaRN, sigmoid group-limited routing with the
correction bias, dense first layers, shared experts, multi-token prediction. Its weights are
maps.py's."""

from moejax.config_lib import ConfigError
from moejax.hf.fields import (
    DEEPSEEK,
    flag,
    integer,
    needs,
    real,
    rope_of,
    rope_parameters,
    rope_theta,
    yarn_keys,
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
    theta = rope_theta(hf, rope_key, rope)
    if real(rope, "partial_rotary_factor", 1.0, label=f"{rope_key}.partial_rotary_factor") != 1:
        refuse(f"{rope_key}.partial_rotary_factor", rope["partial_rotary_factor"], "1")
    max_len = integer(hf, "max_position_embeddings", 4096)
    yarn = yarn_keys(rope_key, rope, max_len, refuse) if kind == "yarn" else {}
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
        rope_theta=theta, **yarn,
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
    rope = rope_parameters(m)
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
