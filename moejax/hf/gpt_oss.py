"""GptOssForCausalLM (gpt-oss-20b, gpt-oss-120b) <-> moejax: its config.json and its tensors.

Grouped-query attention with biases on q, k, v and the output, a learned sink logit per head,
sliding-window layers alternating with full ones (layer_types), YaRN without rounding the
ramp (truncate false); a router with a logit bias choosing top-k and a softmax over the k;
experts with biases on both projections and the clamped SwiGLU. Its experts are stored fused,
all experts of a layer in one tensor: gate_up_proj [E, d, 2f] with gate and up interleaved
on the last axis, down_proj [E, f, d]; the release keeps them in MXFP4 (mxfp4.py).
"""

from moejax.config_lib import ConfigError
from moejax.hf.fields import (
    GPT_OSS,
    flag,
    integer,
    needs,
    real,
    rope_of,
    rope_parameters,
    rope_theta,
    yarn_keys,
)

SWIGLU_ALPHA = 1.702  # the sigmoid's gain in gpt-oss's clamped SwiGLU; moejax's is fixed


def layer_pattern(hf: dict, layers: int, refuse) -> int:
    """moejax's full_attention_every for config.json's layer_types: 0 when every layer is
    windowed, k when every k-th is full and the others windowed (gpt-oss: 2); a pattern
    moejax cannot scan is refused."""
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                      for i in range(layers)]
    if (not isinstance(types, list) or len(types) != layers
            or set(types) - {"sliding_attention", "full_attention"}):
        refuse("layer_types", types, f"{layers} entries, each sliding_attention or "
               "full_attention")
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    if not full:
        return 0
    every = full[0] + 1
    if full != list(range(every - 1, layers, every)):
        refuse("layer_types", types, "every layer sliding_attention, or every k-th "
               "full_attention and the others sliding_attention")
    return every


def gpt_oss_config(hf: dict) -> dict:
    """model_config of a GptOssForCausalLM config.json; an absent key takes GptOssConfig's
    default, as transformers does."""
    name = GPT_OSS

    def refuse(key, value, allowed):
        raise ConfigError(f"config.json {key}={value!r}: not supported for {name}; allowed: "
                          f"{allowed}")

    if real(hf, "swiglu_alpha", SWIGLU_ALPHA) != SWIGLU_ALPHA:
        refuse("swiglu_alpha", hf["swiglu_alpha"], f"{SWIGLU_ALPHA} (gpt-oss's)")
    if hf.get("hidden_act", "silu") != "silu":  # unread by transformers: the SwiGLU is fixed
        refuse("hidden_act", hf["hidden_act"], "silu")
    rope_key, rope = rope_of(hf)
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "yarn"):
        refuse(f"{rope_key}.rope_type", kind, "default or yarn")
    max_len = integer(hf, "max_position_embeddings", 131072)
    yarn = yarn_keys(rope_key, rope, max_len, refuse) if kind == "yarn" else {}
    layers = integer(hf, "num_hidden_layers", 36)
    given = hf.get("rope_theta") is not None or rope.get("rope_theta") is not None
    theta = rope_theta(hf, rope_key, rope) if given else 150000.0  # GptOssConfig's default
    window = integer(hf, "sliding_window", 0, low=0)
    every = layer_pattern(hf, layers, refuse)
    if every == 1 or not window or window >= max_len:  # no layer is cut
        window, every = 0, 0
    heads = integer(hf, "num_attention_heads", 64)
    experts = integer(hf, "num_local_experts", 128)
    top_k = integer(hf, "num_experts_per_tok", integer(hf, "experts_per_token", 4))
    bias = flag(hf, "attention_bias", True)
    return dict(
        vocab_size=integer(hf, "vocab_size", 201088), d_model=integer(hf, "hidden_size", 2880),
        num_layers=layers, num_heads=heads,
        num_kv_heads=integer(hf, "num_key_value_heads", None) or heads,
        head_dim=integer(hf, "head_dim", 64), d_ff=integer(hf, "intermediate_size", 2880),
        dense_d_ff=0, activation="clamped_swiglu", swiglu_limit=real(hf, "swiglu_limit", 7.0),
        rope_theta=theta,
        **yarn, norm_eps=real(hf, "rms_norm_eps", 1e-5), qk_norm="none",
        max_seq_len=max_len, sliding_window=window, full_attention_every=every,
        attention_sinks=True, qkv_bias=bias, out_bias=bias,
        tie_embeddings=flag(hf, "tie_word_embeddings", False),
        num_experts=experts, top_k=top_k, moe_every=1, first_dense_layers=0, moe_bias=True,
        renormalize=True,  # a softmax over the k chosen logits
        dispatch="dropless", eval_capacity_factor=experts / top_k,
        router_score="softmax", routing="tokens", bias_rate=0.0,
        num_shared_experts=0, shared_gate=False, jitter_eps=0.0,
    )


