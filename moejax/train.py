"""Train an MoE (or dense) language model.

  python -m moejax.train --config configs/tiny.py --workdir runs/tiny [--config.a.b=value]

Order of work: check the config, workdir, tokenizer, data and any checkpoint's shapes (nothing
compiled yet) -> model and optimizer (sharded) -> resume from the newest intact checkpoint in
workdir, if any, else start from a dense run's (train.init_from: sparse upcycling) -> loop
(step, log, eval, checkpoint; grain reads the next batches meanwhile: moejax/data/loader.py).
See docs/reliability.md for what happens on SIGTERM, damaged checkpoints, non-finite steps,
Ctrl-C and a second run on the same workdir.
"""

import contextlib
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import cli, config_lib, parallel
from moejax.data import mixture, text
from moejax.data.batches import make_batches
from moejax.data.loader import Loader, first_batches
from moejax.model import kernels
from moejax.model.transformer import moe_layer_ids
from moejax.run import health, hostmem, state, upcycle, workdir as workdir_lib
from moejax.run.checkpoint import Checkpoints
from moejax.run.flops import device_peak_flops, train_flops_per_token
from moejax.run.metrics import Imbalance, StepLog, Writer
from moejax.run.params import bytes_per_device, param_counts, precision_line


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
    tc = config.train
    mesh = parallel.make_mesh(parallel.mesh_sizes(config.mesh, jax.device_count()))
    train_data, eval_data = open_data(config)
    tokens, shape = parallel.token_sharding(mesh), (config.data.batch_size,
                                                    config.data.seq_len + 1)
    held_out = first_batches(eval_data, tokens, shape, tc.eval_batches)  # a stream's: checked
    setup = state.setup(config, mesh)
    ckpt = Checkpoints(workdir, tc.keep_checkpoints, tc.keep_best)
    ckpt.check_shapes(setup.abstract["params"])
    if tc.init_from and ckpt.latest_step() is None:
        upcycle.check(tc.init_from, setup.abstract["params"])
    restored = ckpt.restore_latest(setup.abstract, tc.restart_if_damaged)
    start_step, meta = (restored[1]["step"], restored[1]) if restored else (0, {})
    check_steps_left(tc, start_step if restored else None)
    # A fresh start evaluates step 0 again; a resumed one logs from the step after its own.
    writer = Writer(workdir, start_step + 1 if restored else 0)
    for note in (state.offload_note(setup), kernels.unfused_note(config, setup.platform,
                                                                   mesh.shape["context"])):
        if note:
            writer.print(note)
    if restored:
        train_state = restored[0]
        writer.print(f"resumed from {workdir} at step {start_step}")
        setup, groups_line = state.keep_groups(setup, meta.get("num_groups"))
        for line in [*workdir_lib.config_changes(workdir, config), groups_line]:
            if line:
                writer.print(line)
    else:
        train_state = initial_state(setup, tc.init_from, writer)
    log = report_start(config, setup, train_state, train_data, writer)
    if jax.process_index() == 0:
        workdir_lib.save_config(workdir, config, start_step)

    step_fn, eval_fn = state.train_step_fn(setup), state.eval_step_fn(setup)
    groups = state.capacity_groups(setup.config, mesh)  # recorded: a resume keeps them
    history = {"train_loss": {}, "eval_loss": {}, "skipped_steps": []}

    def evaluate(step):
        sums = np.sum(jax.device_get([eval_fn(train_state["params"], b) for b in held_out]), 0)
        loss = float(sums[0] / max(sums[1], 1.0))
        writer.scalars(step, {"eval/loss": loss, "eval/ppl": float(np.exp(loss))})
        writer.print(f"step {step}: eval loss {loss:.4f}, ppl {np.exp(loss):.2f}")
        history["eval_loss"][step] = loss
        return loss

    if start_step == 0:
        evaluate(0)
    last, pending = min(tc.steps, tc.stop_at or tc.steps), {}  # pending: metrics on device
    sentinel = Sentinel(tc, mesh, ckpt, workdir, writer, history)
    loader = Loader(train_data, tokens, shape, start_step, meta.get("data"))
    watchdog = health.Watchdog(tc.watchdog_factor, tc.watchdog_timeout_s, writer.print)
    with (preemption_notice() as preempted, contextlib.closing(ckpt),
          contextlib.closing(writer), contextlib.closing(loader), contextlib.closing(watchdog)):
        for step in range(start_step + 1, last + 1):
            if step > start_step + 1:  # the first step compiles: it is not timed
                watchdog.begin(step)
            watchdog.waiting(f"batch {step - 1} from the data loader")
            batch = next(loader)  # global batch step - 1, read while the steps before it ran
            started = time.perf_counter()
            watchdog.waiting(f"the devices to take step {step}")
            train_state, metrics = step_fn(train_state, batch, jnp.int32(step - 1))
            if step == start_step + 1:
                # The first call compiles before it returns; rates start once its step ran.
                writer.print(f"compiled train step in {time.perf_counter() - started:.1f} s")
                jax.block_until_ready(metrics)
                log.start(step)
                loader.waited_ms()  # so the data wait counts over the same steps as the rates
            pending[step] = metrics
            logging = step % tc.log_every == 0 or step == last
            stop = preempted(step)
            save = step % tc.ckpt_every == 0 or step == last or stop
            # Read every finished step; this one too when a log or a save waits for it
            # anyway. Otherwise the host stays one step ahead and the device never waits.
            for done in sorted(pending)[:None if logging or save else -1]:
                watchdog.waiting(f"the devices to finish step {done}")
                sentinel(done, pending.pop(done))
            watchdog.beat(step)
            if logging:
                log(step, metrics, loader.waited_ms())
            eval_loss = evaluate(step) if step % tc.eval_every == 0 or step == tc.steps else None
            if save:
                sentinel.check_saveable(step, train_state)
                ckpt.save(step, train_state, {"step": step, "tokens_seen": step * shape[0]
                                              * config.data.seq_len, "num_groups": groups},
                          eval_loss, loader.state())
            if stop:
                writer.print(f"{stop}: saved step {step} in {workdir}; run the same "
                             "command again to resume")
                break
        sentinel.finish()
    return history


