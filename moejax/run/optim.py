"""The optimizer (`train.optimizer`): AdamW on every parameter, or Muon on the hidden matrices
with AdamW on the rest.

Muon is optax's (`optax.contrib.scale_by_muon`): Nesterov momentum, then each matrix replaced
by about the nearest semi-orthogonal one by a Newton-Schulz iteration; its update is scaled by
the matrix's shape (`train.muon_lr_scale`) as optax.contrib.muon would. Which axes of a
parameter make the matrix is MUON_DIMS, by the parameter's name; every other axis (scanned
layers, experts, gate | linear, key | value) is a batch axis, so each layer's each expert is
orthogonalized on its own [d, f]. Everything else (embeddings, unembedding, norms, routers and
their biases, attention sinks, every bias) stays with AdamW, as with `train.optimizer=adamw`.
Both share the learning-rate schedule, gradient clipping and decoupled weight decay.
"""

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from optax.contrib import MuonDimensionNumbers, scale_by_muon

from moejax import parallel
from moejax.model.layers import DTYPES
from moejax.run.checkpoint import path_name

OPTIMIZERS = ("adamw", "muon")
# How Muon's update is scaled by the matrix's shape (`train.muon_lr_scale`), fan_in x fan_out
# being one matrix's [reduction, output] size:
#   consistent_rms  x 0.2 sqrt(max(fan_in, fan_out)): the update's RMS about AdamW's, so the
#                   same learning rate and weight decay serve both (Moonlight, Kimi K2)
#   width           x sqrt(max(1, fan_out / fan_in)) (Keller Jordan's Muon; wants its own lr)
#   none            the orthogonalized momentum as it is
MUON_LR_SCALES = ("consistent_rms", "width", "none")
MUON_RMS = 0.2  # Moonlight's: matches AdamW's typical update RMS of 0.2 to 0.4
MUON_BETA = 0.95  # Muon's Nesterov momentum (optax's default, Moonlight's and Kimi K2's)
MUON_NS_STEPS = 5  # Newton-Schulz iterations, with optax's quintic coefficients

# leaf name -> (reduction axes, output axes) of its matrix, counted from the end; the axes
# before them are batch axes. The layouts are model/attention.py's, mla.py's, mtp.py's and
# moe/ffn.py's. Gate and linear halves of w_in, and key and value of kv, are two matrices each,
# as the models Muon trained keep them (Moonlight and Kimi K2 in DeepSeek-V3's layout: q_proj,
# kv_b_proj, gate_proj, up_proj per expert; MaxText's wi_0 / wi_1): their outputs meet
# through a product or attention, never as one sum, so each has its own spectral norm.
MUON_DIMS = {
    "q": ((-3,), (-2, -1)),  # [d, heads, head_dim] (mla without q_lora_rank too)
    "kv": ((-4,), (-2, -1)),  # [d, key | value, kv_heads, head_dim]
    "out": ((-3, -2), (-1,)),  # [heads, head_dim, d]
    "q_down": ((-2,), (-1,)),  # mla [d, q_lora_rank]
    "kv_down": ((-2,), (-1,)),  # mla [d, kv_lora_rank + rope dims]
    "q_up": ((-3,), (-2, -1)),  # mla [q_lora_rank, heads, dims]
    "kv_up": ((-3,), (-2, -1)),  # mla [kv_lora_rank, heads, nope + v dims]
    "w_in": ((-3,), (-1,)),  # [(experts,) d, gate | linear, f]
    "w_out": ((-2,), (-1,)),  # [(experts,) f, d]
    "shared_in": ((-3,), (-1,)),
    "shared_out": ((-2,), (-1,)),
    "proj": ((-2,), (-1,)),  # mtp [2 d, d]
}
# The other parameters by name: AdamW. Norm scales, biases and sinks go by their suffix.
ADAMW_NAMES = ("embed", "unembed", "router", "shared_gate")
ADAMW_SUFFIXES = ("scale", "bias", "sinks")


def leaf_name(path) -> str:
    return path_name(path).rsplit(".", 1)[-1]


