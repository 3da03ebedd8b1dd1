"""The train state and the steps that change it: optimizer, abstract state and its layout,
sharded init, and the jitted train and eval steps. `train`, `plan`, `bench` and `generate`
build theirs here, so what the planner compiles is what the trainer runs.

The state is {"params": nnx.State, "opt_state": optax state}. Every parameter and optimizer
moment is laid out by parallel.RULES from the model's logical dim names and born in that
layout (the init is jitted with out_shardings); the train step is jitted once with the same
shardings in and out and the state donated, so no step ever holds a second or replicated copy.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax import parallel
from moejax.model.layers import DTYPES
from moejax.model.transformer import Transformer
from moejax.moe import router
from moejax.run.checkpoint import path_name


def make_optimizer(tc):
    if tc.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup_steps, tc.steps,
                                                tc.lr * tc.min_lr_ratio)
    else:  # rsqrt: linear warmup, then lr * sqrt(warmup / step)
        def lr(step):
            step = jnp.maximum(step, 1)
            return tc.lr * jnp.minimum(step / tc.warmup_steps,
                                       jnp.sqrt(tc.warmup_steps / step))
    def decay_mask(params):  # weight matrices only: no decay on norm scales and biases
        def decays(path, v):
            last = path_name(path).rsplit(".", 1)[-1]
            return v.replace(len(parallel.names_of(v)) >= 2
                             and not last.endswith(("scale", "bias")))

        return jax.tree_util.tree_map_with_path(decays, params,
                                                is_leaf=lambda v: isinstance(v, nnx.Variable))

    # optax.adamw can store the first moment in another dtype (mu_dtype), not the second:
    # nu stays in the parameters' dtype (float32 by default). That is where it must be: a
    # step moves nu by about (1 - b2) of itself, which bfloat16's 8 significant bits round
    # away for b2 near 1, while mu moves by (1 - b1) = 0.1.
    tx = optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                     optax.adamw(lr, tc.b1, tc.b2, mu_dtype=DTYPES[tc.moment_dtype],
                                 weight_decay=tc.weight_decay, mask=decay_mask))
    return tx, lr


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


def setup(config, mesh: Mesh) -> Setup:
    """Shapes and layout of the state of `config` on `mesh`; nothing is allocated."""
    tx, lr = make_optimizer(config.train)
    model = nnx.eval_shape(lambda: Transformer(config.model, mesh=mesh,
                                               rngs=nnx.Rngs(config.seed)))
    graphdef, params = nnx.split(model)
    opt_shapes = jax.eval_shape(tx.init, params)
    shapes = {"params": params, "opt_state": opt_shapes}
    # An optimizer moment is a copy of its parameter, metadata and all: it takes its layout.
    shardings = parallel.variable_shardings(shapes, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            shapes, shardings)
    return Setup(config, mesh, model, graphdef, abstract, shardings, tx, lr)


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
        return setup(kept, mesh), (f"capacity groups: {saved} per batch, as the checkpoint's "
                                   f"run routed (this mesh's default would be {now}): the same "
                                   "tokens are dropped as in an uninterrupted run")
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
                                     config=s.config),
                   in_shardings=(s.shardings, parallel.token_sharding(s.mesh), replicated),
                   out_shardings=(s.shardings, replicated), donate_argnums=0)


def eval_step_fn(s: Setup):
    replicated = NamedSharding(s.mesh, P())
    return jax.jit(functools.partial(eval_step, graphdef=s.graphdef),
                   in_shardings=(s.shardings["params"], parallel.token_sharding(s.mesh)),
                   out_shardings=replicated)


def loss_fn(params, graphdef, tokens, rng, tc):
    """tokens: [B, S + 1]. Returns CE + balance_coef * balance + z_coef * z (+ mtp_coef * the
    multi-token prediction loss), and metrics."""
    model = nnx.merge(graphdef, params)
    if len(model.mtp):
        logits, aux, mtp_logits = model.with_mtp(tokens, train=True, rng=rng)
    else:
        logits, aux = model(tokens[:, :-1], train=True, rng=rng)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    metrics = {"ce_loss": ce}
    loss = ce
    if aux:  # each value stacked over MoE layers; the losses are averaged over them
        metrics["balance_loss"] = aux["balance_loss"].mean()
        metrics["z_loss"] = aux["z_loss"].mean()
        metrics["expert_load"] = aux["tokens_per_expert"]
        metrics["dropped_frac"] = aux["dropped_frac"]
        loss = ce + tc.balance_coef * metrics["balance_loss"] + tc.z_coef * metrics["z_loss"]
    if len(model.mtp):
        metrics["mtp_loss"] = mtp_loss(mtp_logits, tokens)
        loss = loss + tc.mtp_coef * metrics["mtp_loss"]
    metrics["loss"] = loss
    return loss, metrics


def mtp_loss(logits, tokens):
    """logits: [D, B, S, V] of the MTP depths, tokens: [B, S + 1] -> the mean over depths of
    each one's cross-entropy over the positions whose target exists: depth k at position i
    scores tokens[:, i + k + 1], so the last k positions have none."""
    depths, _, seq, _ = logits.shape
    padded = jnp.pad(tokens, ((0, 0), (0, depths)))
    losses = []
    for k in range(1, depths + 1):
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[k - 1],
                                                             padded[:, k + 1:k + 1 + seq])
        losses.append(ce[:, :seq - k].mean())
    return jnp.mean(jnp.stack(losses))


def train_step(state, tokens, step, *, graphdef, tx, lr, config):
    """One optimizer step over `grad_accum` micro-batches of the global batch `tokens`."""
    tc = config.train
    rng = jax.random.fold_in(jax.random.key(config.seed), step)
    # [B, S+1] -> [A, B/A, S+1], taking every A-th row so each device keeps its own rows.
    micro = tokens.reshape(-1, tc.grad_accum, tokens.shape[-1]).swapaxes(0, 1)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(carry, i):
        (_, m), g = grad_fn(state["params"], graphdef, micro[i], jax.random.fold_in(rng, i), tc)
        return jax.tree.map(jnp.add, carry, (g, m)), None

    zeros = jax.eval_shape(lambda: grad_fn(state["params"], graphdef, micro[0], rng, tc))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zeros[1], zeros[0][1]))
    (grads, metrics), _ = jax.lax.scan(accumulate, zeros, jnp.arange(tc.grad_accum))
    grads, metrics = jax.tree.map(lambda x: x / tc.grad_accum, (grads, metrics))

    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if config.model.bias_rate > 0:
        params = update_router_bias(params, metrics["expert_load"], config.model.bias_rate)
    grad_norm = optax.tree.norm(grads)
    # One NaN or inf would spread through every weight for good: such a step leaves the state
    # as it was, and the host counts it.
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                             {"params": params, "opt_state": opt_state}, state)
    metrics.update(grad_norm=grad_norm, lr=lr(step), skipped=jnp.logical_not(ok))
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


def eval_step(params, tokens, *, graphdef):
    logits, _ = nnx.merge(graphdef, params)(tokens[:, :-1], train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
