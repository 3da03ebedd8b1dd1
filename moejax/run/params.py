"""Parameter accounting: total vs active parameters, and bytes per device at each precision.

Total parameters decide memory; active parameters (what one token touches) decide compute.
Every byte count here is arithmetic on the shard shapes of the real state (live arrays, or the
abstract ones `state.setup` gives), so it holds for any backend.
"""

import math

import jax
import numpy as np
import optax
from flax import nnx
from optax.contrib import MuonState

from moejax.moe import quant
from moejax.moe.layer import ExpertBias, ExpertParam
from moejax.run import optim, state


def precision(config) -> dict:
    """The dtypes `config` trains with: the one place that reads the keys. The first moments
    (AdamW's, Muon's) are in the moment dtype; AdamW's second moment follows the parameters
    (optax keeps nu in their dtype); quantization (QAT) changes the expert matmuls, not what
    is stored."""
    mc, tc = config.model, config.train
    return {"params": mc.param_dtype, "mu": tc.moment_dtype, "nu": mc.param_dtype,
            "compute": mc.dtype, "quantization": mc.quantization, "optimizer": tc.optimizer}


def precision_line(config, train_state: dict) -> str:
    """The start-up report's line: the dtypes the state holds (mixed where the model keeps
    some leaves in float32), the compute dtype and quantization from the config."""
    mu, nu = first_moments(train_state["opt_state"]), adam_moments(train_state["opt_state"])[1]
    p = precision(config)
    note = quant.backend_note(p["quantization"], jax.devices()[0])
    return (f"precision: params {dtype_mix(train_state['params'])}, moments mu "
            f"{dtype_mix(mu)} / nu {dtype_mix(nu)}, compute {p['compute']}, "
            f"quantization {p['quantization']}" + (f"\n{note}" if note else ""))


def param_counts(model: nnx.Module, top_k: int, num_experts: int) -> dict:
    """{'total', 'active', 'expert'}: a token runs k of E experts in every MoE layer."""
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    expert = sum(x.size for x in jax.tree.leaves(nnx.state(model, ExpertParam)))
    active = total - expert + (expert * top_k // num_experts if num_experts else 0)
    return {"total": total, "active": active, "expert": expert}


def shard_shape(x) -> tuple:
    """The shape of one device's shard: the first local one of a live array, else the
    sharding's shard shape of an abstract one (jax.ShapeDtypeStruct). Shards are even."""
    if isinstance(x, jax.Array):
        return x.addressable_shards[0].data.shape
    return x.sharding.shard_shape(x.shape)


def bytes_per_device(tree, bits: int = 0) -> int:
    """Bytes of `tree` on one device; `bits` > 0: as if each element took that many bits.
    int4 counts two to a byte, as TPU and GPU store it (XLA:CPU keeps one per byte), an odd
    count rounded up per array."""
    return sum(math.ceil(math.prod(shard_shape(x)) * (bits or jax.dtypes.itemsize_bits(x.dtype))
                         / 8)
               for x in jax.tree.leaves(tree))


def dtype_mix(tree) -> str:
    """'bfloat16' or, where leaves differ, 'bfloat16 (float32: 0.03%)', shares of elements."""
    counts = {}
    for x in jax.tree.leaves(tree):
        counts[np.dtype(x.dtype).name] = counts.get(np.dtype(x.dtype).name, 0) + x.size
    main, *rest = sorted(counts, key=counts.get, reverse=True)
    total = sum(counts.values())
    return main + (f" ({', '.join(f'{d}: {counts[d] / total:.2%}' for d in rest)})"
                   if rest else "")


def adam_moments(opt_state) -> tuple:
    """AdamW's (mu, nu) trees out of the optimizer state (with train.optimizer=muon, the
    leaves Muon trains are masked out of them)."""
    found = [s for s in jax.tree.leaves(opt_state,
                                        is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    if len(found) != 1:
        raise ValueError(f"expected one AdamW state in the optimizer state, found {len(found)}")
    return found[0].mu, found[0].nu


def first_moments(opt_state) -> list:
    """Every first moment of the optimizer state: AdamW's mu, and each Muon state's."""
    states = (optax.ScaleByAdamState, MuonState)
    return [s.mu for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, states))
            if isinstance(s, states)]


def split_experts(params) -> tuple[list, list]:
    """(routed expert weights as (value, index of the input dim), every other leaf). An
    ExpertParam's dims end in ('experts', input, ...), stacked layer dims ahead of them; an
    ExpertBias is no weight (never quantized)."""
    experts, other = [], []
    for v in jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nnx.Variable)):
        value = v.get_value() if isinstance(v, nnx.Variable) else v
        if isinstance(v, ExpertParam) and not isinstance(v, ExpertBias):
            names = v.get_metadata().get("out_sharding")
            experts.append((value, len(value.shape) - len(names) + 1))
        else:
            other.append(value)
    return experts, other


