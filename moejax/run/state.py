"""The train state and the steps that change it: optimizer, abstract state and its layout,
sharded init, and the jitted train and eval steps. `train`, `plan`, `bench` and `generate`
build theirs here, so what the planner compiles is what the trainer runs.

The state is {"params": nnx.State, "opt_state": optax state}. Every parameter and optimizer
moment is laid out by parallel.RULES from the model's logical dim names and born in that
layout (the init is jitted with out_shardings); the train step is jitted once with the same
shardings in and out and the state donated, so no step ever holds a second or replicated copy.

With train.offload_optimizer on a TPU or GPU the optimizer state's arrays rest in host memory
(jax memory kind "pinned_host") between steps: the step brings them to the device for the
update and returns the new ones to the host (its out_shardings), so the device holds them only
from that transfer to the end of the step. On CPU, device and host memory are one: no effect.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax import parallel
from moejax.model.transformer import Transformer
from moejax.model.xla_attention import document_starts
from moejax.moe import router
from moejax.run import health, qk_clip
from moejax.run.checkpoint import path_name
from moejax.run.optim import make_optimizer


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every job needs to build, restore or step the state of one config on one mesh."""
    config: object
    mesh: Mesh
    model: nnx.Module  # abstract: shapes and metadata only
    graphdef: object
    abstract: dict  # the state as jax.ShapeDtypeStruct with shardings
    shardings: dict
    tx: optax.GradientTransformation
    lr: object
    platform: str = "cpu"  # the backend the step is built for
    opt_memory: str | None = None  # where the optimizer state rests: None = device memory


# Backends whose devices have a memory apart from the host's, which offloading can relieve.
OFFLOAD_PLATFORMS = ("tpu", "gpu", "cuda", "rocm")
HOST_MEMORY = "pinned_host"  # host memory the device reaches by DMA, as jax names it


def optimizer_memory(config, platform: str) -> str | None:
    """The memory kind the optimizer state rests in between steps: "pinned_host" with
    train.offload_optimizer on a TPU or GPU, else None (device memory, as without the key)."""
    offload = config.train.offload_optimizer and platform in OFFLOAD_PLATFORMS
    return HOST_MEMORY if offload else None


def offload_note(s: "Setup") -> str | None:
    """The start-up line for train.offload_optimizer where it does nothing, else None."""
    if not s.config.train.offload_optimizer or s.opt_memory is not None:
        return None
    return (f"train.offload_optimizer: no effect on {s.platform} (device and host memory are the "
            "same)")


def at_rest(shardings, shapes, memory: str | None):
    """The optimizer state's `shardings` with each array of `shapes` in `memory`; the step
    counts (scalars) stay on the device, where every step reads them."""
    if memory is None:
        return shardings
    return jax.tree.map(lambda s, a: s.with_memory_kind(memory) if a.ndim else s,
                        shardings, shapes)


def setup(config, mesh: Mesh, platform: str | None = None) -> Setup:
    """Shapes and layout of the state of `config` on `mesh`; nothing is allocated.
    `platform` (default: the first device's) decides train.offload_optimizer's effect; an
    export for another backend names its own."""
    platform = platform or jax.devices()[0].platform
    tx, lr = make_optimizer(config.train)
    model = nnx.eval_shape(lambda: Transformer(config.model, mesh=mesh,
                                               rngs=nnx.Rngs(config.seed)))
    graphdef, params = nnx.split(model)
    opt_shapes = jax.eval_shape(tx.init, params)
    shapes = {"params": params, "opt_state": opt_shapes}
    # An optimizer moment is a copy of its parameter, metadata and all: it takes its layout.
    shardings = parallel.variable_shardings(shapes, mesh)
    opt_memory = optimizer_memory(config, platform)
    shardings["opt_state"] = at_rest(shardings["opt_state"], opt_shapes, opt_memory)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            shapes, shardings)
    return Setup(config, mesh, model, graphdef, abstract, shardings, tx, lr, platform,
                 opt_memory)


def capacity_groups(config, mesh: Mesh) -> int:
    """The capacity groups of a batch the MoE layers route in (moe/layer.py): model.num_groups,
    or by default one per token shard of `mesh`. Which tokens exceed an expert's capacity
    depends on them, so a checkpoint records them (meta "num_groups")."""
    return config.model.num_groups or parallel.num_token_shards(mesh)


