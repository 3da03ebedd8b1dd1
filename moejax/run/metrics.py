"""TensorBoard scalars and images, metrics.jsonl, and the console progress line; what a log
step of the train loop shows (StepLog).

Only process 0 writes; on other processes every method is a no-op.
"""

import json
import os
import time

import jax
import numpy as np

# A short perceptual ramp (dark blue -> green -> yellow), interpolated per cell.
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
                 np.float32) / 255.0


def heatmap(values: np.ndarray, cell: int = 12) -> np.ndarray:
    """values: [layers, experts] in [0, max] -> CHW float image, one colored block per cell."""
    v = values / max(float(values.max()), 1e-9)
    pos = v * (len(_RAMP) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_RAMP) - 2)
    frac = (pos - lo)[..., None]
    rgb = _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac  # [L, E, 3]
    rgb = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
    return rgb.transpose(2, 0, 1)


class Writer:
    """Everything from `first_step` on is this launch's to log: rows a previous launch logged
    past the checkpoint this one resumed from (0 for a fresh start) are dropped, so each step
    appears once and its values are the ones the run's state went through."""

    def __init__(self, workdir: str, first_step: int):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        from tensorboardX import SummaryWriter

        os.makedirs(workdir, exist_ok=True)
        # purge_step has TensorBoard hide the earlier events from first_step on.
        self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=first_step)
        path = os.path.join(workdir, "metrics.jsonl")
        drop_rows_from(path, first_step)
        self.jsonl = open(path, "a")

    def scalars(self, step: int, values: dict):
        if not self.active:
            return
        for name, v in values.items():
            self.tb.add_scalar(name, float(v), step)
        self.jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}})
                         + "\n")
        self.jsonl.flush()

    def expert_load(self, step: int, layers: list[int], load: np.ndarray, dropped: np.ndarray):
        """load: [moe layers, E] fraction of assignments per expert; dropped: [moe layers]."""
        if not self.active or not layers:
            return
        values = {}
        for row, layer in enumerate(layers):
            values[f"moe/layer_{layer:02d}/dropped_frac"] = dropped[row]
            for e, v in enumerate(load[row]):
                values[f"moe/layer_{layer:02d}/load/expert_{e:02d}"] = v
        self.scalars(step, values)
        self.tb.add_image("moe/expert_load", heatmap(load), step)

    def print(self, *args):
        if self.active:
            print(*args, flush=True)

    def close(self):
        if self.active:
            self.tb.close()
            self.jsonl.close()


