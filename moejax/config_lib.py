"""Helpers for configs/*.py: variant strings and checks that run before anything compiles."""

import functools
import math
import os
import re
import tempfile
from fractions import Fraction

import ml_collections

from moejax.config_ranges import (  # noqa: F401  (ConfigError, first_line: used as config_lib's)
    RANGES,
    ConfigError,
    check_number,
    first_line,
    numeric_leaves,
    range_of,
)


def parse_variant(arg: str | None, allowed: tuple[str, ...]) -> str | None:
    """`--config configs/x.py:name` passes "name"; no suffix passes None."""
    if arg and arg not in allowed:
        raise ConfigError(f"unknown variant {arg!r}; allowed: {', '.join(allowed)}")
    return arg or None


def config_dict(**groups) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(groups)


# configs/ sits beside the package in a checkout (an editable install), not inside it.
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def defaults() -> ml_collections.ConfigDict:
    """configs/tiny.py next to the package: every key a run has, with its default."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny", os.path.join(CONFIGS, "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config.json a run or conversion wrote. A key added since (a new feature) takes its
    default, which is what the older version computed."""
    import json

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"--workdir={workdir!r}: no config.json in it; allowed: the workdir "
                          "of a run (train) or of a conversion (convert from-hf)")
    with open(path) as f:
        saved = json.load(f)
    config = defaults()
    model = saved.get("model", {})
    if "dropless" in model:  # a boolean until model.dispatch named the three paths
        model["dispatch"] = "dropless" if model.pop("dropless") else "capacity"
    for group, values in saved.items():
        if group in config and isinstance(values, dict):
            config[group].update(values)
        else:
            config[group] = values
    return config


def mesh_form() -> str:
    from moejax.parallel import AXES

    return (f"comma-separated AXIS=SIZE, each of {', '.join(AXES)} at most once, sizes >= 1 "
            "and at most one -1 (all remaining devices), e.g. 'fsdp=8,expert=8'")


def parse_mesh(text: str, flag: str = "--mesh") -> dict:
    """'fsdp=8,expert=-1' -> {'fsdp': 8, 'expert': -1}: the config's mesh.* spelled as one
    flag (plan's --mesh); check_mesh then checks it as it checks the config's."""
    from moejax.parallel import AXES

    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, size = (s.strip() for s in part.partition("="))
        problem = (f"{part!r} is not AXIS=SIZE" if not eq or not re.fullmatch(r"-?\d+", size)
                   else f"unknown axis {name!r}" if name not in AXES
                   else f"axis {name!r} named twice" if name in sizes else None)
        if problem:
            raise ConfigError(f"{flag}={text!r}: {problem}; allowed: {mesh_form()}")
        sizes[name] = int(size)
    for name, size in sizes.items():
        if not (size >= 1 or size == -1):
            raise ConfigError(f"{flag}={text!r}: {name}={size} is not >= 1 or -1; allowed: "
                              + mesh_form())
    return sizes


def check_mesh(mesh, num_devices: int | None = None) -> dict:
    """The mesh.* sizes of train's config, or of plan's after its --mesh: each >= 1 or -1 (all
    remaining devices), at most one -1, and no more devices than the `num_devices` that exist
    (when known). Returns {axis: size}, the -1 filled in."""
    from moejax import parallel

    given = {a: mesh.get(a, 1) for a in parallel.AXES}
    if list(given.values()).count(-1) > 1:
        raise ConfigError(f"mesh={', '.join(f'{a}={s}' for a, s in given.items())!r}: allowed: "
                          "at most one axis -1 (all remaining devices)")
    for axis, size in given.items():
        if not (size >= 1 or size == -1):
            raise ConfigError(f"mesh.{axis}={size!r}: must be >= 1, or -1 for all remaining "
                              "devices")
    if num_devices is None:
        return given
    sizes = parallel.mesh_sizes(given, num_devices)
    if (used := math.prod(sizes.values())) > num_devices:
        raise ConfigError(f"mesh={' x '.join(f'{a}={s}' for a, s in sizes.items())!r}: needs "
                          f"{used} devices; allowed: at most the {num_devices} that exist")
    return sizes