def keep_groups(s: Setup, saved: int | None) -> tuple[Setup, str | None]:
    """The setup a run resumed from a checkpoint that recorded `saved` capacity groups goes on
    with, and a line to print if they change. With model.num_groups = 0 the groups would
    follow the mesh: they stay the checkpoint's wherever this mesh can hold them (a multiple
    of its token shards that divides a micro-batch's tokens), so a run resumed onto another
    mesh drops the tokens an uninterrupted one drops and its losses go on the same."""
    config, mesh = s.config, s.mesh
    now = capacity_groups(config, mesh)
    if saved is None or saved == now or not config.model.num_experts:
        return s, None
    shards = parallel.num_token_shards(mesh)
    tokens = config.data.batch_size // config.train.grad_accum * config.data.seq_len
    if not config.model.num_groups and saved % shards == 0 and tokens % saved == 0:
        kept = config.copy_and_resolve_references()
        with kept.unlocked():
            kept.model.num_groups = saved
        return setup(kept, mesh, s.platform), (
            f"capacity groups: {saved} per batch, as the checkpoint's run routed (this mesh's "
            f"default would be {now}): the same tokens are dropped as in an uninterrupted run")
    return s, (f"capacity groups: {now} per batch, the checkpoint's run routed in {saved}: "
               "other tokens exceed an expert's capacity, so the losses differ from an "
               f"uninterrupted run's (to keep them: model.num_groups={saved}, on a mesh whose "
               f"data x fsdp x expert divides {saved})")


def undivided(s: Setup) -> list[str]:
    """'stacks.0.blocks.0.attn.kv: kv_heads=4' for each parameter dim its mesh axes do not
    divide, which therefore stays whole on every device of that axis."""
    out = []
    for path, v in jax.tree_util.tree_flatten_with_path(
            nnx.state(s.model), is_leaf=lambda v: isinstance(v, nnx.Variable))[0]:
        if dims := parallel.undivided(parallel.names_of(v), v.shape, s.mesh):
            out.append(f"{path_name(path)}: {', '.join(dims)}")
    return out


def init(s: Setup) -> dict:
    """Parameters and optimizer state, created directly in their layout."""
    config = s.config

    @functools.partial(jax.jit, out_shardings=s.shardings)
    def create():
        params = nnx.state(Transformer(config.model, mesh=s.mesh, rngs=nnx.Rngs(config.seed)))
        return {"params": params, "opt_state": s.tx.init(params)}

    return create()


def train_step_fn(s: Setup):
    """jit(train_step): state in and out in its layout (donated), tokens over the token axes."""
    replicated = NamedSharding(s.mesh, P())
    return jax.jit(functools.partial(train_step, graphdef=s.graphdef, tx=s.tx, lr=s.lr,
                                     config=s.config, offloaded=s.opt_memory is not None),
                   in_shardings=(s.shardings, parallel.token_sharding(s.mesh), replicated),
                   out_shardings=(s.shardings, replicated), donate_argnums=0)


def eval_step_fn(s: Setup):
    replicated = NamedSharding(s.mesh, P())
    return jax.jit(functools.partial(eval_step, graphdef=s.graphdef),
                   in_shardings=(s.shardings["params"], parallel.token_sharding(s.mesh)),
                   out_shardings=replicated)


def as_batch(batch) -> dict:
    """The train step's batch (loader.global_batch): {"tokens", "segments", "loss_mask"},
    each [B, S + 1]. A bare token array is one document per row, every target scored."""
    if isinstance(batch, dict):
        return batch
    ones = jnp.ones_like(batch)
    return {"tokens": batch, "segments": ones, "loss_mask": ones}


def target_weights(batch: dict, ahead: int = 1) -> jax.Array:
    """[B, S] float32: 1 where input i's target, the token `ahead` places on, is scored: it
    exists, is supervised (loss_mask) and lies in input i's document; a document's first
    token is never predicted from the one before, nor is padding."""
    segments, supervised = batch["segments"], batch["loss_mask"]
    seq = segments.shape[1] - 1

    def target(a):  # a[:, i + ahead] at input i; 0 past the row's end
        return jnp.pad(a, ((0, 0), (0, ahead)))[:, ahead:ahead + seq]

    same_doc = (target(segments) == segments[:, :seq]) & (target(segments) != 0)
    return (same_doc & (target(supervised) != 0)).astype(jnp.float32)


def scored_counts(batch: dict, depths: int) -> jax.Array:
    """[1 + depths] targets scored in `batch` by the next-token loss and each MTP depth: the
    denominators of the losses' means (at least 1: a batch of padding scores 0, not NaN)."""
    return jnp.maximum(jnp.stack([target_weights(batch, k + 1).sum()
                                  for k in range(1 + depths)]), 1.0)


