"""Recorded routing to train on (data.format=replay): token sequences with the experts that
chose them, so training routes as inference did (docs/architecture.md, "Routing parity and
replay").

Each non-blank line of the files data.path matches is {"tokens": [int, ...], "routing":
[[[int] * top_k] * MoE layers] * n, "loss_mask": [0 | 1, ...] (optional; default all 1)}:
`routing` holds the experts of the first n tokens, n = len(tokens) or len(tokens) - 1 (as
`generate --routing_out FILE.jsonl` writes it: the last token is never fed, so it has none;
vLLM's routed_experts has the same layout). Sequences are packed whole, like chat
conversations (chat.pack): rows [n, 3 + layers x top_k, seq_len + 1] whose rows 3.. are each
token's recorded experts, -1 where a token has no record (its layer then routes it itself).
The train step replays them (state.loss_fn) and logs moe/routing_mismatch, the share of the
recorded assignments the routers would not have chosen.
"""

import json

import numpy as np

from moejax.config_lib import ConfigError
from moejax.data import chat, text
from moejax.model.transformer import moe_layer_ids

FORM = ('one JSON object a line, {"tokens": [int, ...], "routing": [[[int] * top_k] * MoE '
        'layers] * len(tokens) (or len(tokens) - 1), "loss_mask": [0 | 1, ...] (optional)}')


def record(line: str, layers: int, k: int, experts: int, vocab: int):
    """(tokens [T], loss_mask [T], routing [n, layers * k]) of one line, or ValueError."""
    r = json.loads(line)
    tokens = np.asarray(r["tokens"])
    routing = np.asarray(r["routing"])
    mask = np.asarray(r.get("loss_mask", np.ones(len(tokens), int)))
    if tokens.ndim != 1 or not len(tokens) or tokens.dtype.kind != "i":
        raise ValueError("tokens: a non-empty list of ints")
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise ValueError(f"tokens: ids in 0..{vocab - 1} (the vocabulary)")
    if mask.shape != tokens.shape or not np.isin(mask, (0, 1)).all():
        raise ValueError(f"loss_mask: {len(tokens)} values, each 0 or 1")
    if (routing.ndim != 3 or routing.shape[1:] != (layers, k) or routing.dtype.kind != "i"
            or len(routing) not in (len(tokens), len(tokens) - 1)):
        raise ValueError(f"routing: shape {list(routing.shape)}; allowed: [{len(tokens)} or "
                         f"{len(tokens) - 1}, {layers} MoE layers, top_k={k}] ints")
    if len(routing) and (routing.min() < 0 or routing.max() >= experts):
        raise ValueError(f"routing: expert ids in 0..{experts - 1}")
    return tokens, mask, routing.reshape(len(routing), layers * k)


def rows(cfg, split: str, model) -> np.ndarray:
    """The split's packed rows [n, 3 + layers x top_k, seq_len + 1] int32 (cfg: the config's
    data group; model: its model group, which the records must fit)."""
    if not model.num_experts or model.routing == "experts":
        raise ConfigError(f"data.format='replay': allowed with model.num_experts > 0 and "
                          f"model.routing=tokens (recorded token choices), not "
                          f"num_experts={model.num_experts}, routing={model.routing!r}")
    layers, k = len(moe_layer_ids(model)), model.top_k
    records, i = [], 0
    for f in text.readable_files(cfg):
        with open(f, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    one = record(line, layers, k, model.num_experts, model.vocab_size)
                except (ValueError, TypeError, KeyError) as e:
                    raise ConfigError(f"data.path={cfg.path!r}: {f}:{n}: not a routing record "
                                      f"({e}); allowed: {FORM}") from None
                if text.is_eval_doc(str(i), cfg.eval_fraction) == (split == "eval"):
                    records.append(one)
                i += 1
    return chat.pack(chat.whole(records, cfg, split, "record"), cfg.seq_len, layers * k)