def gpt_oss_hf_config(m, dtype: str, saved: dict | None) -> dict:
    """config.json of GptOssForCausalLM for a model computed as gpt-oss computes, keeping an
    imported one's other fields."""
    need = needs(GPT_OSS)
    need(m.num_experts > 0, "num_experts", m.num_experts, "> 0 (an MoE)")
    need(m.activation == "clamped_swiglu", "activation", m.activation, "clamped_swiglu")
    need(m.get("rope_fraction", 1.0) == 1.0, "rope_fraction", m.get("rope_fraction"), "1.0")
    need(m.router_score == "softmax" and m.routing == "tokens" and m.renormalize,
         "router_score", m.router_score, "softmax with routing=tokens and renormalize")
    need(m.moe_every == 1 and m.first_dense_layers == 0, "moe_every", m.moe_every,
         "1 with first_dense_layers 0 (MoE in every layer)")
    need(m.num_shared_experts == 0, "num_shared_experts", m.num_shared_experts, "0")
    need(m.qk_norm == "none", "qk_norm", m.qk_norm, "none")
    need(bool(m.qkv_bias) == bool(m.get("out_bias")), "qkv_bias", m.qkv_bias,
         f"{bool(m.get('out_bias'))}, as out_bias (attention_bias is both)")
    need(m.get("attention_sinks", False), "attention_sinks", m.get("attention_sinks"), "True")
    need(m.get("moe_bias", False), "moe_bias", m.get("moe_bias"), "True")
    every, window = m.get("full_attention_every", 0), m.get("sliding_window", 0)
    layer_types = ["full_attention" if not window or (every and i % every == every - 1)
                   else "sliding_attention" for i in range(m.num_layers)]
    out = dict(saved or {})
    for key in ("quantization_config", "rope_scaling", "experts_per_token"):
        out.pop(key, None)
    out.update(
        architectures=[GPT_OSS], model_type="gpt_oss", vocab_size=m.vocab_size,
        hidden_size=m.d_model, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads or m.num_heads, head_dim=m.head_dim,
        intermediate_size=m.d_ff, num_local_experts=m.num_experts,
        num_experts_per_tok=m.top_k, swiglu_limit=m.swiglu_limit, swiglu_alpha=SWIGLU_ALPHA,
        rms_norm_eps=m.norm_eps, rope_parameters=rope_parameters(m),
        sliding_window=window or None, layer_types=layer_types,
        attention_bias=bool(m.qkv_bias), tie_word_embeddings=bool(m.tie_embeddings),
        hidden_act="silu", dtype=dtype, torch_dtype=dtype)
    out.pop("rope_theta", None)
    out.setdefault("max_position_embeddings", m.max_seq_len)
    return out


def tensors(p: str, f: int) -> dict:
    """Layer `p`'s (model.layers.{i}) tensors of gpt-oss that the other architectures name
    otherwise or lack: our name -> (HF names, ours from theirs, theirs from ours). The experts
    come whole, all of a layer's at once (their lead is the layer alone): gate_up_proj
    [E, d, 2f] (gate, up alternating on the last axis) <-> w_in [E, d, 2, f]."""
    a, e = f"{p}.self_attn", f"{p}.mlp.experts"

    def pairs(w):  # [..., 2f] alternating -> [..., 2, f]
        return w.reshape(*w.shape[:-1], f, 2).swapaxes(-1, -2)

    def unpairs(w):
        return [w.swapaxes(-1, -2).reshape(*w.shape[:-2], 2 * f)]

    return {
        "attn.out_bias": ([f"{a}.o_proj.bias"], None, None),
        "attn.sinks": ([f"{a}.sinks"], None, None),
        "ffn.router": ([f"{p}.mlp.router.weight"], lambda w: w.T, lambda w: [w.T]),
        "ffn.router_logit_bias": ([f"{p}.mlp.router.bias"], None, None),
        "ffn.w_in": ([f"{e}.gate_up_proj"], pairs, unpairs),
        "ffn.w_out": ([f"{e}.down_proj"], None, None),
        "ffn.in_bias": ([f"{e}.gate_up_proj_bias"], pairs, unpairs),
        "ffn.out_bias": ([f"{e}.down_proj_bias"], None, None),
    }
