"""What a transformers config.json says, read with one-line errors: the architectures moejax
converts (ARCHS), typed readers of its keys, its rotary parameters, and the refusal of a model
an architecture cannot compute. Pure: no files, no devices."""

import dataclasses
import math

from moejax.config_lib import ConfigError


@dataclasses.dataclass(frozen=True)
class Arch:
    model_type: str
    moe: str  # the MoE block of a layer
    experts: tuple[str, str, str]  # an expert's gate, up and down projections
    qk_norm: str  # moejax model.qk_norm


ARCHS = {
    "MixtralForCausalLM": Arch("mixtral", "block_sparse_moe", ("w1", "w3", "w2"), "none"),
    "Qwen3MoeForCausalLM": Arch("qwen3_moe", "mlp", ("gate_proj", "up_proj", "down_proj"),
                                "head"),
    "OlmoeForCausalLM": Arch("olmoe", "mlp", ("gate_proj", "up_proj", "down_proj"), "all"),
    "Qwen2MoeForCausalLM": Arch("qwen2_moe", "mlp", ("gate_proj", "up_proj", "down_proj"),
                                "none"),
    "DeepseekV3ForCausalLM": Arch("deepseek_v3", "mlp", ("gate_proj", "up_proj", "down_proj"),
                                  "none"),
    # GLM-4.5 / 4.5-Air; qk_norm is config.json's use_qk_norm (glm.py), "head" where true
    "Glm4MoeForCausalLM": Arch("glm4_moe", "mlp", ("gate_proj", "up_proj", "down_proj"),
                               "none"),
    # gpt-oss: its experts fused, all of a layer's in one tensor (gpt_oss.py names them)
    "GptOssForCausalLM": Arch("gpt_oss", "mlp", ("gate_up_proj", "gate_up_proj", "down_proj"),
                              "none"),
}
DEEPSEEK = "DeepseekV3ForCausalLM"
GPT_OSS = "GptOssForCausalLM"
GLM = "Glm4MoeForCausalLM"
# Router state an architecture has no tensor or config.json key for travels beside the model
# files, in files transformers does not read: the selection bias of auxiliary-loss-free
# balancing as model.layers.{i}.<moe>.gate.moejax_bias (ROUTER_FILE), and the model keys that
# move it in training (ROUTER_JSON: bias_rate, router_score) for every architecture.
ROUTER_FILE = "moejax_router.safetensors"
ROUTER_JSON = "moejax_router.json"
OWN_BIAS = ".moejax_bias"
# Tensors written float32 whatever the export's dtype: DeepSeek's release and transformers
# (_keep_in_fp32_modules) keep the router's correction bias so, as moejax does.
FLOAT32 = (".e_score_correction_bias", OWN_BIAS)


def arch_of(hf: dict) -> str:
    names = hf.get("architectures") or ["?"]
    name = names[0] if isinstance(names, list) else names
    if name not in ARCHS:
        raise ConfigError(f"config.json architectures={name!r}: unknown; allowed: "
                          f"{', '.join(ARCHS)}")
    return name


REQUIRED = object()


def integer(hf: dict, key: str, default=REQUIRED, low: int = 1):
    """config.json's `key`: an integer >= low (null or absent: `default`), else one line
    naming the key and its value. JSON's true is no integer here, nor is 32.0."""
    value = hf.get(key)
    if value is None:
        if default is REQUIRED:
            raise ConfigError(f"config.json {key}: missing; allowed: an integer >= {low} (a "
                              f"{arch_of(hf)} config.json has it)")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"config.json {key}={value!r}: not an integer >= {low}; allowed: "
                          f"an integer >= {low}")
    return value


def real(hf: dict, key: str, default, positive: bool = True, label: str = "") -> float:
    """config.json's `key` (`label` in messages, default the key): a finite number > 0
    (`positive`) or >= 0 (null or absent: `default`), else one line naming it and its value."""
    value = hf.get(key)
    if value is None:
        return default
    bound = "> 0" if positive else ">= 0"
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or value < 0 or (positive and value == 0)):
        raise ConfigError(f"config.json {label or key}={value!r}: not a finite number {bound}; "
                          f"allowed: a finite number {bound}")
    return float(value)


def flag(hf: dict, key: str, default: bool) -> bool:
    """config.json's `key`: true or false (null or absent: `default`); "false" is no false."""
    value = hf.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"config.json {key}={value!r}: not a boolean; allowed: true or "
                          "false")
    return value


