"""Plain NumPy references, written to be obviously right rather than fast."""

import numpy as np


def softmax(logits):
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def scores(logits, score):
    logits = np.asarray(logits, np.float64)
    return softmax(logits) if score == "softmax" else 1 / (1 + np.exp(-logits))


def route(logits, k, capacity, renormalize, score="softmax", bias=None):
    """One group. Priority: every token's 1st choice in token order, then every 2nd choice."""
    s = scores(logits, score)
    probs = s / s.sum(-1, keepdims=True)
    num_tokens, num_experts = probs.shape
    select = s if bias is None else s + bias
    expert_ids = np.argsort(-select, axis=-1, kind="stable")[:, :k]  # ties: lower id first
    gates = np.take_along_axis(s, expert_ids, -1)
    if renormalize:
        gates = gates / gates.sum(-1, keepdims=True)
    filled = np.zeros(num_experts, int)
    positions = np.zeros((num_tokens, k), int)
    for j in range(k):
        for t in range(num_tokens):
            positions[t, j] = filled[expert_ids[t, j]]
            filled[expert_ids[t, j]] += 1
    return probs, gates, expert_ids, positions, positions < capacity


ACTIVATIONS = {
    "swiglu": (lambda h: h / (1 + np.exp(-h)), True),
    "relu": (lambda h: np.maximum(h, 0), False),
    "gelu": (lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3))), False),
}


def expert_ffn(x, w_in, w_out, activation):
    """Gated: w_in = [w_gate | w_lin] along its columns."""
    act, gated = ACTIVATIONS[activation]
    if gated:
        w_gate, w_lin = np.split(w_in, 2, axis=1)
        return (act(x @ w_gate) * (x @ w_lin)) @ w_out
    return act(x @ w_in) @ w_out


def moe(x, router_w, w_in, w_out, *, k, capacity, renormalize, activation, num_groups,
        score="softmax", bias=None):
    """Run every expert on every token, then keep what the router chose and had room for.

    x: [N, d]. Groups are contiguous slices of N. Returns y [N, d], balance loss, z-loss.
    """
    x = np.asarray(x, np.float64)
    num_experts = router_w.shape[1]
    y = np.zeros_like(x)
    counts = np.zeros(num_experts)
    prob_sum = np.zeros(num_experts)
    lse_sq = []
    for g, xg in enumerate(np.split(x, num_groups)):
        logits = xg @ router_w
        probs, gates, ids, _, keep = route(logits, k, capacity, renormalize, score, bias)
        outs = [expert_ffn(xg, w_in[e], w_out[e], activation) for e in range(num_experts)]
        rows = slice(g * len(xg), (g + 1) * len(xg))
        for t in range(len(xg)):
            for j in range(k):
                if keep[t, j]:
                    y[rows][t] += gates[t, j] * outs[ids[t, j]][t]
        counts += np.bincount(ids.reshape(-1), minlength=num_experts)
        prob_sum += probs.sum(0)
        m = logits.max(-1)
        lse_sq.extend((m + np.log(np.exp(logits - m[:, None]).sum(-1))) ** 2)
    n = len(x)
    balance = num_experts * np.sum(counts / (n * k) * prob_sum / n)
    return y, balance, np.mean(lse_sq)


def expert_choice_moe(x, router_w, w_in, w_out, *, capacity, activation, num_groups,
                      score="softmax"):
    """Each expert takes the `capacity` highest-scoring tokens of each group (ties: lower
    token index) and adds score * its output to them. Returns y [N, d]."""
    x = np.asarray(x, np.float64)
    y = np.zeros_like(x)
    for g, xg in enumerate(np.split(x, num_groups)):
        s = scores(xg @ router_w, score)
        rows = slice(g * len(xg), (g + 1) * len(xg))
        for e in range(router_w.shape[1]):
            out = expert_ffn(xg, w_in[e], w_out[e], activation)
            for t in np.argsort(-s[:, e], kind="stable")[:capacity]:
                y[rows][t] += s[t, e] * out[t]
    return y
