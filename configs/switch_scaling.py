"""Switch Transformer's scaling result at small scale: dense vs top-1 MoE with 2-16 experts.

Every variant does the same FLOPs per token (one d_ff-wide FFN per token; the router adds
d_model x E multiply-adds per MoE layer, under 1%), sees the same batches in the same order and
trains for the same steps. Only the number of experts, hence the total parameters, differs.

  python -m moejax.scaling --config configs/switch_scaling.py   # all five, ~25 min
  python -m moejax.train --config configs/switch_scaling.py:e8 --workdir runs/scaling/e8

Variants: `dense`, `e2`, `e4`, `e8` (the default), `e16`; append `,smoke` (e.g. `:e4,smoke`)
for a seconds-long version of the same model, for tests; `:smoke` alone is `:e8,smoke`.
Every key is explained in configs/tiny.py.
"""

from moejax.config_lib import config_dict, parse_variant

VARIANTS = ("dense", "e2", "e4", "e8", "e16")


def get_config(arg=None):
    name, _, size = (arg or "e8").partition(",")
    parse_variant(name, VARIANTS + ("smoke",))
    smoke = parse_variant(size, ("smoke",)) == "smoke" or name == "smoke"
    if name == "smoke":
        name = "e8"
    # Switch (Fedus et al. 2021): top-1, raw softmax gates, capacity factor 1.25 in training and
    # 2.0 in eval, balance loss 1e-2, MoE in every other layer, ReLU experts.
    config = config_dict(
        seed=0,
        model=dict(
            vocab_size=0,
            d_model=128,
            num_layers=4,
            num_heads=4,
            num_kv_heads=0,
            head_dim=32,
            d_ff=512,
            dense_d_ff=0,
            activation="relu",
            swiglu_limit=7.0,
            rope_theta=10_000.0,
            rope_fraction=1.0,
            rope_scaling="none",  # none | yarn (the rope_* keys below: configs/tiny.py)
            rope_factor=1.0,
            rope_original_max_len=0,
            rope_beta_fast=32.0,
            rope_beta_slow=1.0,
            rope_mscale=0.0,
            rope_mscale_all_dim=0.0,
            rope_truncate=True,
            norm_eps=1e-6,
            qk_norm="none",
            qkv_bias=False,
            attention="gqa",
            q_lora_rank=0,
            kv_lora_rank=0,
            qk_nope_head_dim=0,
            qk_rope_head_dim=0,
            v_head_dim=0,
            max_seq_len=2048,
            sliding_window=0,
            full_attention_every=0,
            attention_sinks=False,
            out_bias=False,
            tie_embeddings=True,
            dtype="float32",
            param_dtype="float32",
            quantization="none",
            quantize_dense=False,
            remat="none",
            num_experts=0 if name == "dense" else int(name[1:]),
            top_k=1,
            moe_every=2,
            first_dense_layers=0,
            capacity_factor=1.25,
            eval_capacity_factor=2.0,
            min_capacity=4,
            renormalize=False,
            jitter_eps=0.0,
            num_groups=0,
            dispatch="capacity",
            router_score="softmax",
            routing="tokens",
            bias_rate=0.0,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
            num_shared_experts=0,
            shared_gate=False,
            moe_bias=False,
            mtp_layers=0,
        ),
        # One device: a single capacity group holds the whole 4096-token batch.
        mesh=dict(data=1, fsdp=1, expert=1, context=1, tensor=1),
        data=dict(
            source="stdlib",
            path="",
            mixture="",
            format="text",
            hub_config="",
            split="train",
            streaming=False,
            shuffle_buffer=256,  # streaming: train rows drawn from this many per host; 0: in order
            text_key="text",
            eval_fraction=0.05,
            tokenizer="byte",
            documents=False,  # docs/scaling.md was measured with attention across documents
            seq_len=128,
            batch_size=32,
            on_error="skip",
        ),
        train=dict(
            steps=600,
            stop_at=0,
            lr=3e-3,
            schedule="cosine",
            warmup_steps=50,
            min_lr_ratio=0.1,
            weight_decay=0.1,
            b1=0.9,
            b2=0.95,
            moment_dtype="float32",
            optimizer="adamw",  # adamw | muon
            muon_lr_scale="consistent_rms",
            qk_clip=0.0,  # MuonClip's logit threshold; 0 = off
            offload_optimizer=False,
            grad_clip=1.0,
            grad_accum=1,
            balance_coef=1e-2,
            z_coef=1e-3,
            mtp_coef=0.3,
            log_every=25,
            eval_every=50,
            eval_batches=16,
            ckpt_every=100,
            keep_checkpoints=1,
            keep_best=False,
            peak_tflops=0.0,
            max_nonfinite_steps=5,
            collapse_threshold=0.1,
            collapse_checks=4,
            frozen_expert_steps=100,
            watchdog_factor=10.0,
            watchdog_timeout_s=1800.0,
            init_from="",
            restart_if_damaged=False,
        ),
    )
    if smoke:
        config.model.update(d_model=32, num_layers=2, num_heads=2, head_dim=16, d_ff=64)
        config.data.update(seq_len=32, batch_size=16)
        config.train.update(steps=6, warmup_steps=2, log_every=2, eval_every=3, eval_batches=2,
                            ckpt_every=3)
        config.mesh.update(data=-1)
    return config
