"""Train an MoE (or dense) language model.

  python -m moejax.train --config configs/tiny.py --workdir runs/tiny [--config.a.b=value]

Order of work: check the config, workdir, tokenizer, data and any checkpoint's shapes (nothing
compiled yet) -> model and optimizer (sharded) -> resume from the newest intact checkpoint in
workdir, if any, else start from a dense run's (train.init_from: sparse upcycling) -> loop
(step, log, eval, checkpoint). See docs/reliability.md for what happens on SIGTERM, damaged
checkpoints and non-finite steps.
"""

import contextlib
import functools
import os
import signal
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from moejax import config_lib, data, hostmem, parallel, upcycle
from moejax.checkpoint import Checkpoints, path_name
from moejax.flops import device_peak_flops, train_flops_per_token
from moejax.metrics import CollapseAlarm, Progress, Writer, format_eta
from moejax.model import Transformer, moe_layer_ids
from moejax.moe import router
from moejax.params import param_counts


def make_optimizer(tc):
    if tc.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup_steps, tc.steps,
                                                tc.lr * tc.min_lr_ratio)
    else:  # rsqrt: linear warmup, then lr * sqrt(warmup / step)
        def lr(step):
            step = jnp.maximum(step, 1)
            return tc.lr * jnp.minimum(step / tc.warmup_steps,
                                       jnp.sqrt(tc.warmup_steps / step))
    decay_mask = functools.partial(jax.tree.map, lambda p: p.ndim >= 2)  # no decay on norms
    tx = optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                     optax.adamw(lr, tc.b1, tc.b2, weight_decay=tc.weight_decay,
                                 mask=decay_mask))
    return tx, lr


def loss_fn(params, graphdef, tokens, rng, tc):
    """tokens: [B, S + 1]. Returns CE + balance_coef * balance + z_coef * z, and metrics."""
    logits, aux = nnx.merge(graphdef, params)(tokens[:, :-1], train=True, rng=rng)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    metrics = {"ce_loss": ce}
    loss = ce
    if aux:  # averaged over MoE layers
        metrics["balance_loss"] = jnp.mean(jnp.stack([a["balance_loss"] for a in aux]))
        metrics["z_loss"] = jnp.mean(jnp.stack([a["z_loss"] for a in aux]))
        metrics["expert_load"] = jnp.stack([a["tokens_per_expert"] for a in aux])
        metrics["dropped_frac"] = jnp.stack([a["dropped_frac"] for a in aux])
        loss = ce + tc.balance_coef * metrics["balance_loss"] + tc.z_coef * metrics["z_loss"]
    metrics["loss"] = loss
    return loss, metrics


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
        params = update_router_bias(params, metrics["expert_load"], config.model)
    grad_norm = optax.tree.norm(grads)
    # One NaN or inf would spread through every weight for good: such a step leaves the state
    # as it was, and the host counts it.
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                             {"params": params, "opt_state": opt_state}, state)
    metrics.update(grad_norm=grad_norm, lr=lr(step), skipped=jnp.logical_not(ok))
    return new_state, metrics


def update_router_bias(params, expert_load, mc):
    """Auxiliary-loss-free balancing: each MoE layer's selection bias moves toward balance by
    this step's load. Row i of expert_load is the i-th MoE layer. The bias gets no gradient,
    so the optimizer leaves it alone (zero update, no weight decay on 1-D weights)."""
    layers = moe_layer_ids(mc)

    def update(path, x):
        name = path_name(path)  # blocks.<layer>.ffn.router_bias
        if not name.endswith(".router_bias"):
            return x
        load = expert_load[layers.index(int(name.split(".")[1]))]
        return router.bias_update(x, load, mc.bias_rate)

    return jax.tree_util.tree_map_with_path(update, params)


