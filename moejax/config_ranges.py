"""The range of every numeric config key, and the one-line error a value outside it gets: the
bottom of the config checks (moejax/config_lib.py), importable from every layer."""

import math

import ml_collections


class ConfigError(ValueError):
    """A bad config value: the message names the key and what is allowed."""


def first_line(e: Exception) -> str:
    """An exception in a few words, for a one-line message."""
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


# The range of every numeric key that constants bound, and what its edge values mean. validate
# checks each, finite included, before the rules that relate keys (top_k, seq_len, num_groups,
# warmup_steps, moe_every, first_dense_layers: beside their rules below; mesh.*: check_mesh).
RANGES = {
    "seed": ("in [0, 2**32)", ""),  # what grain's index shuffle takes
    "model.vocab_size": (">= 0", "0 = the tokenizer's"),
    "model.d_model": (">= 1", ""),
    "model.num_layers": (">= 1", ""),
    "model.num_heads": (">= 1", ""),
    "model.num_kv_heads": (">= 0", "0 = num_heads"),
    "model.head_dim": (">= 1", ""),
    "model.d_ff": (">= 1", ""),
    "model.dense_d_ff": (">= 0", "0 = d_ff"),
    "model.rope_theta": ("> 0", ""),
    "model.rope_fraction": ("in (0, 1]", ""),
    "model.rope_factor": (">= 1", "1 = none"),
    "model.rope_original_max_len": (">= 0", "0 = max_seq_len"),
    "model.rope_beta_fast": ("> 0", ""),
    "model.rope_beta_slow": ("> 0", ""),
    "model.rope_mscale": (">= 0", "0 = not given"),
    "model.rope_mscale_all_dim": (">= 0", "0 = off"),
    "model.norm_eps": ("> 0", ""),
    "model.max_seq_len": (">= 1", ""),
    "model.sliding_window": (">= 0", "0 = all (causal)"),
    "model.full_attention_every": (">= 0", "0 = none"),
    "model.swiglu_limit": ("> 0", ""),
    "model.num_experts": (">= 0", "0 = dense"),
    "model.moe_every": (">= 1", ""),
    "model.first_dense_layers": (">= 0", ""),
    "model.capacity_factor": ("> 0", ""),
    "model.eval_capacity_factor": ("> 0", ""),
    "model.min_capacity": (">= 0", "0 = no floor"),
    "model.jitter_eps": ("in [0, 1)", "0 = off"),
    "model.bias_rate": (">= 0", "0 = off"),
    "model.n_group": (">= 1", "1 = no group limit"),
    "model.topk_group": (">= 1", ""),
    "model.routed_scaling_factor": ("> 0", ""),
    "model.num_shared_experts": (">= 0", ""),
    "model.q_lora_rank": (">= 0", "0 = a full-rank query"),
    "model.kv_lora_rank": (">= 0", ""),
    "model.qk_nope_head_dim": (">= 0", ""),
    "model.qk_rope_head_dim": (">= 0", ""),
    "model.v_head_dim": (">= 0", ""),
    "model.mtp_layers": (">= 0", "0 = none"),
    "data.batch_size": (">= 1", ""),
    "data.shuffle_buffer": (">= 0", "rows; 0: a stream's rows in order"),
    "data.eval_fraction": ("in [0, 1)", ""),
    "train.steps": (">= 1", ""),
    "train.stop_at": (">= 0", "0 = never"),
    "train.lr": (">= 0", "0 = a frozen run"),
    "train.min_lr_ratio": ("in [0, 1]", ""),
    "train.weight_decay": (">= 0", ""),
    "train.b1": ("in [0, 1)", ""),
    "train.b2": ("in [0, 1)", ""),
    "train.qk_clip": (">= 0", "0 = off"),
    # optax.clip_by_global_norm(0) scales every gradient to zero: there is no "off" value.
    "train.grad_clip": ("> 0", "a global-norm bound; 0 would zero every update"),
    "train.grad_accum": (">= 1", ""),
    "train.balance_coef": (">= 0", "0 = off"),
    "train.z_coef": (">= 0", "0 = off"),
    "train.mtp_coef": (">= 0", "0 = off (the loss is still logged)"),
    "train.log_every": (">= 1", ""),
    "train.eval_every": (">= 1", ""),
    "train.eval_batches": (">= 1", ""),
    "train.ckpt_every": (">= 1", ""),
    "train.keep_checkpoints": (">= 1", ""),
    "train.peak_tflops": (">= 0", "0 = look the device up"),
    "train.max_nonfinite_steps": (">= 1", ""),
    "train.collapse_threshold": ("in [0, 1)", "a fraction of the uniform load 1/E; 0 = off"),
    "train.collapse_checks": (">= 1", ""),
    "train.frozen_expert_steps": (">= 0", "0 = off"),
    "train.watchdog_factor": (">= 0", "0 = off"),
    "train.watchdog_timeout_s": (">= 0", "0 = never"),
}


def check_number(key: str, value, allowed: str, meaning: str = "") -> None:
    """`value` finite and within `allowed` ('>= 1', '> 0', 'in [0, 1)'), or one ConfigError
    line naming the key, the value, the range and what an edge value means."""
    finite = not isinstance(value, float) or math.isfinite(value)
    if not (finite and in_range(value, allowed)):
        raise ConfigError(f"{key}={value!r}: must be {'' if finite else 'finite and '}{allowed}"
                          + (f" ({meaning})" if meaning else ""))


def range_of(key: str) -> str:
    """What a numeric key allows, in words ('>= 0 (0 = off)'); '' for one RANGES does not bound
    by constants (the rules relating it to other keys say)."""
    if key.startswith("mesh."):
        return ">= 1, or -1 for all remaining devices"
    allowed, meaning = RANGES.get(key, ("", ""))
    return allowed + (f" ({meaning})" if meaning else "")


def in_range(value, allowed: str) -> bool:
    def number(text):  # '1', '0.5', '2**32'
        base, _, power = text.partition("**")
        return int(base) ** int(power) if power else float(text)

    if allowed.startswith("in "):  # 'in [0, 1)': a bracket includes its end, a parenthesis not
        low, high = (number(s) for s in allowed[4:-1].split(", "))
        return ((low <= value) if allowed[3] == "[" else (low < value)) and (
            (value <= high) if allowed[-1] == "]" else (value < high))
    op, bound = allowed.split()
    return value >= number(bound) if op == ">=" else value > number(bound)


def numeric_leaves(config, prefix: str = "") -> list[tuple[str, int | float]]:
    """('model.d_model', 128), ... for every int or float key of a ConfigDict (not bools)."""
    leaves = []
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            leaves += numeric_leaves(value, f"{prefix}{name}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            leaves.append((prefix + name, value))
    return leaves