def validate(config, num_devices: int) -> None:
    """Fail fast, before anything compiles, with one line naming the key, its value and what is
    allowed. Checks that need files (data, tokenizer, checkpoints) live next to their readers."""
    m, d, t = config.model, config.data, config.train

    def check(ok, key, value, problem):
        if not ok:
            raise ConfigError(f"{key}={value!r}: {problem}")

    def one_of(key, value, allowed):
        check(value in allowed, key, value, f"unknown; allowed: {', '.join(allowed)}")

    # Every number first: a zero or a NaN here would otherwise surface as a division by zero
    # below, or as a NaN loss once training has started.
    for key, (allowed, meaning) in RANGES.items():
        check_number(key, functools.reduce(lambda c, k: c[k], key.split("."), config), allowed,
                     meaning)
    for key, value in numeric_leaves(config):  # a key RANGES does not list yet
        check(not isinstance(value, float) or math.isfinite(value), key, value, "must be finite")
    sizes = check_mesh(config.mesh, num_devices)
    expert, context = sizes["expert"], sizes["context"]
    rows = sizes["data"] * sizes["fsdp"] * expert  # the batch's rows split this many ways
    token_shards = rows * context  # ... and each row's positions over context
    # The MoE layers are every moe_every-th after the first_dense_layers: none would leave an
    # MoE config dense (and a dense one's layer stacks follow the same rule).
    check(m.first_dense_layers < m.num_layers, "model.first_dense_layers", m.first_dense_layers,
          f"must be in 0..model.num_layers-1={m.num_layers - 1} (the MoE layers come after "
          "the first dense ones)")
    room = m.num_layers - m.first_dense_layers
    check(m.moe_every <= room, "model.moe_every", m.moe_every,
          f"must be in 1..model.num_layers-first_dense_layers={room} (MoE in every n-th layer "
          "after the first dense ones: a larger n leaves none)")
    if m.num_experts:
        check(m.num_experts % expert == 0, "model.num_experts", m.num_experts,
              f"must be a multiple of mesh.expert={expert}")
        check(1 <= m.top_k <= m.num_experts, "model.top_k", m.top_k,
              f"must be in 1..num_experts={m.num_experts}")
        from moejax.moe.layer import DISPATCHES, ROUTINGS
        from moejax.moe.router import SCORES

        one_of("model.router_score", m.router_score, SCORES)
        one_of("model.routing", m.routing, ROUTINGS)
        one_of("model.dispatch", m.dispatch, DISPATCHES)
        check(not m.shared_gate or m.num_shared_experts > 0, "model.shared_gate", m.shared_gate,
              "needs model.num_shared_experts >= 1 (it gates their output)")
        check(m.dispatch == "capacity" or m.routing != "experts", "model.dispatch", m.dispatch,
              "allowed with model.routing=experts: capacity (expert choice never drops)")
        check_groups(m)
    else:  # a dense model's FFN is top_k x d_ff wide (the MoE's active width)
        check(m.top_k >= 1, "model.top_k", m.top_k, "must be >= 1 (a dense FFN is top_k x d_ff)")
    from moejax.moe.ffn import ACTIVATIONS

    one_of("model.activation", m.activation, tuple(ACTIVATIONS))
    one_of("model.dtype", m.dtype, ("float32", "bfloat16"))
    one_of("model.param_dtype", m.param_dtype, ("float32", "bfloat16"))
    from moejax.moe.quant import QTYPES

    one_of("model.quantization", m.quantization, tuple(QTYPES))
    check(not m.quantize_dense or m.quantization != "none", "model.quantize_dense",
          m.quantize_dense, "needs model.quantization=int8 or fp8 (it quantizes the dense "
          "matmuls too)")
    one_of("train.moment_dtype", t.moment_dtype, ("float32", "bfloat16"))
    # run/optim.py's OPTIMIZERS and MUON_LR_SCALES (a layer above this one)
    one_of("train.optimizer", t.optimizer, ("adamw", "muon"))
    one_of("train.muon_lr_scale", t.muon_lr_scale, ("consistent_rms", "width", "none"))
    check(m.head_dim % 2 == 0, "model.head_dim", m.head_dim, "must be even (rotary pairs)")
    check_latent(m)
    check_rope(m)
    check(m.num_kv_heads >= 0 and m.num_heads % (m.num_kv_heads or m.num_heads) == 0,
          "model.num_kv_heads", m.num_kv_heads,
          f"must be a divisor of num_heads={m.num_heads} (0 = num_heads)")
    from moejax.model.attention import QK_NORMS
    from moejax.model.transformer import REMAT

    one_of("model.qk_norm", m.qk_norm, QK_NORMS)
    check(t.qk_clip == 0 or m.qk_norm == "none", "train.qk_clip", t.qk_clip,
          f"not with model.qk_norm={m.qk_norm!r}, whose norms undo QK-clip's rescale; allowed: "
          "train.qk_clip=0, or model.qk_norm=none")
    one_of("model.remat", m.remat, tuple(REMAT))
    check(1 <= d.seq_len <= m.max_seq_len, "data.seq_len", d.seq_len,
          f"must be in 1..model.max_seq_len={m.max_seq_len}")
    check_data(d)
    check(d.batch_size % (rows * t.grad_accum) == 0, "data.batch_size", d.batch_size,
          f"must be a multiple of data x fsdp x expert x grad_accum = {rows} x "
          f"{t.grad_accum}")
    # Context parallelism deals each device an early and a late half of its rows' positions.
    check(context == 1 or d.seq_len % (2 * context) == 0, "data.seq_len", d.seq_len,
          f"must be a multiple of 2 x mesh.context = {2 * context}")
    if m.num_experts:  # the rule MoE.__call__ enforces, found now rather than when tracing
        micro_tokens = d.batch_size // t.grad_accum * d.seq_len
        check(m.num_groups >= 0 and m.num_groups % token_shards == 0
              and micro_tokens % (m.num_groups or 1) == 0, "model.num_groups", m.num_groups,
              f"must be a multiple of the {token_shards} token shards (data x fsdp x expert x "
              "context) "
              f"that divides the {micro_tokens} tokens of a micro-batch (data.batch_size / "
              "train.grad_accum x data.seq_len); 0 = one per token shard")
    one_of("train.schedule", t.schedule, ("cosine", "rsqrt"))
    if t.schedule == "cosine":
        check(0 <= t.warmup_steps < t.steps, "train.warmup_steps", t.warmup_steps,
              f"must be in 0..train.steps-1={t.steps - 1} (the cosine needs steps after it)")
    else:  # rsqrt: lr * min(step / warmup, sqrt(warmup / step))
        check(t.warmup_steps >= 1, "train.warmup_steps", t.warmup_steps,
              "must be >= 1 with train.schedule=rsqrt (it divides by the warmup)")