def muon_dims(path, v) -> MuonDimensionNumbers | None:
    """The matrix axes of the parameter at `path` if Muon trains it, else None (AdamW)."""
    name = leaf_name(path)
    if name in MUON_DIMS:
        return MuonDimensionNumbers(*MUON_DIMS[name])
    if name in ADAMW_NAMES or name.endswith(ADAMW_SUFFIXES):
        return None
    # A new parameter must be placed here on purpose, not left to AdamW by accident.
    raise ValueError(f"train.optimizer=muon: no rule for parameter {path_name(path)} "
                     f"{tuple(v.shape)}; add it to MUON_DIMS or ADAMW_NAMES (moejax/run/optim.py)")


def _is_variable(v) -> bool:
    return isinstance(v, nnx.Variable)


def _masked(v) -> bool:  # a leaf the other partition owns (optax.masked's placeholder)
    return not parallel.holds_array(v)


def labels(params):
    """params with each Variable's value replaced by its optimizer: "adamw", "muon", or for a
    scanned stack's matrix "muon_layers_N", N its layers (Muon run on each: over_layers)."""
    def label(path, v):
        if muon_dims(path, v) is None:
            return v.replace("adamw")
        # A leading layer axis ahead of the named dims: a scanned stack's
        stacked = len(v.shape) > len(parallel.names_of(v))
        return v.replace(f"muon_layers_{v.shape[0]}" if stacked else "muon")

    return jax.tree_util.tree_map_with_path(label, params, is_leaf=_is_variable)


