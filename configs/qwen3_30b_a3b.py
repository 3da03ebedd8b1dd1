"""Qwen3-30B-A3B-shaped: 30.5B parameters total, 3.3B active per token (Qwen3 report, 2025).

48 layers, d_model 2048, 32 query heads of 128 sharing 4 key-value heads, 128 fine-grained
SwiGLU experts of width 768 in every layer, top-8 with renormalized gates, untied 152k
vocabulary. (Qwen3's query/key RMSNorm is not modelled yet; it adds 256 weights per layer.)
  python -m moejax.plan --config configs/qwen3_30b_a3b.py:h100x8
Variants (mesh per hardware; docs/memory.md has the planner's answer for each):
  h100x8  one 8 x H100-80GB node: fsdp=8
  v5p64   a TPU v5p slice of 64 chips: fsdp=4 x expert=16
  smoke   the same shapes of everything but size, for tests
"""

from configs import tiny
from moejax.config_lib import parse_variant


def get_config(arg=None):
    variant = parse_variant(arg, ("h100x8", "v5p64", "smoke"))
    config = tiny.get_config()
    config.model.update(vocab_size=151_936, d_model=2048, num_layers=48, num_heads=32,
                        num_kv_heads=4, head_dim=128, d_ff=768, num_experts=128, top_k=8,
                        renormalize=True, rope_theta=1e6, qk_norm="head", tie_embeddings=False,
                        max_seq_len=32_768, dtype="bfloat16", remat="full",
                        capacity_factor=1.25)
    config.data.update(source="hub", path="HuggingFaceFW/fineweb-edu", hub_config="sample-10BT",
                       streaming=True, tokenizer="Qwen/Qwen3-30B-A3B", seq_len=4096,
                       batch_size=256)
    config.train.update(steps=100_000, lr=3e-4, warmup_steps=2_000, log_every=10,
                        eval_every=1_000, eval_batches=20, ckpt_every=500, balance_coef=1e-3)
    config.mesh.update(data=1, fsdp=-1, expert=1, tensor=1)
    if variant == "h100x8":
        config.mesh.update(fsdp=8)
        config.data.update(batch_size=32)
    if variant == "v5p64":
        config.mesh.update(fsdp=4, expert=16)
    if variant == "smoke":
        config.model.update(vocab_size=0, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=16, d_ff=32, num_experts=16, top_k=4, max_seq_len=2048,
                            dtype="float32")
        config.data.update(source="stdlib", streaming=False, tokenizer="byte", seq_len=32,
                           batch_size=16)
        config.train.update(steps=4, warmup_steps=1, log_every=2, eval_every=2, eval_batches=1,
                            ckpt_every=2)
        config.mesh.update(fsdp=1, data=-1)
    return config
