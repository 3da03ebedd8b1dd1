"""A small Mixtral-style model: 8 SwiGLU experts, top-2 with renormalized gates, every layer.
  python -m moejax.train --config configs/mixtral_small.py --workdir runs/mixtral_small
"""

from configs import tiny


def get_config(arg=None):
    config = tiny.get_config()
    config.model.update(d_model=768, num_layers=12, num_heads=12, head_dim=64, d_ff=2048,
                        num_experts=8, top_k=2, renormalize=True, capacity_factor=1.25,
                        tie_embeddings=False, dtype="bfloat16", max_seq_len=4096)
    config.mesh.update(data=-1, expert=8)
    config.data.update(source="hub", path="HuggingFaceFW/fineweb-edu", hub_config="sample-10BT",
                       streaming=True, tokenizer="mistralai/Mistral-7B-v0.1", seq_len=1024,
                       batch_size=128)
    config.train.update(steps=50_000, lr=6e-4, warmup_steps=2_000, log_every=50,
                        eval_every=1_000, eval_batches=20, ckpt_every=1_000)
    return config
