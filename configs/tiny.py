"""The embedded default: a 4-layer, 8-expert top-2 MoE LM on the Python standard library.

Trains in a few minutes on 2 CPU cores with nothing to download:
  python -m moejax.train --config configs/tiny.py --workdir runs/tiny
Variants: `:dense` (num_experts = 0, same active FLOPs), `:smoke` (seconds, for tests).
"""

from moejax.config_lib import config_dict, parse_variant


def get_config(arg=None):
    variant = parse_variant(arg, ("dense", "smoke"))
    config = config_dict(
        seed=0,  # the init, router noise and data order; in [0, 2**32)
        model=dict(
            vocab_size=0,  # 0 = the tokenizer's vocabulary size
            d_model=128,
            num_layers=4,
            num_heads=4,
            num_kv_heads=0,  # key-value heads (grouped-query attention); 0 = num_heads
            head_dim=32,
            d_ff=256,  # per expert; a dense model uses top_k * d_ff
            dense_d_ff=0,  # dense FFN layers of an MoE model (first_dense_layers...); 0 = d_ff
            activation="swiglu",  # swiglu | geglu | gelu | relu | clamped_swiglu (gpt-oss)
            swiglu_limit=7.0,  # clamped_swiglu (gpt-oss): gate <= this, |linear half| <= this
            rope_theta=10_000.0,
            rope_fraction=1.0,  # the share of each head\'s dims that rotate (GLM-4.5: 0.5)
            # Rotary scaling: none | yarn (DeepSeek-V3, Kimi K2), set by the rope_* keys below
            rope_scaling="none",
            rope_factor=1.0,  # yarn: the context extension; 1 = none
            rope_original_max_len=0,  # yarn: the pretraining context; 0 = max_seq_len
            rope_beta_fast=32.0,  # yarn: pairs turning more often than this keep their frequency
            rope_beta_slow=1.0,  # yarn: pairs turning less often are divided by rope_factor
            rope_mscale=0.0,  # yarn: cos, sin x mscale(this) / mscale(all_dim); 0 = not given
            rope_mscale_all_dim=0.0,  # yarn: softmax scale x mscale(this)**2; 0 = off
            rope_truncate=True,  # yarn: the ramp ends rounded to whole pairs (gpt-oss: False)
            norm_eps=1e-6,  # RMSNorm epsilon
            qk_norm="none",  # RMSNorm on queries and keys: none | head (Qwen3) | all (OLMoE)
            qkv_bias=False,  # biases on the query, key and value projections (Qwen2-MoE)
            # Attention: gqa (grouped-query) | mla (DeepSeek-V3 multi-head latent attention,
            # moejax/model/mla.py; head_dim and num_kv_heads unused, the five below instead)
            attention="gqa",
            q_lora_rank=0,  # mla: the query's low-rank width; 0 = a full-rank query
            kv_lora_rank=0,  # mla: the cached latent key-value width
            qk_nope_head_dim=0,  # mla: per head, the query-key dims without rotation
            qk_rope_head_dim=0,  # mla: ... with rotation (one rotary key for all heads)
            v_head_dim=0,  # mla: per head, the value dims
            max_seq_len=2048,  # longest sequence the positions are meant for
            # attend to the last this many positions (itself included); 0 = all (causal)
            sliding_window=0,
            full_attention_every=0,  # with a window: each n-th layer full (gpt-oss 2); 0 = none
            attention_sinks=False,  # a learned per-head logit in every softmax row (gpt-oss)
            out_bias=False,  # a bias on the attention's output projection (gpt-oss)
            tie_embeddings=True,
            # Compute: float32 | bfloat16 (attention, FFN, experts). Router, norm statistics,
            # logits and loss are float32 whatever this says.
            dtype="float32",
            param_dtype="float32",  # master weights and AdamW's second moment
            # Quantized training (QAT, Qwix) of the expert matmuls: none | int8 | fp8
            # (float8_e4m3fn operands); docs/architecture.md, "Precision".
            quantization="none",
            quantize_dense=False,  # True: the attention and dense FFN matmuls too
            remat="none",  # recompute in the backward pass: none | full | matmuls (keeps the
            # attention and FFN matmul outputs, recomputes the rest, MoE dispatch included) |
            # offload (as full, each layer's input kept in host memory instead of HBM)
            num_experts=8,  # 0 = dense
            top_k=2,
            moe_every=1,  # MoE in every n-th layer, dense FFN in the others
            first_dense_layers=0,
            capacity_factor=1.25,
            eval_capacity_factor=2.0,
            min_capacity=4,  # fewest slots per expert and group; 0 = no floor
            renormalize=False,  # True: the k gates sum to 1 (Mixtral)
            jitter_eps=0.0,  # router input noise in training, in [0, 1); 0 = off
            num_groups=0,  # capacity groups per global batch; 0 = one per token shard
            # How tokens reach experts: capacity ([E, C, d] buffers, overflow dropped) |
            # dropless (every assignment, grouped matmul, ragged all-to-all across devices) |
            # dropless_ring (the same, all-gather and reduce-scatter across devices)
            dispatch="capacity",
            router_score="softmax",  # softmax | sigmoid (DeepSeek-V3)
            # tokens: token choice | experts: expert choice (non-causal!) | balanced: token t
            # gets experts (t*k + j) mod E, equal load by construction (bench train only)
            routing="tokens",
            bias_rate=0.0,  # auxiliary-loss-free balancing step (DeepSeek-V3: 1e-3); 0 = off
            n_group=1,  # expert groups (DeepSeek-V3: 8); 1 = no group limit
            topk_group=1,  # a token picks its experts from its topk_group best groups
            routed_scaling_factor=1.0,  # routed gates times this, after renormalize
            num_shared_experts=0,  # always-on experts added to the routed ones
            shared_gate=False,  # scale the shared experts' output by sigmoid(x @ w) (Qwen2-MoE)
            moe_bias=False,  # learned biases: router logits, both expert projections (gpt-oss)
            # Multi-token prediction (DeepSeek-V3): modules predicting one token further each
            mtp_layers=0,  # 0 = none
        ),
        # Device mesh (moejax/parallel.py); one axis may be -1: all remaining devices.
        # data: weights replicated; fsdp: weights and optimizer split (ZeRO-3); expert:
        # experts split, tokens sent by all-to-all; context: the sequence split (long
        # sequences); tensor: heads and FFN hidden split.
        mesh=dict(data=-1, fsdp=1, expert=1, context=1, tensor=1),
        data=dict(
            source="stdlib",  # stdlib | files | hub | prepared (a store of one of them)
            # files: a glob of local files; hub: the dataset name; prepared: the folder that
            # `python -m moejax.data prepare --config ... --out DIR` wrote (moejax/data/store.py)
            path="",
            # Weighted prepared stores instead of data.path (with source=prepared, path=""):
            # "DIR_A:0.3,DIR_B:0.7", weights normalised; "" = one source (moejax/data/mixture.py)
            mixture="",
            # files: text | json | parquet | chat (JSONL conversations) | replay (JSONL token
            # sequences with their recorded experts: moejax/data/replay.py)
            format="text",
            hub_config="",  # hub: the dataset's config name
            split="train",
            streaming=False,  # hub: stream instead of downloading the whole set
            shuffle_buffer=256,  # streaming: train rows drawn from this many per host; 0: in order
            text_key="text",
            # Held out for eval: whole documents, long ones in chunks. 0: none (for prepare; train
            # stops in one line when it opens the data, having nothing to evaluate).
            eval_fraction=0.05,
            tokenizer="byte",  # byte | a Hugging Face tokenizer name or path
            # Each document of a packed row alone: attention stops at its end, positions start
            # at 0, no loss across it (the EOS ends it). False: rows as one sequence (before
            # data.documents). Checkpoints are the same either way.
            documents=True,
            seq_len=128,
            batch_size=32,  # sequences per step, all hosts together
            on_error="skip",  # files: an unreadable or non-UTF-8 file is skipped (counted) | fail
        ),
        train=dict(
            steps=600,
            stop_at=0,  # stop (with a checkpoint) after this step, schedule unchanged; 0 = never
            lr=3e-3,  # the peak; 0 = a frozen run (it only evaluates)
            schedule="cosine",  # cosine | rsqrt
            warmup_steps=50,  # 0 = none (cosine only: rsqrt divides by it)
            min_lr_ratio=0.1,
            weight_decay=0.1,  # decoupled (AdamW's, Muon's alike); 0 = off
            b1=0.9,
            b2=0.95,
            moment_dtype="float32",  # the first moment (AdamW's, Muon's): float32 | bfloat16
            # adamw | muon: Muon on the hidden matrices (attention, FFN, experts), AdamW on
            # embeddings, unembedding, norms, routers, sinks and biases (moejax/run/optim.py)
            optimizer="adamw",
            # Muon's update x: consistent_rms (0.2 sqrt(max(fan_in, fan_out)), AdamW's RMS:
            # the same lr and weight_decay serve both) | width (sqrt(max(1, fan_out/fan_in)))
            # | none
            muon_lr_scale="consistent_rms",
            # MuonClip: after each step, the query and key weights of every head whose largest
            # attention logit in the step passed this are scaled back to it (Kimi K2: 100);
            # 0 = off
            qk_clip=0.0,
            # the optimizer's moments in host memory, brought to the device for the update
            # (memory kind pinned_host on TPU and GPU; no effect on CPU)
            offload_optimizer=False,
            grad_clip=1.0,
            grad_accum=1,  # micro-batches per step
            balance_coef=1e-2,  # the load-balancing loss's weight; 0 = off
            z_coef=1e-3,  # the router z-loss's weight; 0 = off
            mtp_coef=0.3,  # the multi-token prediction loss's weight (DeepSeek-V3: 0.3); 0 = off
            log_every=25,
            eval_every=200,
            eval_batches=8,
            ckpt_every=200,
            keep_checkpoints=2,
            keep_best=True,  # also keep the checkpoint with the lowest eval loss
            peak_tflops=0.0,  # per device, for MFU; 0 = look the device up
            max_nonfinite_steps=5,  # stop after this many skipped (NaN / inf) steps in a row
            collapse_threshold=0.1,  # warn if an expert gets < this x 1/E of the load; 0 = off
            collapse_checks=4,  # ... at this many log points in a row
            # Training health (docs/reliability.md): warn when an expert's gradient or update
            # has been 0 for this many steps in a row; 0 = off
            frozen_expert_steps=100,
            watchdog_factor=10.0,  # warn when a step takes this x the median step; 0 = off
            watchdog_timeout_s=1800.0,  # end the run (exit 3) if a step waits this long; 0 = never
            init_from="",  # a dense run's workdir: start from its newest checkpoint (upcycling)
            # Every checkpoint of the workdir is damaged (checkpoints/ and best/): False = stop
            # with an error; True = start over at step 0 (the damaged ones stay set aside).
            restart_if_damaged=False,
        ),
    )
    if variant == "dense":
        config.model.num_experts = 0
    if variant == "smoke":
        config.model.update(d_model=32, num_layers=2, num_heads=2, head_dim=16, d_ff=64)
        config.data.update(seq_len=32, batch_size=16)
        config.train.update(steps=6, warmup_steps=2, log_every=2, eval_every=3, eval_batches=2,
                            ckpt_every=3)
    return config
