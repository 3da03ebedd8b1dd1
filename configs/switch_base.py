"""Switch-Base-like: 12 layers, d_model 768, 128 top-1 experts in every other layer.

Fedus et al. (2021): ReLU experts, capacity factor 1.25 in training, 2.0 in eval, raw gates,
balance loss 1e-2. Data: C4 streamed from the Hugging Face hub with the T5 tokenizer.
  python -m moejax.train --config configs/switch_base.py --workdir runs/switch_base
"""

from configs import tiny


def get_config(arg=None):
    config = tiny.get_config()
    config.model.update(d_model=768, num_layers=12, num_heads=12, head_dim=64, d_ff=3072,
                        activation="relu", num_experts=128, top_k=1, moe_every=2,
                        capacity_factor=1.25, eval_capacity_factor=2.0, renormalize=False,
                        jitter_eps=0.01, tie_embeddings=False, dtype="bfloat16")
    config.mesh.update(data=-1, expert=8)
    config.data.update(source="hub", path="allenai/c4", hub_config="en", streaming=True,
                       tokenizer="google-t5/t5-base", seq_len=512, batch_size=256)
    config.train.update(steps=100_000, lr=1e-3, schedule="rsqrt", warmup_steps=10_000,
                        log_every=100, eval_every=2_000, eval_batches=20, ckpt_every=2_000)
    return config
