"""About 1.08B total parameters (0.40B active per token) for one GPU or TPU host.
  python -m moejax.train --config configs/moe_1b.py --workdir runs/moe_1b
"""

from configs import tiny


def get_config(arg=None):
    config = tiny.get_config()
    config.model.update(d_model=1024, num_layers=16, num_heads=16, head_dim=64, d_ff=2304,
                        num_experts=8, top_k=2, renormalize=True, tie_embeddings=False,
                        dtype="bfloat16", vocab_size=0)
    config.mesh.update(data=-1, expert=1)
    config.data.update(source="hub", path="HuggingFaceFW/fineweb-edu", hub_config="sample-10BT",
                       streaming=True, tokenizer="gpt2", seq_len=2048, batch_size=32)
    config.train.update(steps=20_000, lr=5e-4, warmup_steps=1_000, log_every=20,
                        eval_every=1_000, eval_batches=10, ckpt_every=1_000)
    return config
