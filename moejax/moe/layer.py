"""The MoE feed-forward layer: a pure function over capacity groups and a thin NNX module.

A capacity group is a set of tokens routed together: each expert accepts at most C of a
group's assignments. Groups are contiguous, equal slices of the flattened global batch,
`num_groups` of them; by default one per token shard (data x fsdp x expert x context
devices). Fixing `num_groups` fixes which tokens are dropped on any layout of data, fsdp,
expert and tensor, so the layer gives the same numbers there. With mesh.context > 1 a device
holds a sequence shard of its rows, and its groups are slices of that shard: the capacity
path then drops other tokens than on one device (the dropless paths, which drop none, are
exact on every layout; tests/test_fuzz.py, test_capacity_groups_with_context).
"""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import qwix
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, PartitionSpec as P

from moejax import parallel
from moejax.moe import router
from moejax.moe.dispatch import combine, dispatch, slots
from moejax.moe.dropless import ragged_ffn, ring_ffn, sorted_ffn
from moejax.moe.experts import capacity_experts
from moejax.moe.ffn import IN_NAMES, OUT_NAMES, Activation, ffn, flat_in, in_shape
from moejax.moe.quant import QTYPES
from moejax.parallel import EXPERT_AXIS, SEQ_AXIS, TOKEN_AXES, TOKEN_SHARD_AXES, num_token_shards

# How assignments reach their experts (`model.dispatch`):
#   capacity       [E, C, d] buffers per group, overflow past C dropped, all_to_all
#   dropless       rows sorted by expert, a grouped matmul, ragged all-to-all across devices
#   dropless_ring  the same, across devices by all-gather and reduce-scatter
DISPATCHES = ("capacity", "dropless", "dropless_ring")
# Who picks the experts (`model.routing`):
#   tokens    each token its k best (token choice)
#   experts   each expert its C best tokens of the group (expert choice; non-causal)
#   balanced  token t of a group (t * k + j) mod E, j < k, gated by the router's scores: equal
#             load by construction, for benchmarks (`bench train`'s imbalance tax), not training
ROUTINGS = ("tokens", "experts", "balanced")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """The model config keys the MoE layer reads, under the same names (configs/tiny.py)."""

    num_experts: int
    top_k: int = 2  # choices per token: 1 = Switch, 2 = GShard / Mixtral
    capacity_factor: float = 1.25  # training; C = ceil(cf * tokens_per_group * k / E)
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    renormalize: bool = False  # the k gates sum to 1 (Mixtral) or stay raw scores (Switch)
    jitter_eps: float = 0.0  # multiplicative router-input noise in training; 0 = off
    num_groups: int = 0  # capacity groups in the global batch; 0 = one per token shard
    dispatch: str = "capacity"  # see DISPATCHES
    router_score: str = "softmax"  # softmax | sigmoid (DeepSeek-V3)
    routing: str = "tokens"  # see ROUTINGS
    bias_rate: float = 0.0  # auxiliary-loss-free balancing: bias step per train step; 0 = off
    n_group: int = 1  # expert groups (DeepSeek-V3: 8); a token picks from its topk_group best
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # the routed experts' gates times this (DeepSeek-V3: 2.5)
    num_shared_experts: int = 0  # always-on shared experts (DeepSeek), each d_ff wide
    shared_gate: bool = False  # shared output scaled by sigmoid(x @ w) per token (Qwen2-MoE)
    quantization: str = "none"  # the expert matmuls' forward operands: none | int8 | fp8
    # gpt-oss: a learned bias on the router's logits and on each expert's two projections
    moe_bias: bool = False
    swiglu_limit: float = 7.0  # activation clamped_swiglu: gate <= limit, |linear| <= limit

    @classmethod
    def from_config(cls, model_config) -> "MoEConfig":
        return cls(**{f.name: model_config.get(f.name, f.default) if f.name in _NEWER
                      else model_config[f.name] for f in dataclasses.fields(cls)})


# Keys older configs lack: read with their defaults.
_NEWER = ("moe_bias", "swiglu_limit")


