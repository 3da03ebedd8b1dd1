"""Qwen3-235B-A22B-shaped: 235B parameters total, 22B active per token (Qwen3 report, 2025).

94 layers, d_model 4096, 64 query heads of 128 sharing 4 key-value heads with RMSNorm on each
head's queries and keys, 128 fine-grained SwiGLU experts of width 1536 in every layer, top-8
with renormalized gates, untied 152k vocabulary.
  python -m moejax.plan --config configs/qwen3_235b_a22b.py:h100x256 --target h100
Variants:
  h100x256  32 nodes of 8 x H100-80GB as Megatron-MoE-ModelZoo's Qwen3-235B best practice
            runs it without pipeline stages: expert=8 inside each node, fsdp=32 across them,
            full recompute, 4 sequences per device per micro-batch, dropless
  smoke     the same shapes of everything but size, for tests
Every key is explained in configs/tiny.py.
"""

from moejax.config_lib import config_dict, parse_variant


def get_config(arg=None):
    variant = parse_variant(arg, ("h100x256", "smoke"))
    config = config_dict(
        seed=0,
        model=dict(
            vocab_size=151_936,
            d_model=4096,
            num_layers=94,
            num_heads=64,
            num_kv_heads=4,
            head_dim=128,
            d_ff=1536,
            dense_d_ff=0,
            activation="swiglu",
            swiglu_limit=7.0,
            rope_theta=1e6,
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
            qk_norm="head",
            qkv_bias=False,
            attention="gqa",
            q_lora_rank=0,
            kv_lora_rank=0,
            qk_nope_head_dim=0,
            qk_rope_head_dim=0,
            v_head_dim=0,
            max_seq_len=40_960,
            sliding_window=0,
            full_attention_every=0,
            attention_sinks=False,
            out_bias=False,
            tie_embeddings=False,
            dtype="bfloat16",
            param_dtype="float32",
            quantization="none",
            quantize_dense=False,
            remat="full",
            num_experts=128,
            top_k=8,
            moe_every=1,
            first_dense_layers=0,
            capacity_factor=1.25,
            eval_capacity_factor=2.0,
            min_capacity=4,
            renormalize=True,
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
        mesh=dict(data=1, fsdp=-1, expert=1, context=1, tensor=1),
        data=dict(
            source="hub",
            path="HuggingFaceFW/fineweb-edu",
            mixture="",
            format="text",
            hub_config="sample-10BT",
            split="train",
            streaming=True,
            shuffle_buffer=1024,  # streaming: train rows drawn from this many per host; 0: in order
            text_key="text",
            eval_fraction=0.05,
            tokenizer="Qwen/Qwen3-235B-A22B",
            documents=True,  # attention, positions and loss stop at document ends
            seq_len=4096,
            batch_size=2048,
            on_error="skip",
        ),
        train=dict(
            steps=100_000,
            stop_at=0,
            lr=3e-4,
            schedule="cosine",
            warmup_steps=2_000,
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
            balance_coef=1e-3,
            z_coef=1e-3,
            mtp_coef=0.3,
            log_every=10,
            eval_every=1_000,
            eval_batches=20,
            ckpt_every=500,
            keep_checkpoints=2,
            keep_best=True,
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
    if variant == "h100x256":
        config.mesh.update(fsdp=32, expert=8)
        config.model.update(dispatch="dropless")
        config.train.update(grad_accum=2)
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
