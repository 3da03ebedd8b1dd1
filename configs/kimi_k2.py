"""Kimi K2 (Moonshot AI): about 1.04T parameters total and 32B active per token; DeepSeek-V3's
architecture with more experts and fewer heads.

61 layers, d_model 7168, multi-head latent attention with 64 heads (DeepSeek-V3: 128; the same
1536 / 512 latents and 128 + 64 / 128 head dims), YaRN to 128k positions (factor 32 over 4096,
beta_fast = beta_slow = 1, rope_theta 50000). The first layer has a dense SwiGLU FFN of width
18432, the other 60 have 384 routed experts of width 2048 (top-8 of all, no group limit,
sigmoid scores with the auxiliary-loss-free bias, renormalized, x2.827) plus 1 shared expert.
Untied 164k vocabulary; no multi-token prediction. Weights: `python -m moejax.convert from-hf
moonshotai/Kimi-K2-Instruct --workdir DIR` (its config.json as released, FP8 blocks dequantized).
  python -m moejax.plan --config configs/kimi_k2.py:h100x256
Variants (mesh per hardware; docs/memory.md has the planner's answer for each):
  h100x8       one 8 x H100-80GB node: fsdp=8 (the planner says it cannot fit, and by how much)
  h100x256     32 nodes of 8 x H100: fsdp=32 x expert=8
  h200x256     32 nodes of 8 x H200-141GB: fsdp=32 x expert=8
  v5p512       a TPU v5p slice of 512 chips: fsdp=16 x expert=32
  ironwood256  a TPU7x (Ironwood) slice of 256 chips: fsdp=16 x expert=16
  smoke        the same kinds of everything but size, for tests
Every key is explained in configs/tiny.py.
"""

from moejax.config_lib import config_dict, parse_variant


def get_config(arg=None):
    variant = parse_variant(arg, ("h100x8", "h100x256", "h200x256", "v5p512", "ironwood256",
                                  "smoke"))
    config = config_dict(
        seed=0,
        model=dict(
            vocab_size=163_840,
            d_model=7168,
            num_layers=61,
            num_heads=64,
            num_kv_heads=0,  # mla: unused
            head_dim=192,  # mla: unused (the query-key width, 128 + 64, for reading)
            d_ff=2048,
            dense_d_ff=18_432,
            activation="swiglu",
            swiglu_limit=7.0,
            rope_theta=50_000.0,
            rope_fraction=1.0,
            rope_scaling="yarn",
            rope_factor=32.0,
            rope_original_max_len=4096,
            rope_beta_fast=1.0,
            rope_beta_slow=1.0,
            rope_mscale=1.0,
            rope_mscale_all_dim=1.0,
            rope_truncate=True,
            norm_eps=1e-6,
            qk_norm="none",
            qkv_bias=False,
            attention="mla",
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            max_seq_len=131_072,
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
            num_experts=384,
            top_k=8,
            moe_every=1,
            first_dense_layers=1,
            capacity_factor=1.25,
            eval_capacity_factor=2.0,
            min_capacity=4,
            renormalize=True,
            jitter_eps=0.0,
            num_groups=0,
            dispatch="capacity",
            router_score="sigmoid",
            routing="tokens",
            bias_rate=1e-3,  # auxiliary-loss-free balancing
            n_group=1,  # no group limit
            topk_group=1,
            routed_scaling_factor=2.827,
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
            # Kimi K2 ships a tiktoken model, not a tokenizer.json: point this at a tokenizer.json
            # made from it (moejax reads tokenizers' format).
            tokenizer="moonshotai/Kimi-K2-Instruct",
            documents=True,  # attention, positions and loss stop at document ends
            seq_len=4096,
            batch_size=1024,
            on_error="skip",
        ),
        train=dict(
            steps=100_000,
            stop_at=0,
            lr=2.2e-4,
            schedule="cosine",
            warmup_steps=2_000,
            min_lr_ratio=0.1,
            weight_decay=0.1,
            b1=0.9,
            b2=0.95,
            moment_dtype="float32",
            # Kimi K2 itself trained with MuonClip: --config.train.optimizer=muon
            # --config.train.qk_clip=100 (same lr and weight decay under consistent_rms).
            # AdamW here so docs/memory.md's rows stay the planner's answer for this file.
            optimizer="adamw",  # adamw | muon
            muon_lr_scale="consistent_rms",
            qk_clip=0.0,  # MuonClip's logit threshold; 0 = off
            offload_optimizer=False,
            grad_clip=1.0,
            grad_accum=1,
            balance_coef=1e-4,  # small: the bias does the balancing (DeepSeek-V3: 1e-4)
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
    if variant == "h100x8":
        config.mesh.update(fsdp=8)
        config.data.update(batch_size=32)
    if variant == "h100x256":
        config.mesh.update(fsdp=32, expert=8)
    if variant == "h200x256":
        config.mesh.update(fsdp=32, expert=8)
    if variant == "v5p512":
        config.mesh.update(fsdp=16, expert=32)
    if variant == "ironwood256":
        config.mesh.update(fsdp=16, expert=16)
    if variant == "smoke":
        config.model.update(vocab_size=0, d_model=64, num_layers=4, num_heads=4, head_dim=24,
                            q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                            qk_rope_head_dim=8, v_head_dim=16, d_ff=32, dense_d_ff=128,
                            first_dense_layers=1, num_experts=16, top_k=4,
                            rope_original_max_len=64, max_seq_len=2048, dtype="float32")
        config.data.update(source="stdlib", streaming=False, tokenizer="byte", seq_len=32,
                           batch_size=16)
        config.train.update(steps=4, warmup_steps=1, log_every=2, eval_every=2, eval_batches=1,
                            ckpt_every=2)
        config.mesh.update(fsdp=1, data=-1)
    return config
