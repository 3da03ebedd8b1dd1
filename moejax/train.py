"""Train an MoE (or dense) language model.

  python -m moejax.train --config configs/tiny.py --workdir runs/tiny [--config.a.b=value]

Order of work: check the config, workdir, tokenizer, data and any checkpoint's shapes (nothing
compiled yet) -> model and optimizer (sharded) -> resume from the newest intact checkpoint in
workdir, if any, else start from a dense run's (train.init_from: sparse upcycling) -> loop
(step, log, eval, checkpoint). See docs/reliability.md for what happens on SIGTERM, damaged
checkpoints and non-finite steps.
"""

import contextlib
import os
import signal
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from moejax import config_lib, data, hostmem, parallel, state, upcycle
from moejax.checkpoint import Checkpoints
from moejax.flops import device_peak_flops, train_flops_per_token
from moejax.metrics import CollapseAlarm, Progress, Writer, format_eta
from moejax.model import moe_layer_ids
from moejax.params import bytes_per_device, param_counts


def global_batch(batches, step: int, sharding, shape: tuple[int, int]):
    """Assemble global batch `step`, [batch_size, seq_len + 1], from the rows this host holds
    (a streamed source knows no batch size of its own)."""
    spans = [idx[0] for idx in sharding.addressable_devices_indices_map(shape).values()]
    rows = slice(min(s.start or 0 for s in spans), max(s.stop or shape[0] for s in spans))
    return jax.make_array_from_process_local_data(sharding, batches.host_rows(step, rows), shape)


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
    mesh = parallel.make_mesh(parallel.mesh_sizes(config.mesh, jax.device_count()))
    tokenizer = data.make_tokenizer(config.data.tokenizer)
    with config.unlocked():
        mc.vocab_size = mc.vocab_size or tokenizer.vocab_size
    seq_len = config.data.seq_len
    train_data = data.make_batches(config.data, tokenizer, "train", config.seed)
    eval_data = data.make_batches(config.data, tokenizer, "eval", config.seed)
    setup = state.setup(config, mesh)
    ckpt = Checkpoints(workdir, tc.keep_checkpoints, tc.keep_best)
    ckpt.check_shapes(setup.abstract["params"])
    if tc.init_from and ckpt.latest_step() is None:
        upcycle.check(tc.init_from, setup.abstract["params"])

    writer = Writer(workdir)
    start_step = 0
    if restored := ckpt.restore_latest(setup.abstract):
        train_state, meta = restored
        start_step = meta["step"]
        writer.print(f"resumed from {workdir} at step {start_step}")
    else:
        train_state = state.init(setup)
        if tc.init_from:
            # A fresh optimizer state depends on the shapes only, so the init's one serves.
            params, dense_step = upcycle.load(tc.init_from, train_state["params"], mesh)
            train_state = {**train_state, "params": params}
            writer.print(f"upcycled from {tc.init_from} step {dense_step}: experts copied "
                         "from its FFNs, router and optimizer fresh")

    counts = param_counts(setup.model, mc.top_k, mc.num_experts)
    tokens_per_step = config.data.batch_size * seq_len
    flops_per_token = train_flops_per_token(counts["active"], mc, seq_len)
    peak = device_peak_flops(jax.devices()[0].device_kind, tc.peak_tflops)
    moe_layers = moe_layer_ids(mc)
    writer.print(
        f"model: {counts['total'] / 1e6:.2f}M params total, {counts['active'] / 1e6:.2f}M active "
        f"per token ({mc.num_experts} experts, top-{mc.top_k}, MoE layers {moe_layers})\n"
        f"memory per device: params {bytes_per_device(train_state['params']) / 2**20:.1f} MiB + "
        f"optimizer {bytes_per_device(train_state['opt_state']) / 2**20:.1f} MiB\n"
        f"mesh: {parallel.describe(mesh)}; {jax.process_count()} host(s), "
        f"{jax.device_count()} devices ({jax.devices()[0].device_kind})"
        f"{'; host malloc keeps freed memory (moejax/hostmem.py)' if hostmem.kept else ''}\n"
        f"global batch: {config.data.batch_size} x {seq_len} = {tokens_per_step} tokens; "
        f"{flops_per_token / 1e6:.1f} MFLOP per token")
    for line in state.undivided(setup):
        writer.print(f"not split (the mesh axis does not divide it): {line}")
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    token_sharding = parallel.token_sharding(mesh)
    shape = (config.data.batch_size, seq_len + 1)
    step_fn, eval_fn = state.train_step_fn(setup), state.eval_step_fn(setup)

    def evaluate(step):
        params = train_state["params"]
        losses = [eval_fn(params, global_batch(eval_data, i, token_sharding, shape))
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
            batch = global_batch(train_data, step - 1, token_sharding, shape)
            train_state, metrics = step_fn(train_state, batch, jnp.int32(step - 1))
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
                ckpt.save(step, train_state, {"step": step, "tokens_seen": step * tokens_per_step},
                          eval_loss)
            if stop:
                writer.print(f"preempted: saved step {step} in {workdir}; run the same "
                             "command again to resume")
                break
    return history


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