def loss_fn(params, graphdef, batch, rng, tc, counts=None, share: float = 1.0):
    """batch: as_batch's. Returns CE + balance_coef * balance + z_coef * z (+ mtp_coef * the
    multi-token prediction loss), and metrics. The cross-entropies are sums over this batch's
    scored targets divided by `counts` (scored_counts; None: this batch's own), so that the
    micro-batches of a step add up to the mean over the whole batch; the router's losses and
    statistics are this batch's, times `share` (1 / micro-batches). A batch["routing"],
    int [B, S + 1 or S, MoE layers, top_k] expert ids (generate's record), is replayed: the
    MoE layers route the inputs by it, and "routing_mismatch" is the share of its real
    assignments their routers would not have chosen. With train.qk_clip > 0, metrics gain
    "max_logits": each attention head's largest logit on this batch (Transformer's)."""
    batch = as_batch(batch)
    tokens, segments = batch["tokens"], batch["segments"][:, :-1]
    routing = batch.get("routing")  # optional: replay
    routing = None if routing is None else routing[:, :tokens.shape[1] - 1]
    model = nnx.merge(graphdef, params)
    depths = len(model.mtp)
    counts = scored_counts(batch, depths) if counts is None else counts
    # QK-clip's statistic costs a second q.k per layer: only asked for when it is used.
    asked = {"max_logits": True} if tc.qk_clip > 0 else {}
    if depths:
        logits, aux, mtp_logits = model.with_mtp(tokens, train=True, rng=rng, segments=segments,
                                                 routing=routing, **asked)
    else:
        logits, aux = model(tokens[:, :-1], train=True, rng=rng, segments=segments,
                            routing=routing, **asked)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    ce = (ce * target_weights(batch)).sum() / counts[0]
    metrics = {"ce_loss": ce}
    if asked:
        aux = dict(aux)
        metrics["max_logits"] = aux.pop("max_logits")
    loss = ce
    if aux:  # each value stacked over MoE layers; the losses are averaged over them
        metrics["balance_loss"] = share * aux["balance_loss"].mean()
        metrics["z_loss"] = share * aux["z_loss"].mean()
        metrics["expert_load"] = share * aux["tokens_per_expert"]
        metrics["dropped_frac"] = share * aux["dropped_frac"]
        if routing is not None:
            metrics["routing_mismatch"] = share * aux["routing_mismatch"].mean()
        loss = ce + tc.balance_coef * metrics["balance_loss"] + tc.z_coef * metrics["z_loss"]
    if depths:
        metrics["mtp_loss"] = mtp_loss(mtp_logits, batch, counts[1:])
        loss = loss + tc.mtp_coef * metrics["mtp_loss"]
    metrics["loss"] = loss
    return loss, metrics


def mtp_loss(logits, batch, counts=None):
    """logits: [D, B, S, V] of the MTP depths -> the mean over depths of each one's
    cross-entropy over the targets it scores (target_weights): depth k at position i scores
    tokens[:, i + k + 1], so the last k positions of a row, or of a document, have none.
    counts: [D] the denominators (None: this batch's)."""
    batch = as_batch(batch)
    depths, _, seq, _ = logits.shape
    counts = scored_counts(batch, depths)[1:] if counts is None else counts
    padded = jnp.pad(batch["tokens"], ((0, 0), (0, depths)))
    losses = []
    for k in range(1, depths + 1):
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[k - 1],
                                                             padded[:, k + 1:k + 1 + seq])
        losses.append((ce * target_weights(batch, k + 1)).sum() / counts[k - 1])
    return jnp.mean(jnp.stack(losses))