def check_latent(m) -> None:
    """The attention keys: the window's, and multi-head latent attention's dims
    (moejax/model/mla.py) when model.attention=mla."""
    from moejax.model.transformer import ATTENTIONS

    if m.attention not in ATTENTIONS:
        raise ConfigError(f"model.attention={m.attention!r}: unknown; allowed: "
                          f"{', '.join(ATTENTIONS)}")
    if m.full_attention_every and not m.sliding_window:
        raise ConfigError(f"model.full_attention_every={m.full_attention_every!r}: needs "
                          "model.sliding_window > 0 (the layers between are windowed); "
                          "allowed: 0")
    if m.attention != "mla":
        return
    if m.sliding_window:
        raise ConfigError(f"model.sliding_window={m.sliding_window!r}: not with "
                          "model.attention=mla (latent attention has no window); allowed: 0")
    for key in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
        if m[key] < 1:
            raise ConfigError(f"model.{key}={m[key]!r}: must be >= 1 with model.attention=mla")
    if m.qk_rope_head_dim < 2 or m.qk_rope_head_dim % 2:
        raise ConfigError(f"model.qk_rope_head_dim={m.qk_rope_head_dim!r}: must be even and >= 2"
                          " with model.attention=mla (rotary pairs)")


def check_groups(m) -> None:
    """DeepSeek-V3's group-limited routing (moejax/moe/router.py, group_limit)."""
    per_group = m.num_experts // m.n_group
    if m.n_group > 1 and (m.num_experts % m.n_group or per_group < 2):
        raise ConfigError(f"model.n_group={m.n_group!r}: must divide num_experts="
                          f"{m.num_experts} into groups of >= 2 experts (a group ranks by its "
                          "two best); 1 = no group limit")
    if m.topk_group > m.n_group:
        raise ConfigError(f"model.topk_group={m.topk_group!r}: must be in 1..model.n_group="
                          f"{m.n_group}")
    if m.top_k > m.topk_group * per_group:
        raise ConfigError(f"model.top_k={m.top_k!r}: must be at most topk_group x num_experts /"
                          f" n_group = {m.topk_group * per_group} (the experts of the kept groups)")
    if m.routing == "experts" and (m.n_group, m.routed_scaling_factor) != (1, 1.0):
        raise ConfigError(f"model.routing={m.routing!r}: allowed with model.n_group > 1 or "
                          "routed_scaling_factor != 1: tokens (expert choice has neither)")


def check_rope(m) -> None:
    """model.rope_scaling and YaRN's keys (moejax/model/layers.py, Rope): a YaRN key set
    without yarn would change nothing, so it is refused rather than ignored."""
    from moejax.model.layers import ROPE_SCALINGS, Rope

    if m.rope_scaling not in ROPE_SCALINGS:
        raise ConfigError(f"model.rope_scaling={m.rope_scaling!r}: unknown; allowed: "
                          + ", ".join(ROPE_SCALINGS))
    if m.rope_scaling == "none":
        unset = Rope(m.rope_theta)
        for name in ("factor", "original_max_len", "beta_fast", "beta_slow", "mscale",
                     "mscale_all_dim"):
            if m[f"rope_{name}"] != getattr(unset, name):
                raise ConfigError(f"model.rope_{name}={m[f'rope_{name}']!r}: needs "
                                  "model.rope_scaling=yarn (without it the key changes nothing)")
        return
    if m.rope_theta <= 1:  # the ramp's bounds divide by ln(rope_theta)
        raise ConfigError(f"model.rope_theta={m.rope_theta!r}: must be > 1 with "
                          "model.rope_scaling=yarn")
    if m.rope_beta_fast < m.rope_beta_slow:  # equal: Kimi K2's 1 and 1, a one-pair ramp
        raise ConfigError(f"model.rope_beta_fast={m.rope_beta_fast!r}: must be >= "
                          f"model.rope_beta_slow={m.rope_beta_slow!r} (the ramp runs from the "
                          "fast-turning pairs to the slow)")


