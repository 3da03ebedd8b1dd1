"""A run's logged expert load, as `plan --target --expert_load WORKDIR` prices it
(plan/predict.py): the newest `moe/layer_*/load/expert_*` row of its metrics.jsonl, the
busiest expert-parallel rank's share of it, and what a capacity path drops at it."""

import json
import os
import re

import numpy as np

from moejax.config_ranges import ConfigError
from moejax.run.metrics import Imbalance


def read_load(path: str, num_experts: int) -> tuple[int, np.ndarray]:
    """The newest expert load a run logged (its metrics.jsonl, or the workdir holding it):
    (the step, [MoE layers, E] each layer's fractions of its assignments). A one-line
    ConfigError naming --expert_load when there is none or its E is not the config's."""
    file = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    key = re.compile(r"moe/layer_(\d+)/load/expert_(\d+)$")
    lines = []
    if os.path.isfile(file):
        with open(file) as f:
            lines = [line for line in f if "/load/expert_" in line]
    # Only the newest row is parsed: a long run logs thousands of them, each of L x E values.
    row = next((r for line in reversed(lines) if (r := _json_or_none(line))), {})
    step = row.get("step")
    found = {tuple(map(int, m.groups())): v for k, v in row.items() if (m := key.match(k))}
    if not found:
        raise ConfigError(f"--expert_load={path!r}: no expert load logged there; allowed: a "
                          "run's workdir or its metrics.jsonl (train logs moe/layer_*/load)")
    layers = sorted({layer for layer, _ in found})
    if (experts := len(found) // len(layers)) != num_experts:
        raise ConfigError(f"--expert_load={path!r}: {experts} experts logged; allowed: a run "
                          f"with the config's model.num_experts={num_experts}")
    return step, np.array([[found[layer, e] for e in range(experts)] for layer in layers])


def _json_or_none(line: str) -> dict | None:
    try:
        return json.loads(line)
    except ValueError:  # a row torn by a kill mid-write
        return None


def rank_imbalance(load: np.ndarray, expert: int) -> float:
    """The busiest expert-parallel rank's assignments over the mean rank's, averaged over the
    MoE layers (each waits for its own busiest): the trainer's moe/ep_imbalance on `expert`
    ranks."""
    return Imbalance(expert, 1, 0.0, True)(load, np.zeros(len(load)), None)["moe/ep_imbalance"]


def dropped_at_least(load: np.ndarray, capacity_factor: float) -> float:
    """The assignments a capacity path drops at this load, at the least: each expert's share
    past cf / E of the layer's, averaged over layers (a capacity group's own excess over its
    average adds more)."""
    return float(np.mean(np.maximum(load - capacity_factor / load.shape[1], 0).sum(-1)))