def over_layers(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` on each layer of scanned stacks, every leaf's leading axis, as if each were its
    own parameter (its step counts too, one per layer). optax flattens a parameter's batch axes
    into one before orthogonalizing each matrix: [layers, experts, ...] would merge the experts
    split over devices into the unsplit layer axis, a merge XLA can only make by gathering
    every expert onto every device. Under this vmap the experts lead what is merged, and keep
    their split."""
    return optax.GradientTransformation(jax.vmap(inner.init), jax.vmap(inner.update))


def partitioned(transforms: dict, muon) -> optax.GradientTransformation:
    """optax.partition by `labels`, with over_layers(muon) for each stack size it finds: a
    vmap needs one size, and the stacks' sizes are the params'. The labels follow from the
    tree's structure and shapes alone, so init and update build the same partition."""
    def build(tree):
        stacks = {label for label in jax.tree.leaves(labels(tree))
                  if label.startswith("muon_layers_")}
        return optax.partition({**transforms, **{s: over_layers(muon) for s in stacks}}, labels)

    return optax.GradientTransformation(
        lambda params: build(params).init(params),
        lambda updates, state, params=None: build(updates).update(updates, state, params))


def dimension_numbers(updates):
    """Muon's view of `updates` (its partition: the AdamW leaves masked): each Variable's
    value replaced by its MuonDimensionNumbers, the masked ones left as they are."""
    return jax.tree_util.tree_map_with_path(
        lambda p, v: v if _masked(v) else v.replace(muon_dims(p, v)), updates,
        is_leaf=_is_variable)


def shape_factor(shape: tuple, dims: MuonDimensionNumbers, scale: str) -> float:
    """What train.muon_lr_scale `scale` multiplies the orthogonalized update of one matrix by,
    for a parameter of `shape` whose matrix axes are `dims` (MUON_LR_SCALES)."""
    fan_in = math.prod(shape[a] for a in dims.reduction_axis)
    fan_out = math.prod(shape[a] for a in dims.output_axis)
    if scale == "consistent_rms":
        return MUON_RMS * math.sqrt(max(fan_in, fan_out))
    return math.sqrt(max(1.0, fan_out / fan_in)) if scale == "width" else 1.0


def scale_by_shape(scale: str) -> optax.GradientTransformation:
    """Each Muon update times its shape_factor (optax.contrib.muon's `consistent_rms` option,
    whose transform optax does not export)."""
    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(
            lambda p, v: v if _masked(v) else v.replace(
                v.get_value() * shape_factor(v.shape, muon_dims(p, v), scale)),
            updates, is_leaf=_is_variable), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def newton_schulz_flops(params, per_device: bool = False) -> int:
    """FLOPs of one step's Newton-Schulz iterations over every matrix Muon trains: each
    [m, n] matrix (m <= n: optax turns tall ones wide) costs per iteration X X^T (2 m^2 n),
    A^2 (2 m^3) and (b A + c A^2) X (2 m^2 n). All devices together, or with `per_device`
    (params laid out: arrays with shardings) one device's: the matrices whose batch index
    (layer, expert) it holds, each whole, so a split of the batch axes (expert) divides the
    work and a split of the matrix axes (fsdp, tensor) does not."""
    total = 0
    for path, v in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]:
        dims = muon_dims(path, v)
        if dims is None:
            continue
        m, n = sorted((math.prod(v.shape[a] for a in dims.reduction_axis),
                       math.prod(v.shape[a] for a in dims.output_axis)))
        matrices = math.prod(v.shape) // (m * n)
        if per_device:
            matrix_axes = {a % v.ndim for a in dims.reduction_axis + dims.output_axis}
            x = v.get_value()
            shard = x.sharding.shard_shape(x.shape)
            matrices //= math.prod(v.shape[a] // shard[a] for a in range(v.ndim)
                                   if a not in matrix_axes)
        total += matrices * MUON_NS_STEPS * (4 * m * m * n + 2 * m ** 3)
    return total


def decay_mask(params):
    """Weight matrices decay; norm scales and biases do not."""
    def decays(path, v):
        return v.replace(len(parallel.names_of(v)) >= 2 and not leaf_name(path).endswith(
            ("scale", "bias")))

    return jax.tree_util.tree_map_with_path(decays, params, is_leaf=_is_variable)


def schedule(tc):
    """The learning rate at each step (optax schedule)."""
    if tc.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup_steps, tc.steps,
                                                  tc.lr * tc.min_lr_ratio)

    def lr(step):  # rsqrt: linear warmup, then lr * sqrt(warmup / step)
        step = jnp.maximum(step, 1)
        return tc.lr * jnp.minimum(step / tc.warmup_steps, jnp.sqrt(tc.warmup_steps / step))

    return lr


def make_optimizer(tc):
    """(the optax transformation `tc` (config.train) asks for, its learning-rate schedule)."""
    lr = schedule(tc)
    # optax.adamw can store the first moment in another dtype (mu_dtype), not the second:
    # nu stays in the parameters' dtype (float32 by default). That is where it must be: a
    # step moves nu by about (1 - b2) of itself, which bfloat16's 8 significant bits round
    # away for b2 near 1, while mu moves by (1 - b1) = 0.1.
    adamw = optax.adamw(lr, tc.b1, tc.b2, mu_dtype=DTYPES[tc.moment_dtype],
                        weight_decay=tc.weight_decay, mask=decay_mask)
    optimizer = tc.optimizer
    if optimizer == "adamw":
        return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw), lr
    if optimizer != "muon":
        raise ValueError(f"train.optimizer={optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
    scale = tc.muon_lr_scale
    if scale not in MUON_LR_SCALES:
        raise ValueError(f"train.muon_lr_scale={scale!r}; allowed: {', '.join(MUON_LR_SCALES)}")
    # optax.contrib.muon itself would give its AdamW part Nesterov momentum and decay every
    # non-matrix leaf, norms and biases included: its pieces are put together here instead,
    # beside the same AdamW as above.
    muon = optax.chain(
        scale_by_muon(ns_steps=MUON_NS_STEPS, beta=MUON_BETA, mu_dtype=DTYPES[tc.moment_dtype],
                      weight_dimension_numbers=dimension_numbers),
        scale_by_shape(scale),
        optax.add_decayed_weights(tc.weight_decay),  # every Muon leaf is a weight matrix
        optax.scale_by_learning_rate(lr))
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                       partitioned({"muon": muon, "adamw": adamw}, muon)), lr
