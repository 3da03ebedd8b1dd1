"""GLM-4.5-Air: 106B parameters total and 12B active per token (GLM-4.5 report, 2025), plus a
2.4B multi-token prediction module. Counted here: 106.9B total and 13.4B active with the
embedding and the output head, 12.2B active without them.

46 layers, d_model 4096, 96 query heads of 128 sharing 8 key-value heads, biases on the query,
key and value projections, rotary positions on the first half of each head's dims only
(partial_rotary_factor 0.5), no q/k norm (GLM-4.5 has it). The first layer has a dense
SwiGLU FFN of width 10944, the other 45 have 128 routed experts of width 1408 (top-8, sigmoid
scores with the auxiliary-loss-free bias, renormalized, no groups, x1.0) plus 1 shared
expert. Untied 152k vocabulary. Weights: `python -m moejax.convert from-hf
zai-org/GLM-4.5-Air --workdir DIR`.
  python -m moejax.plan --config configs/glm45_air.py:h200x8 --hbm_gib 141
Variants (mesh per hardware):
  h200x8  one 8 x H200-141GB node: fsdp=8, one sequence of 4,096 per device. The planner
          says AdamW does not fit: a peak of 365 GiB per device (state and gradients 203),
          231 with weights and both moments bfloat16 (model.param_dtype, train.moment_dtype)
  v5p64   a TPU v5p slice of 64 chips: fsdp=4 x expert=16, 256 sequences in micro-batches
          of one per chip (docs/memory.md)
  smoke   the same kinds of everything but size, for tests
Every key is explained in configs/tiny.py.
"""

from moejax.config_lib import config_dict, parse_variant


def get_config(arg=None):
    variant = parse_variant(arg, ("h200x8", "v5p64", "smoke"))
    config = config_dict(
        seed=0,
        model=dict(
            vocab_size=151_552,
            d_model=4096,
            num_layers=46,
            num_heads=96,
            num_kv_heads=8,
            head_dim=128,  # 96 x 128 = 12288 wider than d_model, as released
            d_ff=1408,
            dense_d_ff=10_944,
            activation="swiglu",
            swiglu_limit=7.0,
            rope_theta=1e6,
            rope_fraction=0.5,  # the first 64 of each head's 128 dims rotate, the rest pass
            rope_scaling="none",
            rope_factor=1.0,
            rope_original_max_len=0,
            rope_beta_fast=32.0,
            rope_beta_slow=1.0,
            rope_mscale=0.0,
            rope_mscale_all_dim=0.0,
            rope_truncate=True,
            norm_eps=1e-5,
            qk_norm="none",
            qkv_bias=True,
            attention="gqa",
            q_lora_rank=0,
            kv_lora_rank=0,
            qk_nope_head_dim=0,
            qk_rope_head_dim=0,
            v_head_dim=0,
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
            num_experts=128,
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
            bias_rate=1e-3,  # auxiliary-loss-free balancing (GLM-4.5: 1e-3)
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
            num_shared_experts=1,
            shared_gate=False,
            moe_bias=False,
            mtp_layers=1,
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
            tokenizer="zai-org/GLM-4.5-Air",
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
            optimizer="adamw",  # adamw | muon
            muon_lr_scale="consistent_rms",
            qk_clip=0.0,  # MuonClip's logit threshold; 0 = off
            offload_optimizer=False,
            grad_clip=1.0,
            grad_accum=1,
            balance_coef=1e-4,  # small: the bias does the balancing (GLM-4.5: 1e-4)
            z_coef=1e-3,
            mtp_coef=0.3,  # GLM-4.5: 0.3, then 0.1 late in pretraining
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
    if variant == "h200x8":
        config.mesh.update(fsdp=8)
        config.data.update(batch_size=8)
    if variant == "v5p64":
        config.mesh.update(fsdp=4, expert=16)
        config.train.update(grad_accum=4)  # micro-batches of one sequence per chip
    if variant == "smoke":
        config.model.update(vocab_size=0, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=16, d_ff=32, dense_d_ff=96, num_experts=8, top_k=2,
                            max_seq_len=2048, dtype="float32")
        config.data.update(source="stdlib", streaming=False, tokenizer="byte", seq_len=32,
                           batch_size=16)
        config.train.update(steps=4, warmup_steps=1, log_every=2, eval_every=2, eval_batches=1,
                            ckpt_every=2)
        config.mesh.update(fsdp=1, data=-1)
    return config