def moe_ffn(x, router_w, experts, cfg: MoEConfig, *, train, activation, bias=None, noise=None,
            expert_axis=None, token_axes=(), real=None, forced=None, logit_bias=None):
    """One MoE FFN over this device's groups.

    x: [G, T, d] groups held here; noise: like x or None; router_w: [d, E]; bias: [E] or None,
    the selection bias of auxiliary-loss-free balancing; logit_bias: [E] or None, a learned
    bias added to the router's logits (gpt-oss);
    real: [G, T] bool, False for padding (routed nowhere, its output 0, in no statistic);
    experts: dict of w_in [E_local, d, g*f], w_out [E_local, f, d] with this device's
    experts and, with moe_bias, their biases in_bias [E_local, g*f], out_bias [E_local, d];
    forced: [G, T, k] int expert ids to use instead of the router's choice (replay), or None.
    Inside shard_map, `expert_axis` names the axis experts are split over and `token_axes`
    the axes the groups are split over; outside, both are empty and everything is local.
    Returns y: [G, T, d], a dict of aux losses and routing statistics over all groups (with
    `forced`, "routing_mismatch": the share of real assignments the router would not have
    chosen), and the expert ids used, [G, T, k] (E for padding) before capacity drops.
    """
    num_groups, group_size, d = x.shape
    cf = cfg.capacity_factor if train else cfg.eval_capacity_factor
    cap = (group_size if cfg.dispatch != "capacity" else  # an expert takes a token once at most
           min(group_size, router.capacity(group_size, cfg.num_experts, cfg.top_k, cf,
                                           cfg.min_capacity)))

    router_in = x.astype(jnp.float32) if noise is None else x.astype(jnp.float32) * noise
    logits = jnp.einsum("gtd,de->gte", router_in, router_w.astype(jnp.float32))
    if logit_bias is not None:
        logits = logits + logit_bias.astype(jnp.float32)
    mismatch = None
    if cfg.routing == "experts":
        r = jax.vmap(partial(router.expert_choice, capacity=cap, score=cfg.router_score))(
            logits, real=real)
    elif forced is None and cfg.routing == "tokens":
        r = jax.vmap(partial(router.route, k=cfg.top_k, capacity=cap,
                             renormalize=cfg.renormalize, score=cfg.router_score,
                             bias=bias, n_group=cfg.n_group, topk_group=cfg.topk_group,
                             routed_scaling_factor=cfg.routed_scaling_factor))(logits, real=real)
    else:
        if forced is None:  # balanced
            forced = jnp.broadcast_to(router.balanced_ids(group_size, cfg.top_k,
                                                          cfg.num_experts),
                                      (num_groups, group_size, cfg.top_k))
        else:  # replay: measure how far the router's own choice is from the recorded one
            own = router.select(router.scores(logits, cfg.router_score), cfg.top_k, bias,
                                cfg.n_group, cfg.topk_group)
            # A token without a record (-1: one a recording never fed) routes itself.
            forced = jnp.where(forced < 0, own, forced)
            mismatch = router.mismatched(forced, own).mean(-1)
        r = jax.vmap(partial(router.forced, capacity=cap, renormalize=cfg.renormalize,
                             score=cfg.router_score,
                             routed_scaling_factor=cfg.routed_scaling_factor))(
            logits, forced, real=real)
    qtype = QTYPES[cfg.quantization]
    if cfg.dispatch == "capacity":
        y = _capacity_ffn(x, r, experts, cap, activation, expert_axis, qtype)
    else:
        y = _dropless_ffn(x.reshape(-1, d), r.gates.reshape(-1, cfg.top_k),
                          r.expert_ids.reshape(-1, cfg.top_k), experts, activation,
                          expert_axis, cfg.dispatch, qtype).reshape(x.shape)
    aux = _aux(logits, r, cfg.top_k, cfg.routing == "experts", token_axes, real, mismatch)
    return y, aux, r.expert_ids


def _dropless_ffn(x, gates, expert_ids, experts, activation, expert_axis, how, qtype):
    """x: [N, d] -> [N, d], every assignment computed (moejax/moe/dropless.py)."""
    if not expert_axis or jax.lax.axis_size(expert_axis) == 1:
        return sorted_ffn(x, gates, expert_ids, experts, activation, qtype)
    args = (x, gates, expert_ids, experts, activation, expert_axis, qtype)
    if how == "dropless_ring":
        return ring_ffn(*args)
    # Chosen when lowering: XLA:CPU has no ragged all-to-all, so its program runs the ring.
    return jax.lax.platform_dependent(cpu=lambda: ring_ffn(*args),
                                      default=lambda: ragged_ffn(*args))