def eval_step(params, tokens, *, graphdef):
    logits, _ = nnx.merge(graphdef, params)(tokens[:, :-1], train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def global_batch(batches, step: int, sharding, seq_len: int):
    """Assemble global batch `step` from the rows this host holds."""
    shape = (batches.batch_size, seq_len + 1)
    spans = [idx[0] for idx in sharding.addressable_devices_indices_map(shape).values()]
    rows = slice(min(s.start or 0 for s in spans), max(s.stop or shape[0] for s in spans))
    return jax.make_array_from_process_local_data(sharding, batches.host_rows(step, rows), shape)


def bytes_on_device(tree) -> int:
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


class NonFiniteError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradients."""


@contextlib.contextmanager
def preemption_notice():
    """Yields `reached(step)`: True at the same step on every process once SIGTERM, the usual
    preemption notice, has reached any of them."""
    if jax.process_count() > 1:
        # jax.distributed catches SIGTERM itself and has the processes agree on a step.
        yield multihost_utils.reached_preemption_sync_point
        return
    notice = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: notice.set())
    try:
        yield lambda step: notice.is_set()
    finally:
        signal.signal(signal.SIGTERM, previous)


def train_and_evaluate(config, workdir: str) -> dict:
    """Train to config.train.steps, or stop early with a checkpoint at train.stop_at or on
    SIGTERM; returns the losses seen and the steps skipped as non-finite."""
    tc, mc = config.train, config.model
    # Every check that can fail on a bad config or input runs before anything compiles.
    config_lib.validate(config, jax.device_count())
    config_lib.check_workdir(workdir)
    mesh = parallel.make_mesh(*config_lib.mesh_shape(config, jax.device_count()))
    tokenizer = data.make_tokenizer(config.data.tokenizer)
    with config.unlocked():
        mc.vocab_size = mc.vocab_size or tokenizer.vocab_size
    seq_len = config.data.seq_len
    train_data = data.make_batches(config.data, tokenizer, "train", config.seed)
    eval_data = data.make_batches(config.data, tokenizer, "eval", config.seed)
    tx, lr = make_optimizer(tc)
    abstract = nnx.eval_shape(lambda: Transformer(mc, mesh=mesh, rngs=nnx.Rngs(config.seed)))
    graphdef, abstract_params = nnx.split(abstract)
    ckpt = Checkpoints(workdir, tc.keep_checkpoints, tc.keep_best)
    ckpt.check_shapes(abstract_params)
    if tc.init_from and ckpt.latest_step() is None:
        upcycle.check(tc.init_from, abstract_params)

    writer = Writer(workdir)
    state = init_state(config, mesh, tx)
    start_step = 0
    if restored := ckpt.restore_latest(state):
        state, meta = restored
        start_step = meta["step"]
        writer.print(f"resumed from {workdir} at step {start_step}")
    elif tc.init_from:
        # A fresh optimizer state depends on the shapes only, so init_state's one serves.
        params, dense_step = upcycle.load(tc.init_from, state["params"], mesh)
        state = {**state, "params": params}
        writer.print(f"upcycled from {tc.init_from} step {dense_step}: experts copied from "
                     "its FFNs, router and optimizer fresh")

    counts = param_counts(abstract, mc.top_k, mc.num_experts)
    tokens_per_step = config.data.batch_size * seq_len
    flops_per_token = train_flops_per_token(counts["active"], mc, seq_len)
    peak = device_peak_flops(jax.devices()[0].device_kind, tc.peak_tflops)
    moe_layers = moe_layer_ids(mc)
    writer.print(
        f"model: {counts['total'] / 1e6:.2f}M params total, {counts['active'] / 1e6:.2f}M active "
        f"per token ({mc.num_experts} experts, top-{mc.top_k}, MoE layers {moe_layers})\n"
        f"memory per device: params {bytes_on_device(state['params']) / 2**20:.1f} MiB + "
        f"optimizer {bytes_on_device(state['opt_state']) / 2**20:.1f} MiB\n"
        f"mesh: data={mesh.shape['data']} x expert={mesh.shape['expert']}; "
        f"{jax.process_count()} host(s), {jax.device_count()} devices "
        f"({jax.devices()[0].device_kind})"
        f"{'; host malloc keeps freed memory (moejax/hostmem.py)' if hostmem.kept else ''}\n"
        f"global batch: {config.data.batch_size} x {seq_len} = {tokens_per_step} tokens; "
        f"{flops_per_token / 1e6:.1f} MFLOP per token")
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    token_sharding = parallel.token_sharding(mesh)
    step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, lr=lr,
                                        config=config), donate_argnums=0)
    eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef))

    def evaluate(step):
        losses = [eval_fn(state["params"], global_batch(eval_data, i, token_sharding, seq_len))
                  for i in range(tc.eval_batches)]
        loss = float(np.mean(jax.device_get(losses)))
        writer.scalars(step, {"eval/loss": loss, "eval/ppl": float(np.exp(loss))})
        writer.print(f"step {step}: eval loss {loss:.4f}, ppl {np.exp(loss):.2f}")
        history["eval_loss"][step] = loss
        return loss

    history = {"train_loss": {}, "eval_loss": {}, "skipped_steps": []}
    progress = Progress(tc.steps, tokens_per_step, start_step)
    last = min(tc.steps, tc.stop_at or tc.steps)
    pending = {}  # step -> (loss, skipped) still on device
    in_a_row = 0  # non-finite steps
    alarm = (CollapseAlarm(moe_layers, mc.num_experts, tc.collapse_threshold, tc.collapse_checks)
             if moe_layers and tc.collapse_threshold > 0 else None)
    if start_step == 0:
        evaluate(0)
    with preemption_notice() as preempted, contextlib.closing(ckpt), contextlib.closing(writer):
        for step in range(start_step + 1, last + 1):
            batch = global_batch(train_data, step - 1, token_sharding, seq_len)
            state, metrics = step_fn(state, batch, jnp.int32(step - 1))
            pending[step] = metrics["loss"], metrics["skipped"]
            log = step % tc.log_every == 0 or step == last
            stop = preempted(step)
            save = step % tc.ckpt_every == 0 or step == last or stop

            # Read every finished step; this one too when a log or a save waits for it
            # anyway. Otherwise the host stays one step ahead and the device never waits.
            for done in sorted(pending)[:None if log or save else -1]:
                loss, skipped = jax.device_get(pending.pop(done))
                history["train_loss"][done] = float(loss)
                in_a_row = in_a_row + 1 if skipped else 0
                if skipped:
                    history["skipped_steps"].append(done)
                    writer.print(f"step {done}: non-finite loss or gradients, skipped "
                                 f"({in_a_row} in a row)")
                if in_a_row >= tc.max_nonfinite_steps:
                    good = ckpt.latest_step()
                    raise NonFiniteError(
                        f"train.max_nonfinite_steps={tc.max_nonfinite_steps}: steps "
                        f"{done - in_a_row + 1}..{done} all had a non-finite loss or gradients; "
                        + (f"the last good state is checkpoint {good} in {workdir}"
                           if good is not None else "no checkpoint was saved"))

            if log:
                m = jax.device_get(metrics)
                perf = progress.tick(step)
                values = {"train/loss": m["loss"], "train/ce_loss": m["ce_loss"],
                          "opt/lr": m["lr"], "opt/grad_norm": m["grad_norm"],
                          "perf/tokens_per_s": perf["perf/tokens_per_s"],
                          "perf/step_ms": perf["perf/step_ms"]}
                if peak:
                    achieved = perf["perf/tokens_per_s"] * flops_per_token / jax.device_count()
                    values["perf/mfu"] = achieved / peak
                if moe_layers:
                    values["train/balance_loss"] = m["balance_loss"]
                    values["train/z_loss"] = m["z_loss"]
                    load = m["expert_load"] / m["expert_load"].sum(-1, keepdims=True)
                    writer.expert_load(step, moe_layers, load, m["dropped_frac"])
                    for warning in alarm.update(step, load) if alarm else []:
                        writer.print(warning)
                writer.scalars(step, values)
                writer.print(f"step {step}/{tc.steps} loss {m['loss']:.4f} "
                             f"tok/s {perf['perf/tokens_per_s']:,.0f} "
                             f"step {perf['perf/step_ms']:.0f} ms "
                             f"ETA {format_eta(perf['eta_s'])}")

            eval_loss = evaluate(step) if step % tc.eval_every == 0 or step == tc.steps else None
            if save:
                ckpt.save(step, state, {"step": step, "tokens_seen": step * tokens_per_step},
                          eval_loss)
            if stop:
                writer.print(f"preempted: saved step {step} in {workdir}; run the same "
                             "command again to resume")
                break
    return history


def init_state(config, mesh, tx):
    """Parameters and optimizer state, created directly in their sharded layout."""
    shardings = nnx.get_named_sharding(nnx.state(nnx.eval_shape(
        lambda: Transformer(config.model, mesh=mesh, rngs=nnx.Rngs(config.seed)))), mesh)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init_params():
        return nnx.split(Transformer(config.model, mesh=mesh, rngs=nnx.Rngs(config.seed)))[1]

    params = init_params()
    return parallel.replicate_unplaced({"params": params, "opt_state": jax.jit(tx.init)(params)},
                                       mesh)


def main(argv):
    del argv
    from absl import flags

    hostmem.keep_freed_memory()
    try:
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except NonFiniteError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    config_lib.run(main)
