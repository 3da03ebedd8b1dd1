"""The training-health sentinel: what a step reports about each expert and each tensor, and
what the host makes of it (docs/reliability.md, "Training health").

On the device (inside the train step, a few reductions per tensor):
- `finite_flags`: per tensor whether it is finite; an expert tensor's flag per layer and
  expert, so a NaN is named down to the expert it is in.
- `expert_norms`: per MoE weight the norm of each expert's slice, [layers, E] ([E] for an
  unstacked module): of the gradients (zero: no token reached the expert, or its gradient is
  cut) and of the update (zero with a learning rate: the optimizer leaves the expert alone).
On the host:
- `first_nonfinite`: the first non-finite tensor of a skipped step, parameters before the
  loss before gradients before updates: 'stacks.0.blocks.0.ffn.w_out layer 1 expert 3
  (parameter)'.
- `FrozenExperts`: a warning when an expert has not moved for `train.frozen_expert_steps` steps.
- `Watchdog`: a step that takes `train.watchdog_factor` times the median step says which step
  and what the host waits for; one waiting `train.watchdog_timeout_s` ends the run non-zero.
"""

import os
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.run.checkpoint import path_name, variables
from moejax.run.manifest import expert_dims

KINDS = ("parameter", "loss", "gradient", "update", "state")


def _reduce(v, fn):
    """fn(x, axes) over every dim but the stacked layers' and the experts' (an expert tensor:
    the dims its manifest checksums keep), or over all (any other)."""
    x = v.get_value() if isinstance(v, nnx.Variable) else v
    keep = expert_dims(v)
    return fn(x, tuple(range(keep, x.ndim)) if keep else None)


def finite_flags(tree) -> dict:
    """{name: bool array}: scalar per tensor, [layers..., E] per expert tensor."""
    return {path_name(p): _reduce(v, lambda x, axes: jnp.isfinite(x).all(axes))
            for p, v in variables(tree)}


def expert_norms(tree) -> dict:
    """{name: [layers..., E] float32}: the norm of each expert's slice of each expert tensor."""
    return {path_name(p): _reduce(v, lambda x, axes: jnp.sqrt(
                jnp.sum(jnp.square(x.astype(jnp.float32)), axes)))
            for p, v in variables(tree) if expert_dims(v)}


def first_nonfinite(flags: dict) -> str | None:
    """flags: {kind: finite_flags(...)} fetched from the device, kinds as KINDS ("loss":
    {"loss": flag}). The first tensor, in KINDS' order, with a non-finite value, named down to
    layer and expert."""
    for kind in KINDS:
        for name, ok in flags.get(kind, {}).items():
            ok = np.asarray(ok)
            if ok.all():
                continue
            if kind == "loss":  # the parameters were finite: the batch or the forward pass
                return "the loss, with every parameter finite"
            where = ""
            if ok.ndim:  # [layers..., E]: the first bad (layer, expert)
                *layers, expert = np.argwhere(~ok)[0]
                where = "".join(f" layer {i}" for i in layers) + f" expert {expert}"
            return f"{name}{where} ({kind})"
    return None


class FrozenExperts:
    """Per expert, the steps in a row in which it did not move: its gradient was zero (no token
    reached it, or the gradient is cut), or its update was zero with a learning rate above 0
    (the optimizer leaves it). At `patience` steps: one warning per expert until it moves."""

    def __init__(self, patience: int):
        self.patience, self.still = patience, {}

    def update(self, step: int, grad_norms: dict, update_norms: dict, lr: float) -> list[str]:
        if not self.patience:
            return []
        out = []
        for name, g in grad_norms.items():
            g, u = np.asarray(g), np.asarray(update_norms[name])
            frozen = (g == 0) | ((u == 0) & (lr > 0))
            count = np.where(frozen, self.still.get(name, 0) + 1, 0)
            self.still[name] = count
            for *layers, e in np.argwhere(count == self.patience):
                index = (*layers, e)
                why = ("its gradient was 0 (no token reached it, or its gradient is cut)"
                       if g[index] == 0 else "its update was 0 (the optimizer leaves it)")
                where = "".join(f" layer {i}" for i in layers)
                out.append(f"warning: step {step}: expert {e} of {name}{where} has not moved "
                           f"for {self.patience} steps: {why}")
        return out


class Watchdog:
    """A thread that watches the train loop's steps. `beat(step)` ends a step; `waiting(what)`
    says what the host is about to wait for; `paused()` covers work that is not a step (eval,
    saving). Once `warmup` steps have been timed, a step running `factor` times their median
    prints which step and what it waits for (once per step); one running `timeout_s` ends the
    process with exit status 3: a hang must not hold a pod silently."""

    def __init__(self, factor: float, timeout_s: float, print_fn=print, warmup: int = 3,
                 poll_s: float = 0.05, exit_fn=None):
        self.factor, self.timeout_s, self.print, self.warmup = factor, timeout_s, print_fn, warmup
        self.poll_s, self.exit = poll_s, exit_fn or (lambda code: os._exit(code))
        self.times, self.step, self.what = [], None, "the next step"
        self.started = None  # None: not in a step
        self.warned = None
        self.stop = threading.Event()
        self.thread = None
        if factor > 0 or timeout_s > 0:
            self.thread = threading.Thread(target=self.watch, daemon=True, name="watchdog")
            self.thread.start()

    def begin(self, step: int):
        self.step, self.started, self.what = step, time.monotonic(), "the next step"

    def waiting(self, what: str):
        self.what = what

    def beat(self, step: int):
        if self.started is not None:
            self.times = (self.times + [time.monotonic() - self.started])[-50:]
        self.started = None

    def paused(self):
        self.started = None

    def median(self) -> float | None:
        return float(np.median(self.times)) if len(self.times) >= self.warmup else None

    def check(self, now: float) -> None:
        started, step = self.started, self.step
        if started is None:
            return
        took, median = now - started, self.median()
        if self.timeout_s > 0 and took >= self.timeout_s:
            self.print(f"error: watchdog: step {step} has waited {took:.0f} s for {self.what} "
                       f"(train.watchdog_timeout_s={self.timeout_s:g}); ending the run; the "
                       "newest complete checkpoint is intact: run the same command again to "
                       "resume")
            sys.stdout.flush()
            self.exit(3)
            self.started = None
        elif (self.factor > 0 and median is not None and took >= self.factor * median
              and self.warned != step):
            self.warned = step
            self.print(f"warning: watchdog: step {step} has taken {took:.1f} s, "
                       f"{took / median:.0f}x the median step ({median * 1e3:.0f} ms): waiting "
                       f"for {self.what}")

    def watch(self):
        while not self.stop.wait(self.poll_s):
            self.check(time.monotonic())

    def close(self):
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