def _capacity_ffn(x, r, experts, cap, activation, expert_axis, qtype):
    """x [G, T, d] -> [G, T, d] through [E, C, d] buffers, all_to_all'd to the experts."""
    num_groups, _, d = x.shape
    ep = jax.lax.axis_size(expert_axis) if expert_axis else 1
    experts_here = experts["w_in"].shape[0]
    num_experts = experts_here * ep
    slot, source = jax.vmap(partial(slots, capacity=cap, num_experts=num_experts))(
        r.expert_ids, r.positions, r.keep)

    # [G, E*C, d] -> [G, ep, E_local, C, d]: axis 1 is the device that owns the expert.
    buf = jax.vmap(dispatch)(x, slot, source).reshape(num_groups, ep, experts_here, cap, d)
    if expert_axis:  # afterwards axis 1 is the device the tokens came from
        buf = jax.lax.all_to_all(buf, expert_axis, 1, 1, tiled=True)
    # Expert e's segments: one per (source device, group), C slots each.
    segments = ep * num_groups
    xe = buf.transpose(2, 1, 0, 3, 4).reshape(experts_here, segments * cap, d)
    # One device: queues fill from position 0, so the router's counts give the filled slots.
    # Across devices counts would cost an all-to-all of their own; the zero padding tells.
    filled = jnp.minimum(r.tokens_per_expert, cap).T if ep == 1 else None
    ye = capacity_experts(xe, experts["w_in"], experts["w_out"], activation, filled, segments,
                          qtype, experts.get("in_bias"), experts.get("out_bias"))
    ye = ye.reshape(experts_here, ep, num_groups, cap, d).transpose(2, 1, 0, 3, 4)
    if expert_axis:
        ye = jax.lax.all_to_all(ye, expert_axis, 1, 1, tiled=True)
    return jax.vmap(combine)(ye.reshape(num_groups, num_experts * cap, d), r.gates, slot, source)


def _aux(logits, r, top_k, expert_choice, token_axes, real=None, mismatch=None):
    """Aux losses and routing statistics over the real tokens of every token shard's groups:
    sums, added over the shards, then divided by their count. mismatch: [G, T] each token's
    share of forced choices its router would not have made, or None (not forced)."""
    if real is None:
        real = jnp.ones(logits.shape[:-1], bool)
    weight = real.astype(jnp.float32)

    def total(v):
        return jax.lax.psum(v, token_axes) if token_axes else v

    def mean(per_token):  # [G, T] -> its mean over the real tokens of all shards
        return total((per_token * weight).sum()) / num_tokens

    num_tokens = jnp.maximum(total(weight.sum()), 1.0)
    tokens_per_expert = total(r.tokens_per_expert.sum(0))
    aux = {
        "balance_loss": router.balance_loss_from_sums(
            total((r.probs * weight[..., None]).sum((0, 1))), tokens_per_expert, num_tokens,
            top_k),
        "z_loss": mean(router.token_z_loss(logits)),
        "tokens_per_expert": tokens_per_expert,
        # Token choice: assignments past capacity. Expert choice: tokens no expert took.
        "dropped_frac": (mean(~r.keep.any(-1)) if expert_choice else
                         1.0 - total(r.keep.sum()) / (num_tokens * top_k)),
        "entropy": mean(router.token_entropy(r.probs)),
        "top1_prob": mean(r.probs.max(-1)),
    }
    if mismatch is not None:
        aux["routing_mismatch"] = mean(mismatch)
    return aux


# The routed experts' arrays, each [E, ...]: weights, and with moe_bias their biases.
EXPERT_ARRAYS = ("w_in", "w_out", "in_bias", "out_bias")


class ExpertParam(nnx.Param):
    """A parameter with a leading expert axis: counted as active only k/E of the time."""


class ExpertBias(ExpertParam):
    """An expert's bias (model.moe_bias): active k/E of the time as its weights are, but no
    weight to quantize (weight-only quantization leaves it in float)."""


class RouterBias(nnx.Variable):
    """Selection bias of auxiliary-loss-free balancing: not trained by the optimizer, moved
    by `router.bias_update` from each step's expert load (see state.train_step)."""