def drop_rows_from(path: str, first_step: int) -> None:
    """Rewrite metrics.jsonl without the rows of steps >= first_step, and without a row torn
    by a kill mid-write. Atomic: a crash leaves the old file or the new one, never half."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [ln for ln in lines if ln.endswith("\n") and _step(ln) is not None
            and _step(ln) < first_step]
    if len(kept) == len(lines):
        return
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def _step(line: str) -> int | None:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


class Progress:
    """Tokens/s, step time and ETA over the steps since the last report. Counting starts at
    start(step), after the first step, which compiles: its time says nothing about the rate."""

    def __init__(self, total_steps: int, tokens_per_step: int):
        self.total, self.tokens_per_step = total_steps, tokens_per_step
        self.last_step, self.last_time = None, None

    def start(self, step: int):
        self.last_step, self.last_time = step, time.perf_counter()

    def tick(self, step: int) -> dict | None:
        """None when no step has finished since start(): nothing to measure yet."""
        if self.last_step is None or step <= self.last_step:
            return None
        now = time.perf_counter()
        steps = step - self.last_step
        step_s = (now - self.last_time) / steps
        self.last_step, self.last_time = step, now
        return {"perf/step_ms": 1e3 * step_s, "perf/tokens_per_s": self.tokens_per_step / step_s,
                "eta_s": step_s * (self.total - step)}


def format_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class CollapseAlarm:
    """Router collapse: warn when an expert's share of assignments stays below `threshold`
    times the uniform share 1/E at `patience` consecutive checks. Warns once per expert until
    it recovers."""

    def __init__(self, layers: list[int], num_experts: int, threshold: float, patience: int):
        self.layers, self.threshold, self.patience = layers, threshold / num_experts, patience
        self.low = np.zeros((len(layers), num_experts), int)

    def update(self, step: int, load: np.ndarray) -> list[str]:
        """load: [moe layers, E] fractions of the assignments. Returns the warnings to print."""
        self.low = np.where(load < self.threshold, self.low + 1, 0)
        return [f"warning: step {step}: router collapse? layer {self.layers[row]} expert {e} "
                f"got {load[row, e]:.1%} of assignments (uniform {1 / load.shape[1]:.1%}) at "
                f"{self.patience} checks in a row"
                for row, e in zip(*np.nonzero(self.low == self.patience), strict=True)]


class Imbalance:
    """The imbalance tax of a step, from its expert load ([MoE layers, E] assignments per
    micro-batch, before dropping, summed over the data-parallel replicas) and dropped
    fractions: the assignments of each layer's busiest and mean expert-parallel rank (rank r
    holds experts r*E/ep .. (r+1)*E/ep - 1), the assignments dropped, and the time the
    imbalance costs. Dropless paths wait for the busiest rank: of
    the routed experts' share of the step's FLOPs (`expert_share`), a layer spends the part
    1 - mean/max waiting, if time follows FLOPs. The capacity path's buffers have a fixed size
    whatever the balance: there the imbalance costs dropped tokens, not time (tax 0)."""

    def __init__(self, ep: int, micro_batches: int, expert_share: float, dropless: bool):
        self.ep, self.micro, self.share, self.dropless = ep, micro_batches, expert_share, dropless

    def __call__(self, load: np.ndarray, dropped: np.ndarray, step_ms: float | None) -> dict:
        load = np.asarray(load, np.float64) * self.micro  # the step's, not a micro-batch's
        layers, experts = load.shape
        ranks = load.reshape(layers, self.ep, experts // self.ep).sum(-1)
        busiest, mean = ranks.max(-1), ranks.mean(-1)
        waiting = float(np.mean(1 - mean / np.maximum(busiest, 1e-9))) if self.dropless else 0.0
        out = {"moe/ep_rank_max_tokens": float(busiest.mean()),
               "moe/ep_rank_mean_tokens": float(mean.mean()),
               "moe/ep_imbalance": float(np.mean(busiest / np.maximum(mean, 1e-9))),
               "moe/dropped_assignments": float((np.asarray(dropped) * load.sum(-1)).sum())}
        if step_ms is not None:
            out["perf/imbalance_tax_ms"] = step_ms * self.share * waiting
        return out


class StepLog:
    """What a log step shows, from the step's metrics (fetched from the devices here): losses,
    learning rate and gradient norm; tokens/s, step time, data wait and MFU since the last log
    step; each MoE layer's expert load and dropped fraction, and the collapse alarm; a
    mixture's realised shares. To TensorBoard and metrics.jsonl, and one console line."""

    def __init__(self, writer: Writer, tc, moe_layers: list[int], num_experts: int,
                 tokens_per_step: int, flops_per_token: float, peak: float | None,
                 shares=lambda step: {}, imbalance: "Imbalance | None" = None):
        self.writer, self.steps, self.moe_layers = writer, tc.steps, moe_layers
        self.imbalance = imbalance
        self.flops_per_token, self.peak, self.shares = flops_per_token, peak, shares
        self.progress = Progress(tc.steps, tokens_per_step)
        self.alarm = (CollapseAlarm(moe_layers, num_experts, tc.collapse_threshold,
                                    tc.collapse_checks)
                      if moe_layers and tc.collapse_threshold > 0 else None)

    def start(self, step: int):
        """Rates count from here: after `step`, whose call compiled the step."""
        self.progress.start(step)

    def __call__(self, step: int, metrics: dict, data_wait_ms: float):
        m = jax.device_get(metrics)
        perf = self.progress.tick(step)  # None at the first step: nothing timed yet
        values = {"train/loss": m["loss"], "train/ce_loss": m["ce_loss"], "opt/lr": m["lr"],
                  "opt/grad_norm": m["grad_norm"],
                  # the targets the loss averages over, of all: padding, prompts and each
                  # document's first token are not scored
                  "data/scored_frac": m["scored_frac"],
                  # the most runs (documents, padding) a row of the batch holds
                  "data/max_row_runs": m["max_row_runs"]}
        if perf:
            values.update({"perf/tokens_per_s": perf["perf/tokens_per_s"],
                           "perf/step_ms": perf["perf/step_ms"],
                           "perf/data_wait_ms": data_wait_ms})  # > 0: input-bound
            if self.peak:
                achieved = perf["perf/tokens_per_s"] * self.flops_per_token / jax.device_count()
                values["perf/mfu"] = achieved / self.peak
        values.update(self.shares(step))
        if "mtp_loss" in m:
            values["train/mtp_loss"] = m["mtp_loss"]
        clip = ""
        if "max_logit" in m:  # train.qk_clip > 0: the step's largest attention logit
            values["attn/max_logit"] = m["max_logit"]
            values["attn/qk_clipped_heads"] = m["qk_clipped_heads"]
            clip = f" max_logit {m['max_logit']:.1f} (clipped {int(m['qk_clipped_heads'])})"
        if self.moe_layers:
            values["train/balance_loss"] = m["balance_loss"]
            values["train/z_loss"] = m["z_loss"]
            load = m["expert_load"] / m["expert_load"].sum(-1, keepdims=True)
            self.writer.expert_load(step, self.moe_layers, load, m["dropped_frac"])
            if "routing_mismatch" in m:  # training on recorded routing (replay)
                values["moe/routing_mismatch"] = m["routing_mismatch"]
            if self.imbalance:
                values.update(self.imbalance(m["expert_load"], m["dropped_frac"],
                                             perf["perf/step_ms"] if perf else None))
            for warning in self.alarm.update(step, load) if self.alarm else []:
                self.writer.print(warning)
        self.writer.scalars(step, values)
        self.writer.print(f"step {step}/{self.steps} loss {m['loss']:.4f}{clip}" + (
            f" tok/s {perf['perf/tokens_per_s']:,.0f} step {perf['perf/step_ms']:.0f} ms "
            f"(data wait {data_wait_ms:.0f} ms) ETA {format_eta(perf['eta_s'])}" if perf
            else ""))