def check_data(d) -> None:
    """The data.* keys naming the source: checked by train (validate) and by `python -m
    moejax.data prepare`, which reads the source."""

    def one_of(key, value, allowed):
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: unknown; allowed: {', '.join(allowed)}")

    one_of("data.source", d.source, ("stdlib", "files", "hub", "prepared"))
    one_of("data.on_error", d.on_error, ("skip", "fail"))
    if d.source == "files":
        one_of("data.format", d.format, ("text", "json", "parquet", "chat", "replay"))
    if d.format in ("chat", "replay") and (d.source != "files" or d.streaming):
        raise ConfigError(f"data.format={d.format!r}: not with data.source={d.source!r}, "
                          f"data.streaming={d.streaming}; allowed: data.source='files' (JSONL "
                          f"{'conversations' if d.format == 'chat' else 'routing records'}, "
                          f"moejax/data/{d.format}.py) and data.streaming=False")
    if d.get("mixture", ""):
        if d.source != "prepared":
            raise ConfigError(f"data.mixture={d.mixture!r}: needs data.source='prepared' (its "
                              "entries are prepared stores); allowed: data.source='prepared', "
                              "or data.mixture='' (one source)")
        if d.path:
            raise ConfigError(f"data.path={d.path!r}: unused with data.mixture (its entries "
                              "name the stores); allowed: ''")
        parse_mixture(d.mixture)
    elif not d.path and d.source in ("hub", "prepared"):
        raise ConfigError("data.path='': empty; allowed: " + (
            "a Hugging Face dataset name" if d.source == "hub" else
            "a folder written by python -m moejax.data prepare"))
    for name in ("eval_fraction", "shuffle_buffer"):  # for prepare, which runs no validate
        check_number(f"data.{name}", d[name], *RANGES[f"data.{name}"])


MIXTURE_FORM = ("comma-separated STORE_DIR:WEIGHT entries of distinct prepared stores, "
                "weights > 0 (normalised to sum 1), e.g. 'stores/code:0.3,stores/web:0.7'")


def parse_mixture(value: str) -> list[tuple[str, Fraction]]:
    """data.mixture 'DIR_A:0.3,DIR_B:0.7' -> [(DIR_A, 3/10), (DIR_B, 7/10)]: exact weights,
    normalised to sum 1 ('a:3,b:7' is the same mixture); a bad string is one ConfigError line."""
    entries = []
    for entry in value.split(","):
        path, colon, weight = entry.strip().rpartition(":")
        problem = None
        try:
            w = Fraction(weight.strip()) if colon else None
        except (ValueError, ZeroDivisionError):
            w = None
        if not colon and entry.strip():
            problem = f"entry {entry.strip()!r}: no weight (or not a number) after its ':'"
        elif not path.strip():
            problem = f"entry {entry.strip()!r} names no store"
        elif w is None:
            problem = f"entry {entry.strip()!r}: no weight (or not a number) after its ':'"
        elif w <= 0:
            problem = f"entry {entry.strip()!r}: weight {weight.strip()} is not > 0"
        elif same := [p for p, _ in entries if same_folder(p, path.strip())]:
            problem = f"store {path.strip()!r} appears twice" + (
                "" if same[0] == path.strip() else
                f" (as {same[0]!r}: both are {os.path.realpath(same[0])})")
        if problem:
            raise ConfigError(f"data.mixture={value!r}: {problem}; allowed: {MIXTURE_FORM}")
        entries.append((path.strip(), w))
    total = sum(w for _, w in entries)
    return [(p, w / total) for p, w in entries]


def same_folder(a: str, b: str) -> bool:
    """Two spellings of one folder: 'DIR', './DIR', 'DIR/', a symlink to it."""
    return os.path.realpath(a) == os.path.realpath(b)


def check_workdir(workdir: str) -> None:
    """Find out now, not at the first checkpoint, that the run cannot write its results."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise ConfigError(f"--workdir={workdir!r}: not writable ({e.strerror or e}); allowed: "
                          "a directory this user can create and write") from None