class MoE(nnx.Module):
    """Router, expert and shared-expert weights with their logical dims; the math is `moe_ffn`."""

    def __init__(self, d_model: int, d_ff: int, cfg: MoEConfig, activation: str | Activation,
                 *, mesh: Mesh | None, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.cfg, self.activation, self.mesh, self.dtype = cfg, activation, mesh, dtype
        e = cfg.num_experts
        init = nnx.initializers.lecun_normal()
        init_in = nnx.initializers.lecun_normal(in_axis=-3, out_axis=(-2, -1))  # [d, g, f]
        # Logical dims only: parallel.RULES lays them out on the mesh.
        self.router = nnx.Param(init(rngs.params(), (d_model, e), jnp.float32),
                                out_sharding=("embed", None), eager_sharding=False)
        if cfg.bias_rate > 0 or cfg.router_score == "sigmoid":  # DeepSeek-V3's correction
            self.router_bias = RouterBias(jnp.zeros((e,), jnp.float32), out_sharding=(None,),
                                          eager_sharding=False)

        def expert_weight(init, shape, names):
            keys = jax.random.split(rngs.params(), e)
            w = jax.vmap(lambda key: init(key, shape, param_dtype))(keys)
            return ExpertParam(w, out_sharding=("experts", *names), eager_sharding=False)

        self.w_in = expert_weight(init_in, in_shape(d_model, d_ff, activation), IN_NAMES)
        self.w_out = expert_weight(init, (d_ff, d_model), OUT_NAMES)
        if cfg.moe_bias:  # gpt-oss; zero at init, as transformers' _init_weights makes them
            self.router_logit_bias = nnx.Param(jnp.zeros((e,), jnp.float32),
                                               out_sharding=(None,), eager_sharding=False)
            # Laid out as the weight dims they add to: w_in's [g, f] and w_out's d.
            self.in_bias = ExpertBias(
                jnp.zeros((e, *in_shape(d_model, d_ff, activation)[1:]), param_dtype),
                out_sharding=("experts", *IN_NAMES[1:]), eager_sharding=False)
            self.out_bias = ExpertBias(jnp.zeros((e, d_model), param_dtype),
                                       out_sharding=("experts", OUT_NAMES[-1]),
                                       eager_sharding=False)
        if cfg.num_shared_experts:  # one FFN as wide as all shared experts together
            shared_ff = cfg.num_shared_experts * d_ff
            self.shared_in = nnx.Param(
                init_in(rngs.params(), in_shape(d_model, shared_ff, activation), param_dtype),
                out_sharding=IN_NAMES, eager_sharding=False)
            self.shared_out = nnx.Param(init(rngs.params(), (shared_ff, d_model), param_dtype),
                                        out_sharding=OUT_NAMES, eager_sharding=False)
        if cfg.num_shared_experts and cfg.shared_gate:
            self.shared_gate = nnx.Param(init(rngs.params(), (d_model, 1), param_dtype),
                                         out_sharding=("embed", None), eager_sharding=False)

    def __call__(self, x: jax.Array, *, train: bool, rng: jax.Array | None = None,
                 real: jax.Array | None = None, forced: jax.Array | None = None,
                 return_ids: bool = False):
        """x: [B, S, d] -> ([B, S, d], aux). `rng` drives router jitter when training;
        real: [B, S] bool, False for padding, or None; forced: [B, S, k] int expert ids to
        route by (a recorded routing replayed; aux gains "routing_mismatch"), or None.
        return_ids: aux gains "expert_ids", [B, S, k] int32, each token's experts before
        capacity drops (E for padding); off, the program computes nothing for it."""
        cfg, mesh = self.cfg, self.mesh
        # A bare name takes its parameter from the config (clamped_swiglu: swiglu_limit).
        activation = (self.activation if isinstance(self.activation, Activation) else
                      Activation(self.activation, cfg.swiglu_limit))
        if (forced is not None or return_ids) and cfg.routing == "experts":
            raise ValueError("model.routing='experts': expert choice is non-causal, a token's "
                             "experts depend on later tokens; recording or replaying routing "
                             "allowed with: tokens, balanced")
        shards = num_token_shards(mesh)
        num_groups = cfg.num_groups or shards
        if num_groups % shards or x.shape[0] * x.shape[1] % num_groups:
            raise ValueError(
                f"moe.num_groups={num_groups} must be a multiple of the {shards} token shards "
                f"and divide the {x.shape[0] * x.shape[1]} tokens of the batch")
        noise = None
        if train and cfg.jitter_eps > 0:
            noise = router.jitter_noise(rng, x.shape, cfg.jitter_eps)
        bias = self.router_bias[...] if hasattr(self, "router_bias") else None
        # Weight-only quantized (generate, params.quantize_experts): a QArray, int8 / int4 values
        # and scales, each laid out by the weight's dims and dequantized once gathered.
        experts = {name: getattr(self, name).get_value().astype(self.dtype)
                   for name in EXPERT_ARRAYS if hasattr(self, name)}
        logit_bias = self.router_logit_bias[...] if cfg.moe_bias else None
        sharded = mesh is not None
        def layout(name, w):  # a PartitionSpec per array of the weight (values, scales)
            names = parallel.names_of(getattr(self, name))
            return jax.tree.map(lambda a: parallel.spec(names, a.shape, mesh), w)

        specs = {name: layout(name, w) for name, w in experts.items()} if sharded else {}
        tensor_split = sharded and "tensor" in jax.tree.leaves(specs["w_out"])[0]
        x = x.astype(self.dtype)

        def local(x, noise, router_w, bias, logit_bias, experts, real, forced):
            def grouped(a):  # [B_local, S, d] -> [groups here, tokens per group, d]
                return None if a is None else a.reshape(num_groups // shards, -1, a.shape[-1])

            # ZeRO-3: this device holds 1/(fsdp x context) of its experts' weights; gather the
            # rest now (the transpose, in the backward pass, reduce-scatters their gradients).
            if sharded:
                gather = partial(_gather, axis_names=("fsdp", SEQ_AXIS))
                experts = {name: jax.tree.map(gather, w, specs[name])
                           for name, w in experts.items()}
            experts = {name: qwix.dequantize(w) if isinstance(w, qwix.QArray) else w
                       for name, w in experts.items()}
            experts["w_in"] = flat_in(experts["w_in"])
            if "in_bias" in experts:
                experts["in_bias"] = flat_in(experts["in_bias"])
            if tensor_split and "out_bias" in experts:
                # Each tensor rank's expert outputs are partial sums over its columns of w_out,
                # added up below: one rank adds the bias, so the sum holds it once (added on
                # every rank it would count `tensor` times: torchtitan #4245).
                experts["out_bias"] = jnp.where(jax.lax.axis_index("tensor") == 0,
                                                experts["out_bias"], 0)
            y, aux, ids = moe_ffn(
                grouped(x), router_w, experts, cfg, train=train, activation=activation,
                bias=bias, noise=grouped(noise), expert_axis=EXPERT_AXIS if sharded else None,
                token_axes=TOKEN_SHARD_AXES if sharded else (),
                real=None if real is None else real.reshape(num_groups // shards, -1),
                forced=grouped(forced), logit_bias=logit_bias)
            if tensor_split:  # each holds part of every hidden layer
                y = jax.lax.psum(y, "tensor")
            ids = ids.reshape(*x.shape[:-1], -1) if return_ids else None
            return y.reshape(x.shape), aux, ids

        if sharded:  # rows over the token axes, positions over context
            tokens = P(TOKEN_AXES, SEQ_AXIS)
            local = jax.shard_map(
                local, mesh=mesh,
                in_specs=(tokens, None if noise is None else tokens, P(),
                          None if bias is None else P(), None if logit_bias is None else P(),
                          specs,
                          None if real is None else tokens,
                          None if forced is None else tokens),
                out_specs=(tokens, P(), tokens if return_ids else None))
        y, aux, ids = local(x, noise, self.router[...], bias, logit_bias, experts, real, forced)
        if return_ids:
            aux["expert_ids"] = ids
        y = checkpoint_name(y, "moe_out")
        if cfg.num_shared_experts:  # experts too: quantized with the routed ones
            w_in, w_out = self.shared_in[...].astype(self.dtype), self.shared_out[...]
            shared = ffn(x.reshape(-1, x.shape[-1]), w_in, w_out.astype(self.dtype),
                         activation, QTYPES[cfg.quantization]).reshape(x.shape)
            if cfg.shared_gate:
                shared = shared * jax.nn.sigmoid(x @ self.shared_gate[...].astype(self.dtype))
            y = y + shared
        return y, aux


def _gather(w: jax.Array, spec: P, axis_names: tuple[str, ...]) -> jax.Array:
    """All-gather the dims of a shard_map operand that `spec` splits over `axis_names` only."""
    for dim, entry in enumerate(spec):
        names = entry if isinstance(entry, tuple) else (entry,)
        if entry and all(name in axis_names for name in names):
            w = jax.lax.all_gather(w, entry, axis=dim, tiled=True)
    return w
