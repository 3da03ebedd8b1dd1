"""Switch Transformer's scaling result at small scale: dense vs top-1 MoE with 2-16 experts.

Every variant does the same FLOPs per token (one d_ff-wide FFN per token; the router adds
d_model x E multiply-adds per MoE layer, under 1%), sees the same batches in the same order and
trains for the same steps. Only the number of experts, hence the total parameters, differs.

  python -m moejax.experiments.scaling                                  # all five, ~25 min
  python -m moejax.train --config configs/switch_scaling.py:e8 --workdir runs/scaling/e8

Variants: `dense`, `e2`, `e4`, `e8`, `e16`; append `,smoke` (e.g. `:e4,smoke`) for a
seconds-long version of the same model, for tests.
"""

from configs import tiny
from moejax.config_lib import parse_variant

VARIANTS = ("dense", "e2", "e4", "e8", "e16")


def get_config(arg=None):
    name, _, size = (arg or "e8").partition(",")
    parse_variant(name, VARIANTS)
    smoke = parse_variant(size, ("smoke",)) == "smoke"

    config = tiny.get_config()
    # Switch (Fedus et al. 2021): top-1, raw softmax gates, capacity factor 1.25 in training and
    # 2.0 in eval, balance loss 1e-2, MoE in every other layer, ReLU experts.
    config.model.update(
        d_model=128, num_layers=4, num_heads=4, head_dim=32, d_ff=512, activation="relu",
        num_experts=0 if name == "dense" else int(name[1:]), top_k=1, moe_every=2,
        capacity_factor=1.25, eval_capacity_factor=2.0, renormalize=False, jitter_eps=0.0)
    # One device: a single capacity group holds the whole 4096-token batch.
    config.mesh.update(data=1, expert=1)
    config.train.update(steps=600, balance_coef=1e-2, log_every=25, eval_every=50,
                        eval_batches=16, ckpt_every=100, keep_checkpoints=1, keep_best=False)
    if smoke:
        config.model.update(d_model=32, num_layers=2, num_heads=2, head_dim=16, d_ff=64)
        config.data.update(seq_len=32, batch_size=16)
        config.train.update(steps=6, warmup_steps=2, log_every=2, eval_every=3, eval_batches=2,
                            ckpt_every=3)
    return config
