"""Train an MoE (or dense) language model.

  python -m moejax.train --config configs/tiny.py --workdir runs/tiny [--config.a.b=value]

Order of work: check the config, workdir, tokenizer, data and any checkpoint's shapes (nothing
compiled yet) -> model and optimizer (sharded) -> resume from the newest intact checkpoint in
workdir, if any, else start from a dense run's (train.init_from: sparse upcycling) -> loop
(step, log, eval, checkpoint; a thread reads the next batches meanwhile: moejax/prefetch.py).
See docs/reliability.md for what happens on SIGTERM, damaged checkpoints, non-finite steps,
Ctrl-C and a second run on the same workdir.
"""

import contextlib
import functools
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from moejax import cli, config_lib, data, hostmem, parallel, state, upcycle, workdir as workdir_lib
from moejax.checkpoint import Checkpoints
from moejax.flops import device_peak_flops, train_flops_per_token
from moejax.metrics import CollapseAlarm, Progress, Writer, format_eta
from moejax.mixture import line as mixture_line, scalars as mixture_scalars
from moejax.model import moe_layer_ids
from moejax.params import bytes_per_device, param_counts, precision_line
from moejax.prefetch import Prefetcher
from moejax.stream import StreamBatches

PREFETCH = 2  # train batches built ahead, while the steps before them run; 0: in the loop


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
    """Yields `stop(step)`: None, or why to stop ("preempted": SIGTERM, the usual preemption
    notice; "interrupted": Ctrl-C), at the same step on every process once the signal has
    reached any of them. A second Ctrl-C stops at once, without saving."""
    received = []  # the signals that arrived, in order

    def on_signal(signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in received:
            raise KeyboardInterrupt
        received.append(signum)

    def stop(step):
        if jax.process_count() > 1:
            return "preempted" if multihost_utils.reached_preemption_sync_point(step) else None
        if received:
            return "interrupted" if received[0] == signal.SIGINT else "preempted"
        return None

    if jax.process_count() > 1:
        # jax.distributed catches SIGTERM itself (its handler is not Python's to replace) and
        # has the processes agree on a step; Ctrl-C is handed to it as a SIGTERM.
        handlers = {signal.SIGINT: lambda *_: os.kill(os.getpid(), signal.SIGTERM)}
    else:
        handlers = {signal.SIGTERM: on_signal, signal.SIGINT: on_signal}
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train_and_evaluate(config, workdir: str) -> dict:
    """Train to config.train.steps, or stop early with a checkpoint at train.stop_at, on
    SIGTERM or on Ctrl-C; returns the losses seen and the steps skipped as non-finite."""
    # Every check that can fail on a bad config or input runs before anything compiles.
    config_lib.validate(config, jax.device_count())
    config_lib.check_workdir(workdir)
    with workdir_lib.lock(workdir):  # one run per workdir; released however this one ends
        return train(config, workdir)


def train(config, workdir: str) -> dict:
    """train_and_evaluate, once the config is valid and this run holds the workdir."""
    tc, mc = config.train, config.model
    mesh = parallel.make_mesh(parallel.mesh_sizes(config.mesh, jax.device_count()))
    tokenizer = data.make_tokenizer(config.data.tokenizer)
    data.check_vocab(mc.vocab_size, tokenizer)
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

    restored = ckpt.restore_latest(setup.abstract, tc.restart_if_damaged)
    start_step = restored[1]["step"] if restored else 0
    for key, value in (("train.steps", tc.steps), ("train.stop_at", tc.stop_at)):
        if restored and value and value <= start_step:  # else it would exit 0, having done nothing
            raise config_lib.ConfigError(
                f"{key}={value}: the checkpoint is at step {start_step}; nothing to train; "
                f"allowed: > {start_step}" + (" or 0 (never)" if key == "train.stop_at" else ""))
    # A fresh start evaluates step 0 again; a resumed one logs from the step after its own.
    writer = Writer(workdir, start_step + 1 if restored else 0)
    streamed = isinstance(train_data, StreamBatches)  # its position is saved with the state
    if restored:
        train_state = restored[0]
        writer.print(f"resumed from {workdir} at step {start_step}")
        if streamed:
            train_data.restore(restored[1].get("stream"), start_step)
        for line in workdir_lib.config_changes(workdir, config):
            writer.print(line)
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
        f"{precision_line(config, train_state)}\n"
        f"mesh: {parallel.describe(mesh)}; {jax.process_count()} host(s), "
        f"{jax.device_count()} devices ({jax.devices()[0].device_kind})"
        f"{'; host malloc keeps freed memory (moejax/hostmem.py)' if hostmem.kept else ''}\n"
        f"global batch: {config.data.batch_size} x {seq_len} = {tokens_per_step} tokens; "
        f"{flops_per_token / 1e6:.1f} MFLOP per token")
    if (mix := mixture_line(train_data, tc.steps)) is not None:
        writer.print(mix)
    for line in state.undivided(setup):
        writer.print(f"not split (the mesh axis does not divide it): {line}")
    if jax.process_index() == 0:
        workdir_lib.save_config(workdir, config, start_step)

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
    progress = Progress(tc.steps, tokens_per_step)
    last = min(tc.steps, tc.stop_at or tc.steps)
    pending = {}  # step -> (loss, skipped) still on device
    in_a_row = 0  # non-finite steps
    alarm = (CollapseAlarm(moe_layers, mc.num_experts, tc.collapse_threshold, tc.collapse_checks)
             if moe_layers and tc.collapse_threshold > 0 else None)
    if start_step == 0:
        evaluate(0)
    # Step s takes batch s - 1; a thread reads and assembles the next ones while it runs.
    make_batch = functools.partial(global_batch, train_data, sharding=token_sharding,
                                   shape=shape)
    with (preemption_notice() as preempted, contextlib.closing(ckpt),
          contextlib.closing(writer),
          Prefetcher(make_batch, start_step, last, PREFETCH) as batches):
        for step in range(start_step + 1, last + 1):
            batch = batches.get(step - 1)
            started = time.perf_counter()
            train_state, metrics = step_fn(train_state, batch, jnp.int32(step - 1))
            if step == start_step + 1:
                # The first call compiles before it returns; rates start once its step ran.
                writer.print(f"compiled train step in {time.perf_counter() - started:.1f} s")
                jax.block_until_ready(metrics)
                progress.start(step)
                batches.waited_ms()  # so the data wait counts over the same steps as the rates
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
                perf = progress.tick(step)  # None at the first step: nothing timed yet
                values = {"train/loss": m["loss"], "train/ce_loss": m["ce_loss"],
                          "opt/lr": m["lr"], "opt/grad_norm": m["grad_norm"]}
                if perf:
                    values["perf/tokens_per_s"] = perf["perf/tokens_per_s"]
                    values["perf/step_ms"] = perf["perf/step_ms"]
                    values["perf/data_wait_ms"] = batches.waited_ms()  # > 0: input-bound
                values.update(mixture_scalars(train_data, step))  # the realised proportions
                if perf and peak:
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
                writer.print(f"step {step}/{tc.steps} loss {m['loss']:.4f}" + (
                    f" tok/s {perf['perf/tokens_per_s']:,.0f} step {perf['perf/step_ms']:.0f} "
                    f"ms (data wait {values['perf/data_wait_ms']:.0f} ms) ETA "
                    f"{format_eta(perf['eta_s'])}" if perf else ""))

            eval_loss = evaluate(step) if step % tc.eval_every == 0 or step == tc.steps else None
            if save:
                ckpt.save(step, train_state, {"step": step, "tokens_seen": step * tokens_per_step},
                          eval_loss, train_data.position(step) if streamed else None)
            if stop:
                writer.print(f"{stop}: saved step {step} in {workdir}; run the same "
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
    except KeyboardInterrupt:  # Ctrl-C while starting, or a second one: nothing saved
        sys.exit("interrupted: no checkpoint saved by this launch after its last one")


if __name__ == "__main__":
    cli.run(main)