def scale_elements(experts: list, name: str) -> int:
    """Scales one device holds for `experts` quantized to `name`: one per quant.weight_group
    inputs of a channel. Where the input dim is split over devices, each keeps the scales of
    its channels (of the groups its slice touches), as the MoE layer lays them out."""
    total = 0
    for value, axis in experts:
        shape = shard_shape(value)
        per_channel = math.ceil(shape[axis] / quant.weight_group(value.shape[axis], name))
        total += math.prod(shape) // shape[axis] * per_channel
    return total


def train_rows(params: dict, opt_state, setting: dict) -> list[dict]:
    """Bytes per device of parameters, gradients and AdamW's moments for each combination of
    parameter dtype and first-moment dtype. `params`: {param_dtype: that model's params}
    (real shapes and shardings; the router is float32 in either), `opt_state` the trained
    config's (for its leaves besides the moments). nu and the gradients are in the
    parameters' dtypes, mu in the moment dtype throughout, as optax's mu_dtype makes it.
    Every parameter has one first moment (AdamW's or Muon's); nu only those AdamW trains."""
    mu, nu = first_moments(opt_state), adam_moments(opt_state)[1]
    rest = bytes_per_device(opt_state) - bytes_per_device(mu) - bytes_per_device(nu)
    rows = []
    for p_dtype in ("float32", "bfloat16"):
        for mu_dtype in ("float32", "bfloat16"):
            b = {"params": bytes_per_device(params[p_dtype]),
                 "mu": bytes_per_device(mu, np.dtype(mu_dtype).itemsize * 8)}
            b.update(grads=b["params"], nu=bytes_per_device(adamw_leaves(params[p_dtype],
                                                                         setting)), rest=rest)
            b["total"] = sum(b.values())
            rows.append({"params": p_dtype, "mu": mu_dtype, "nu": p_dtype, "bytes": b,
                         "own": (p_dtype, mu_dtype) == (setting["params"], setting["mu"])})
    return rows


def adamw_leaves(params, setting: dict) -> list:
    """The parameters AdamW trains: all, or with Muon those optim.labels gives AdamW."""
    if setting["optimizer"] == "adamw":
        return jax.tree.leaves(params)
    return [x for x, label in zip(jax.tree.leaves(params), jax.tree.leaves(optim.labels(params)),
                                  strict=True) if label == "adamw"]


def inference_rows(params: dict, setting: dict) -> list[dict]:
    """Bytes per device of the weights `generate` and export hold, on the same layout: all in
    float32, all in bfloat16, and the routed experts weight-only int8 / int4 (quant.WEIGHT_ONLY)
    beside the other weights in bfloat16. `params` as for train_rows."""
    rows = []
    for name, p_dtype in (("float32", "float32"), ("bfloat16", "bfloat16"),
                          ("int8", "bfloat16"), ("int4", "bfloat16")):
        experts, other = split_experts(params[p_dtype])
        q = quant.WEIGHT_ONLY.get(name)  # the qtype, as quant.quantize_weight stores it
        b = {"experts": bytes_per_device([v for v, _ in experts],
                                         jax.dtypes.itemsize_bits(q) if q else 0),
             "scales": scale_elements(experts, name) * np.dtype(quant.SCALE_DTYPE).itemsize
             if q else 0,
             "other": bytes_per_device(other)}
        b["total"] = sum(b.values())
        rows.append({"name": name, "bytes": b, "own": name == setting["params"]})
    return rows


def precision_table(config, setup) -> dict:
    """Bytes per device of the train state and of the inference weights at each precision
    setting, on `setup`'s mesh (the planner's tables); the config's own rows marked."""
    # The other parameter dtype's shapes come from its own model, which keeps the router in
    # float32 whatever the setting; abstract, so nothing is allocated or compiled for it.
    setting = precision(config)
    params = {setting["params"]: setup.abstract["params"]}
    for dtype in {"float32", "bfloat16"} - set(params):
        other = config.copy_and_resolve_references()
        with other.unlocked():
            other.model.param_dtype = dtype
        params[dtype] = state.setup(other, setup.mesh).abstract["params"]
    return {"setting": setting, "train": train_rows(params, setup.abstract["opt_state"], setting),
            "inference": inference_rows(params, setting)}


def quantize_experts(model, name: str) -> str:
    """`model`'s routed experts made weight-only `name` (int8 | int4) in place, and the line
    that says what that saved: bytes of all parameters and of the experts, before and after,
    scales included, on one device."""
    total, experts = (lambda: bytes_per_device(nnx.state(model)),
                      lambda: bytes_per_device(nnx.state(model, ExpertParam)))
    before = total(), experts()
    # Along each weight's input dim; the MoE layer dequantizes them after gathering its shards.
    for _, v in nnx.to_flat_state(nnx.state(model, ExpertParam)):
        if isinstance(v, ExpertBias):  # biases stay in float
            continue
        names = v.get_metadata()["out_sharding"]
        v.set_value(quant.quantize_weight(v.get_value(), name, -(len(names) - 1)))
    after = total(), experts()
    return (f"weights per device: {before[0] / 2**20:,.2f} -> {after[0] / 2**20:,.2f} MiB; "
            f"routed experts {before[1] / 2**20:,.2f} -> {after[1] / 2**20:,.2f} MiB "
            f"({name} weight-only with scales, 1/{before[1] / after[1]:.2f})")