def rope_of(hf: dict) -> tuple[str, dict]:
    """(the key it came from, the rotary embedding's parameters): rope_parameters
    (transformers 5) or rope_scaling (4), which must agree where both are given, with
    `type` read as `rope_type`."""
    given = {}
    for key in ("rope_parameters", "rope_scaling"):
        value = hf.get(key)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"config.json {key}={value!r}: not an object; allowed: null or "
                              '{"rope_type": "default", "rope_theta": ...}')
        if value:
            rope = {k: v for k, v in value.items() if k != "type"}
            rope["rope_type"] = value.get("rope_type", value.get("type", "default"))
            given[key] = rope
    if len(given) == 2:
        ours, old = given["rope_parameters"], given["rope_scaling"]
        if differ := sorted(k for k in ours.keys() & old.keys() if ours[k] != old[k]):
            raise ConfigError(
                f"config.json rope_scaling={hf['rope_scaling']!r}: disagrees with "
                f"rope_parameters={hf['rope_parameters']!r} ({differ[0]}); allowed: one of "
                "them, or both saying the same")
    key = next(iter(given), "rope_parameters")
    return key, given.get(key, {})


def rope_theta(hf: dict, rope_key: str, rope: dict) -> float:
    """The rotary base: config.json's rope_theta or the one inside rope_of's parameters (they
    must agree where both are given), else 10,000 (transformers' default)."""
    theta = real(hf, "rope_theta", None)
    inner = real(rope, "rope_theta", None, label=f"{rope_key}.rope_theta")
    if None not in (theta, inner) and theta != inner:
        raise ConfigError(f"config.json rope_theta={hf['rope_theta']!r}: disagrees with "
                          f"{rope_key}.rope_theta={rope['rope_theta']!r}; allowed: one of them, "
                          "or both the same")
    return theta or inner or 10_000.0


def yarn_keys(rope_key: str, rope: dict, max_len: int, refuse) -> dict:
    """The model's rope_* keys for YaRN parameters `rope` (rope_of's, from `rope_key`), read
    as transformers' _compute_yarn_parameters reads them; refuse(key, value, allowed)."""
    def number(key, default):
        return real(rope, key, default, positive=False, label=f"{rope_key}.{key}")

    original = integer(rope, "original_max_position_embeddings", REQUIRED)
    factor = real(rope, "factor", max_len / original, label=f"{rope_key}.factor")
    if factor < 1:
        refuse(f"{rope_key}.factor", rope.get("factor"), ">= 1")
    # transformers reads `beta_fast or 32`, `beta_slow or 1`: a 0 is the default
    fast, slow = number("beta_fast", 0.0) or 32.0, number("beta_slow", 0.0) or 1.0
    mscale, all_dim = number("mscale", 0.0), number("mscale_all_dim", 0.0)
    truncate = flag(rope, "truncate", True)
    if rope.get("attention_factor") is not None:
        from moejax.model.layers import Rope

        ours = Rope(1.0, "yarn", factor, original, fast, slow, mscale, all_dim,
                    truncate).attention_factor()
        if real(rope, "attention_factor", None, label=f"{rope_key}.attention_factor") != ours:
            refuse(f"{rope_key}.attention_factor", rope["attention_factor"],
                   f"null or {ours!r} (what factor, mscale and mscale_all_dim give)")
    return dict(rope_scaling="yarn", rope_factor=factor, rope_original_max_len=original,
                rope_beta_fast=fast, rope_beta_slow=slow, rope_mscale=mscale,
                rope_mscale_all_dim=all_dim, rope_truncate=truncate)


def rope_parameters(m) -> dict:
    """config.json's rope_parameters for model config `m`: yarn_keys read back."""
    rope = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.get("rope_scaling", "none") == "yarn":
        rope.update(rope_type="yarn", factor=m.rope_factor,
                    original_max_position_embeddings=m.rope_original_max_len or m.max_seq_len,
                    beta_fast=m.rope_beta_fast, beta_slow=m.rope_beta_slow)
        rope.update({k: v for k, v in (("mscale", m.rope_mscale),
                                       ("mscale_all_dim", m.rope_mscale_all_dim)) if v})
        if not m.get("rope_truncate", True):
            rope["truncate"] = False
    return rope


def needs(name: str):
    """need(ok, key, value, allowed): one line saying `name` cannot compute model.key=value."""
    def need(ok, key, value, allowed):
        if not ok:
            raise ConfigError(f"model.{key}={value!r}: {name} cannot compute it; allowed: "
                              f"{allowed}")

    return need