def train_step(state, batch, step, *, graphdef, tx, lr, config, offloaded: bool = False):
    """One optimizer step over `grad_accum` micro-batches of the global batch (as_batch's).
    The loss is the mean over the scored targets of the whole batch, however it is split.
    `offloaded`: the optimizer state arrives in host memory and is brought to the device for
    the update; the caller's out_shardings return the new one to the host."""
    tc = config.train
    batch = as_batch(batch)
    rng = jax.random.fold_in(jax.random.key(config.seed), step)
    # [B, ...] -> [A, B/A, ...], taking every A-th row so each device keeps its own rows.
    micro = jax.tree.map(lambda a: a.reshape(-1, tc.grad_accum, *a.shape[1:]).swapaxes(0, 1),
                         batch)
    counts = scored_counts(batch, config.model.mtp_layers)
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, graphdef=graphdef, tc=tc,
                                                   counts=counts, share=1 / tc.grad_accum),
                                 has_aux=True)

    def accumulate(carry, i):
        one = jax.tree.map(lambda a: a[i], micro)
        (_, m), g = grad_fn(state["params"], batch=one, rng=jax.random.fold_in(rng, i))
        tops = m.pop("max_logits", {})
        (g, m), top = jax.tree.map(jnp.add, carry[0], (g, m)), carry[1]
        return ((g, m), jax.tree.map(jnp.maximum, top, tops)), None

    first = jax.tree.map(lambda a: a[0], micro)
    zeros = jax.eval_shape(lambda: grad_fn(state["params"], batch=first, rng=rng))
    shapes = (zeros[1], zeros[0][1])
    tops = jax.tree.map(lambda s: jnp.full(s.shape, -jnp.inf, s.dtype),
                        shapes[1].pop("max_logits", {}))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    # Each micro-batch's loss and metrics are its share of the step's: they add up; the
    # largest logits are the largest of any micro-batch.
    ((grads, metrics), tops), _ = jax.lax.scan(accumulate, (zeros, tops),
                                               jnp.arange(tc.grad_accum))

    # Brought in after the gradients, so the backward pass never shares the device with the
    # moments (XLA may start the copy earlier to overlap it; it cannot need it sooner).
    old = {"params": state["params"], "opt_state": (parallel.on_device(state["opt_state"])
                                                    if offloaded else state["opt_state"])}
    updates, opt_state = tx.update(grads, old["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if tc.qk_clip > 0:
        # On the updated weights, by the logits their pre-update values gave (MuonClip).
        params = qk_clip.clip(params, tops, tc.qk_clip, config.model.qk_nope_head_dim)
        every = jnp.concatenate([t.ravel() for t in jax.tree.leaves(tops)])
        metrics.update(max_logit=every.max(), qk_clipped_heads=(every > tc.qk_clip).sum())
    if config.model.bias_rate > 0:
        params = update_router_bias(params, metrics["expert_load"], config.model.bias_rate)
    grad_norm = optax.tree.norm(grads)
    # The sentinel's view (run/health.py): which tensors, down to the expert, are finite, and
    # how far each expert's gradient and update reach.
    finite = {"parameter": health.finite_flags(state["params"]),
              "loss": {"loss": jnp.isfinite(metrics["loss"])},
              "gradient": health.finite_flags(grads), "update": health.finite_flags(updates)}
    # One NaN or inf would spread through every weight for good: such a step (a non-finite
    # loss, gradient or update) leaves the state as it was, and the host counts it.
    ok = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
          & jnp.all(jnp.stack([f.all() for f in jax.tree.leaves(finite["update"])])))
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                             {"params": params, "opt_state": opt_state}, old)
    metrics.update(grad_norm=grad_norm, lr=lr(step), skipped=jnp.logical_not(ok),
                   scored_frac=counts[0] / batch["segments"][:, 1:].size,
                   # past cudnn_attention.PACKED_RUNS a GPU's attention takes XLA's flash
                   max_row_runs=document_starts(batch["segments"][:, :-1]).sum(1).max(),
                   health={"finite": finite, "expert_grad_norm": health.expert_norms(grads),
                           "expert_update_norm": health.expert_norms(updates)})
    return new_state, metrics


def update_router_bias(params, expert_load, rate: float):
    """Auxiliary-loss-free balancing: each MoE layer's selection bias moves toward balance by
    this step's load. expert_load: [MoE layers, E], rows in moe_layer_ids(mtp=True) order: the
    MoE layers of the one scanned stack that has them (one [n, E] bias), then each MoE
    multi-token prediction module (an [E] bias each). The bias gets no gradient, so the
    optimizer leaves it alone (zero update, no weight decay on it)."""
    names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    mtp = sorted((n for n in names if n.startswith("mtp.") and n.endswith(".router_bias")),
                 key=lambda n: int(n.split(".")[1]))
    main = expert_load.shape[0] - len(mtp)

    def update(path, x):
        name = path_name(path)
        if not name.endswith(".router_bias"):
            return x
        load = expert_load[main + mtp.index(name)] if name in mtp else expert_load[:main]
        return router.bias_update(x, load, rate)

    return jax.tree_util.tree_map_with_path(update, params)


def eval_step(params, batch, *, graphdef):
    """[the held-out batch's summed cross-entropy over its scored targets, their number]:
    summed over batches, one mean over all of them. The router's bias does not move."""
    batch = as_batch(batch)
    tokens = batch["tokens"]
    logits, _ = nnx.merge(graphdef, params)(tokens[:, :-1], train=False,
                                            segments=batch["segments"][:, :-1])
    weights = target_weights(batch)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return jnp.stack([(ce * weights).sum(), weights.sum()])
