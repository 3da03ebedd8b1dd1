"""FLOPs per token and device peaks, for MFU."""

# Dense bf16 peak FLOP/s per device (vendor figures). MFU is reported against these.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA GB200": 2500e12,  # GB200 runs its B200 dies at a higher power: plan/hardware.py
    "TPU7x": 1153.5e12,  # Ironwood: 2,307 per chip, and each chip is two JAX devices
}


def device_peak_flops(device_kind: str, override_tflops: float) -> float | None:
    """Peak FLOP/s of one device: the override if set, else the table, else None (unknown)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    for name, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if device_kind.startswith(name):
            return peak
    return None


def train_flops_per_token(active_params: int, model_cfg, seq_len: int) -> float:
    """Forward + backward FLOPs of one token: 6 per active matmul weight, plus causal attention.

    The input embedding is a lookup, not a matmul; a tied embedding is counted once, as the
    output projection, which each multi-token prediction module runs once more. Attention
    scores and values cost 2 * heads * (query-key + value dims) * (S/2) forward per token
    (causal: half the keys on average), times 3 with the backward pass.
    """
    c = model_cfg
    matmul_params = active_params - (0 if c.tie_embeddings else c.vocab_size * c.d_model)
    return (6 * (matmul_params + c.mtp_layers * c.vocab_size * c.d_model)
            + train_attention_flops_per_token(c, seq_len))


def train_attention_flops_per_token(model_cfg, seq_len: int) -> float:
    """The causal attention part of train_flops_per_token: scores and values."""
    c = model_cfg
    if c.attention == "mla":  # per head: the rotary dims in the scores too; its own value width
        qk, v = c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
    else:
        qk = v = c.head_dim
    return 3 * (c.num_layers + c.mtp_layers) * c.num_heads * (qk + v) * seq_len