def open_data(config):
    """The tokenizer's checks, model.vocab_size set from it if 0, and both splits' batches."""
    tokenizer = text.make_tokenizer(config.data.tokenizer)
    text.check_vocab(config.model.vocab_size, tokenizer)
    with config.unlocked():
        config.model.vocab_size = config.model.vocab_size or tokenizer.vocab_size
    return tuple(make_batches(config.data, tokenizer, split, config.seed, config.model)
                 for split in ("train", "eval"))


def check_steps_left(tc, checkpoint_step: int | None):
    """A resumed run with nothing left to train would exit 0, having done nothing."""
    for key, value in (("train.steps", tc.steps), ("train.stop_at", tc.stop_at)):
        if checkpoint_step is not None and value and value <= checkpoint_step:
            raise config_lib.ConfigError(
                f"{key}={value}: the checkpoint is at step {checkpoint_step}; nothing to train; "
                f"allowed: > {checkpoint_step}" + (" or 0 (never)" if key == "train.stop_at"
                                                   else ""))


def initial_state(setup, init_from: str, writer) -> dict:
    """A fresh state, its experts copied from a dense run's FFNs if train.init_from names one."""
    train_state = state.init(setup)
    if init_from:
        # A fresh optimizer state depends on the shapes only, so the init's one serves.
        params, dense_step = upcycle.load(init_from, train_state["params"], setup.mesh)
        train_state = {**train_state, "params": params}
        writer.print(f"upcycled from {init_from} step {dense_step}: experts copied from its "
                     "FFNs, router and optimizer fresh")
    return train_state


