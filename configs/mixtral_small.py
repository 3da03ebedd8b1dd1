"""A small Mixtral-style model: 8 SwiGLU experts, top-2 with renormalized gates, every layer.
  python -m moejax.train --config configs/mixtral_small.py --workdir runs/mixtral_small
Variants: `:smoke` (the same architecture at toy size, seconds on CPU, for tests).
Every key is explained in configs/tiny.py.
"""

from moejax.config_lib import config_dict, parse_variant


def get_config(arg=None):
    variant = parse_variant(arg, ("smoke",))
    config = config_dict(
        seed=0,
        model=dict(
            vocab_size=0,
            d_model=768,
            num_layers=12,
            num_heads=12,
            num_kv_heads=0,
            head_dim=64,
            d_ff=2048,
            dense_d_ff=0,
            activation="swiglu",
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
            max_seq_len=4096,
            sliding_window=0,
            full_attention_every=0,
            attention_sinks=False,
            out_bias=False,
            tie_embeddings=False,
            dtype="bfloat16",
            param_dtype="float32",
            quantization="none",
            quantize_dense=False,
            remat="none",
            num_experts=8,
            top_k=2,
            moe_every=1,
            first_dense_layers=0,
            capacity_factor=1.25,
            eval_capacity_factor=2.0,
            min_capacity=4,
            renormalize=True,  # Mixtral: the two gates sum to 1
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
        mesh=dict(data=-1, fsdp=1, expert=8, context=1, tensor=1),
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
            tokenizer="mistralai/Mistral-7B-v0.1",
            documents=True,  # attention, positions and loss stop at document ends
            seq_len=1024,
            batch_size=128,
            on_error="skip",
        ),
        train=dict(
            steps=50_000,
            stop_at=0,
            lr=6e-4,
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
            balance_coef=1e-2,
            z_coef=1e-3,
            mtp_coef=0.3,
            log_every=50,
            eval_every=1_000,
            eval_batches=20,
            ckpt_every=1_000,
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
    if variant == "smoke":
        config.model.update(d_model=64, num_layers=2, num_heads=4, head_dim=16, d_ff=160,
                            dtype="float32")
        config.data.update(source="stdlib", streaming=False, tokenizer="byte", seq_len=32,
                           batch_size=16)
        config.train.update(steps=6, warmup_steps=2, log_every=2, eval_every=3, eval_batches=2,
                            ckpt_every=3)
        config.mesh.update(expert=1)
    return config
