"""gpt-oss-120b-shaped: 116.8B parameters total, 5.1B active per token (OpenAI's gpt-oss model
card, 2025).

gpt-oss-20b's layer (configs/gpt_oss_20b.py) 36 times with 128 experts, top-4. Fine-tuning the
release:
  python -m moejax.convert from-hf openai/gpt-oss-120b --workdir runs/gpt_oss_120b
Variants (mesh per hardware; docs/memory.md has the planner's answer for each):
  h100x16  two 8 x H100-80GB nodes: fsdp=2 x expert=8
  v5p64    a TPU v5p slice of 64 chips: fsdp=4 x expert=16
  smoke    the same shapes of everything but size, for tests
On a GPU cuDNN has no sink input: moejax runs its kernel and rescales each row for the sink
(model/cudnn_attention.py); with documents that costs a second q.k in XLA (plan --target
prices it; docs/performance.md, rows (m) and (n)). On a TPU, splash takes them.
Every key is explained in configs/tiny.py.
"""

from moejax.config_lib import config_dict, parse_variant


def get_config(arg=None):
    variant = parse_variant(arg, ("h100x16", "v5p64", "smoke"))
    config = config_dict(
        seed=0,
        model=dict(
            vocab_size=201_088,
            d_model=2880,
            num_layers=36,
            num_heads=64,
            num_kv_heads=8,
            head_dim=64,
            d_ff=2880,
            dense_d_ff=0,
            activation="clamped_swiglu",
            swiglu_limit=7.0,
            rope_theta=150_000.0,
            rope_fraction=1.0,
            rope_scaling="yarn",
            rope_factor=32.0,
            rope_original_max_len=4096,
            rope_beta_fast=32.0,
            rope_beta_slow=1.0,
            rope_mscale=0.0,
            rope_mscale_all_dim=0.0,
            rope_truncate=False,
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
            sliding_window=128,
            full_attention_every=2,
            attention_sinks=True,
            out_bias=True,
            tie_embeddings=False,
            dtype="bfloat16",
            param_dtype="float32",
            quantization="none",
            quantize_dense=False,
            remat="full",
            num_experts=128,
            top_k=4,
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
            moe_bias=True,
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
            tokenizer="openai/gpt-oss-120b",
            documents=True,  # attention, positions and loss stop at document ends
            seq_len=4096,
            batch_size=256,
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
    if variant == "h100x16":
        config.mesh.update(fsdp=2, expert=8)
        config.data.update(batch_size=64)
        config.train.update(grad_accum=4)  # micro-batches of one sequence per device
    if variant == "v5p64":
        config.mesh.update(fsdp=4, expert=16)
        config.train.update(grad_accum=4)
    if variant == "smoke":
        config.model.update(vocab_size=0, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=16, d_ff=32, num_experts=16, top_k=4, max_seq_len=2048,
                            sliding_window=8, dtype="float32")
        config.data.update(source="stdlib", streaming=False, tokenizer="byte", seq_len=32,
                           batch_size=16)
        config.train.update(steps=4, warmup_steps=1, log_every=2, eval_every=2, eval_batches=1,
                            ckpt_every=2)
        config.mesh.update(fsdp=1, data=-1)
    return config