def report_start(config, setup, train_state, train_data, writer) -> StepLog:
    """Print what the run is (parameters total and active, memory per device, precision, mesh,
    global batch); returns what each log step will show, with the rates' denominators."""
    mc, seq_len, mesh = config.model, config.data.seq_len, setup.mesh
    counts = param_counts(setup.model, mc.top_k, mc.num_experts)
    tokens_per_step = config.data.batch_size * seq_len
    flops_per_token = train_flops_per_token(counts["active"], mc, seq_len)
    moe_layers = moe_layer_ids(mc, mtp=True)  # the rows of expert_load
    writer.print(
        f"model: {counts['total'] / 1e6:.2f}M params total, {counts['active'] / 1e6:.2f}M active "
        f"per token ({mc.num_experts} experts, top-{mc.top_k}, MoE layers {moe_layers}"
        f"{f'; layers {mc.num_layers}.. are the MTP modules' if mc.mtp_layers else ''})\n"
        f"memory per device: params {bytes_per_device(train_state['params']) / 2**20:.1f} MiB + "
        f"optimizer {bytes_per_device(train_state['opt_state']) / 2**20:.1f} MiB\n"
        f"{precision_line(config, train_state)}\n"
        f"mesh: {parallel.describe(mesh)}; {jax.process_count()} host(s), "
        f"{jax.device_count()} devices ({jax.devices()[0].device_kind})"
        f"{'; host malloc keeps freed memory (moejax/run/hostmem.py)' if hostmem.kept else ''}\n"
        f"global batch: {config.data.batch_size} x {seq_len} = {tokens_per_step} tokens; "
        f"{flops_per_token / 1e6:.1f} MFLOP per token")
    batch_size, mix = config.data.batch_size, train_data.mixture
    if (line := mixture.line(mix, batch_size, config.train.steps)) is not None:
        writer.print(line)
    for line in state.undivided(setup):
        writer.print(f"not split (the mesh axis does not divide it): {line}")
    peak = device_peak_flops(jax.devices()[0].device_kind, config.train.peak_tflops)
    imbalance = None
    if mc.num_experts:  # the routed experts' matmuls: 6 FLOPs per active weight
        expert_share = 6 * counts["expert"] * mc.top_k / mc.num_experts / flops_per_token
        imbalance = Imbalance(setup.mesh.shape["expert"], config.train.grad_accum,
                              expert_share, mc.dispatch != "capacity")
    return StepLog(writer, config.train, moe_layers, mc.num_experts, tokens_per_step,
                   flops_per_token, peak, lambda step: mixture.scalars(mix, batch_size, step),
                   imbalance)


class Sentinel:
    """Reads each finished step (run/health.py): its loss into the history; a skipped step
    (non-finite loss, gradients or update) reported with the first non-finite tensor, and
    `train.max_nonfinite_steps` of them in a row stop the run, as does a run that ends on one;
    experts that do not move warned about; and a state checked finite before it is saved, so
    the last good checkpoint the errors name is finite."""

    def __init__(self, tc, mesh, ckpt, workdir: str, writer, history: dict):
        self.limit, self.ckpt, self.workdir, self.writer = (tc.max_nonfinite_steps, ckpt,
                                                            workdir, writer)
        self.history, self.in_a_row, self.last, self.culprit = history, 0, 0, None
        self.frozen = health.FrozenExperts(tc.frozen_expert_steps)
        # Replicated, so every process reads the flags.
        # An offloaded optimizer state is read where XLA computes: on the device.
        self.finite_state = jax.jit(lambda s: health.finite_flags(parallel.on_device(s)),
                                    out_shardings=NamedSharding(mesh, P()))

    def __call__(self, step: int, metrics: dict):
        h = metrics["health"]
        loss, skipped, lr, grad_norms, update_norms = jax.device_get(
            (metrics["loss"], metrics["skipped"], metrics["lr"], h["expert_grad_norm"],
             h["expert_update_norm"]))
        self.history["train_loss"][step] = float(loss)
        self.in_a_row, self.last = self.in_a_row + 1 if skipped else 0, step
        if not skipped:
            for warning in self.frozen.update(step, grad_norms, update_norms, lr):
                self.writer.print(warning)
            return
        self.culprit = health.first_nonfinite(jax.device_get(h["finite"]))
        self.history["skipped_steps"].append(step)
        self.writer.print(f"step {step}: non-finite loss or gradients, skipped "
                          f"({self.in_a_row} in a row); first non-finite: {self.culprit}")
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"train.max_nonfinite_steps={self.limit}: steps {step - self.in_a_row + 1}.."
                f"{step} all had a non-finite loss or gradients (first non-finite: "
                f"{self.culprit}); {self.last_good()}")

    def check_saveable(self, step: int, train_state):
        bad = health.first_nonfinite({"state": jax.device_get(self.finite_state(train_state))})
        if bad is not None:
            raise NonFiniteError(f"step {step}: the state to be saved is not finite (first "
                                 f"non-finite: {bad}): not saved; {self.last_good()}")

    def finish(self):
        """A run whose last steps were skipped did not train to its end: it must not exit 0."""
        if self.in_a_row:
            raise NonFiniteError(
                f"the run ended on {self.in_a_row} skipped step(s) ({self.last - self.in_a_row + 1}"
                f"..{self.last}) with a non-finite loss or gradients (first non-finite: "
                f"{self.culprit}); {self.last_good()}")

    def last_good(self) -> str:
        good = self.ckpt.latest_step()
        return (f"the last good state is checkpoint {good} in {self.workdir}" if good is not None
                else "no checkpoint was saved")


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
