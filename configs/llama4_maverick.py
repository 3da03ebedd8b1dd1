"""Llama-4-Maverick-shaped: 400B parameters total, 17B active per token (Meta, April 2025).

48 layers, d_model 5120, 40 query heads of 128 sharing 8 key-value heads; MoE in every other
layer (128 SwiGLU experts of width 8192, top-1 by a sigmoid score, and one shared expert of
the same width), dense SwiGLU FFNs of width 16,384 in the rest; untied 202k vocabulary.
What it leaves out of Llama 4: the position-free (NoPE) attention of every fourth layer and
the 8,192-token attention chunks of the others (at 8,192-token sequences both cost what
rotary, causal attention costs, which is what the planner prices), and the router score
scaling the expert's input rather than its output.
  python -m moejax.plan --config configs/llama4_maverick.py:v5p256 --target v5p
Variants:
  v5p256  a TPU v5p-256 slice (128 chips) as AI-Hypercomputer/tpu-recipes ran it with
          MaxText: fsdp=32 x tensor=4, 512 sequences of 8,192, dropless, full recompute
  smoke   the same shapes of everything but size, for tests
Every key is explained in configs/tiny.py.
"""

from moejax.config_lib import config_dict, parse_variant


def get_config(arg=None):
    variant = parse_variant(arg, ("v5p256", "smoke"))
    config = config_dict(
        seed=0,
        model=dict(
            vocab_size=202_048,
            d_model=5120,
            num_layers=48,
            num_heads=40,
            num_kv_heads=8,
            head_dim=128,
            d_ff=8192,
            dense_d_ff=16_384,
            activation="swiglu",
            swiglu_limit=7.0,
            rope_theta=5e5,
            rope_fraction=1.0,
            rope_scaling="none",  # none | yarn (the rope_* keys below: configs/tiny.py)
            rope_factor=1.0,
            rope_original_max_len=0,
            rope_beta_fast=32.0,
            rope_beta_slow=1.0,
            rope_mscale=0.0,
            rope_mscale_all_dim=0.0,
            rope_truncate=True,
            norm_eps=1e-5,
            qk_norm="none",
            qkv_bias=False,
            attention="gqa",
            q_lora_rank=0,
            kv_lora_rank=0,
            qk_nope_head_dim=0,
            qk_rope_head_dim=0,
            v_head_dim=0,
            max_seq_len=8192,
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
            router_score="sigmoid",
            routing="tokens",
            bias_rate=0.0,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
            num_shared_experts=1,
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
            tokenizer="meta-llama/Llama-4-Maverick-17B-128E",
            documents=True,  # attention, positions and loss stop at document ends
            seq_len=8192,
            batch_size=512,
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
    if variant == "v5p256":
        config.mesh.update(fsdp=32, tensor=4)
        config.model.update(dispatch="dropless")
    if variant == "smoke":
        config.model.update(vocab_size=0, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=16, d_ff=32, dense_d_ff=64, num_experts=16, max_seq_len=2048,
                            dtype="float32")
        config.data.update(source="stdlib", streaming=False, tokenizer="byte", seq_len=32,
                           batch_size=16)
        config.train.update(steps=4, warmup_steps=1, log_every=2, eval_every=2, eval_batches=1,
                            ckpt_every=2)
        config.mesh.update(fsdp=1, data=-1)
    return config
