"""Routers: pure functions on arrays, float32 inside.

Token choice (Switch, GShard, Mixtral, DeepSeek-V3) in `route`, expert choice in
`expert_choice`; `forced` takes the experts from outside (a recorded routing replayed, or
`balanced_ids` for benchmarks) and gates them with the router's own scores.
Conventions (docs/architecture.md repeats them):
- Scores are a softmax over experts, or independent sigmoids (DeepSeek-V3). `probs`, used by
  the balance loss and the statistics, are the scores normalized to sum 1 per token.
- `k` choices per token from `lax.top_k` of scores + bias (the bias of auxiliary-loss-free
  balancing steers selection only; gates are the unbiased scores); ties go to the lower id.
- Group limit (DeepSeek-V3, `group_limit`): the E experts form n_group equal groups of
  consecutive ids; only the experts of a token's topk_group best groups can be chosen.
- Gates: renormalized to sum 1 if asked, then times routed_scaling_factor (DeepSeek-V3: 2.5).
- Capacity is granted in priority order: every token's 1st choice (in token order), then every
  token's 2nd choice, and so on. An assignment past its expert's capacity is dropped.
- Balance loss `E * sum_e f_e * P_e`: f_e counts all k choices before dropping, divided by T*k,
  so a perfectly balanced router scores exactly 1 for any k.
- Padding (`real` False): no expert, no slot, no gate; expert id E (one past the last), so
  the dispatch paths leave it out; it counts in no statistic (moe/layer.py).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

SCORES = ("softmax", "sigmoid")


class Routing(NamedTuple):
    probs: jax.Array  # [T, E] float32 router scores normalized to sum 1 per token
    gates: jax.Array  # [T, k] float32 combine weights (renormalized, scaled if asked)
    expert_ids: jax.Array  # [T, k] int32
    positions: jax.Array  # [T, k] int32 slot in the expert's queue (may exceed capacity)
    keep: jax.Array  # [T, k] bool, False where the expert was already full
    tokens_per_expert: jax.Array  # [E] int32 assignments before dropping


def capacity(tokens_per_group: int, num_experts: int, k: int, capacity_factor: float,
             min_capacity: int = 1) -> int:
    """Slots per expert per group: ceil(capacity_factor * tokens_per_group * k / E)."""
    return max(min_capacity, math.ceil(capacity_factor * tokens_per_group * k / num_experts))


def jitter_noise(rng: jax.Array, shape, eps: float) -> jax.Array:
    """Multiplicative uniform noise in [1 - eps, 1 + eps] for the router input (train only)."""
    return jax.random.uniform(rng, shape, jnp.float32, 1.0 - eps, 1.0 + eps)


def expert_positions(expert_ids: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Queue position of each assignment at its expert, by a stable sort (cost flat in E).

    expert_ids: [T, k], E for padding (counted nowhere; its position is meaningless).
    Returns positions [T, k] and tokens_per_expert [E].
    """
    num_tokens, k = expert_ids.shape
    flat = expert_ids.T.reshape(-1)  # choice-major: all 1st choices come before any 2nd choice
    order = jnp.argsort(flat, stable=True)
    counts = jnp.bincount(flat, length=num_experts + 1).astype(jnp.int32)
    first_slot = jnp.cumsum(counts) - counts
    counts = counts[:num_experts]
    pos_sorted = jnp.arange(flat.size, dtype=jnp.int32) - first_slot[flat[order]]
    positions = jnp.zeros_like(flat).at[order].set(pos_sorted)
    return positions.reshape(k, num_tokens).T, counts


def scores(logits: jax.Array, score: str) -> jax.Array:
    logits = logits.astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1) if score == "softmax" else jax.nn.sigmoid(logits)


def group_limit(choice: jax.Array, n_group: int, topk_group: int) -> jax.Array:
    """DeepSeek-V3's group-limited selection, as transformers' DeepseekV3TopkRouter computes it.

    choice: [..., E] selection scores (scores + bias). The experts form n_group groups of
    E / n_group consecutive ids; a group ranks by the sum of its two best scores, and the
    scores outside the topk_group best groups become 0.0 (not -inf, as in transformers: a
    negative biased score in a kept group loses to them). Ties: the lower group id.
    """
    if n_group == 1:
        return choice
    grouped = choice.reshape(*choice.shape[:-1], n_group, -1)  # [..., n_group, E / n_group]
    group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [..., n_group]
    _, kept_ids = jax.lax.top_k(group_scores, topk_group)  # [..., topk_group]
    kept = jnp.any(kept_ids[..., None] == jnp.arange(n_group), axis=-2)  # [..., n_group]
    return jnp.where(kept[..., None], grouped, 0.0).reshape(choice.shape)


def select(s: jax.Array, k: int, bias: jax.Array | None = None, n_group: int = 1,
           topk_group: int = 1) -> jax.Array:
    """A token's own k experts: top_k of scores s [T, E] + bias under the group limit ->
    [T, k] int32, best first. `route` uses it; so does a forced layer to measure its mismatch."""
    choice = group_limit(s if bias is None else s + bias, n_group, topk_group)
    return jax.lax.top_k(choice, k)[1].astype(jnp.int32)


def route(logits: jax.Array, k: int, capacity: int, renormalize: bool, score: str = "softmax",
          bias: jax.Array | None = None, n_group: int = 1, topk_group: int = 1,
          routed_scaling_factor: float = 1.0, real: jax.Array | None = None) -> Routing:
    """Token choice. logits: [T, E] for one capacity group; bias: [E] for selection only;
    real: [T] bool, False for padding, or None (all real)."""
    expert_ids = select(scores(logits, score), k, bias, n_group, topk_group)
    return forced(logits, expert_ids, capacity, renormalize, score, routed_scaling_factor, real)


def forced(logits: jax.Array, expert_ids: jax.Array, capacity: int, renormalize: bool,
           score: str = "softmax", routed_scaling_factor: float = 1.0,
           real: jax.Array | None = None) -> Routing:
    """Token choice with the experts given: expert_ids [T, k] (recorded routing replayed, or
    `balanced_ids`). Gates are the router's own scores at those ids, renormalized and scaled as
    `route`'s, so the router still learns from the loss; capacity is granted as `route` does."""
    num_experts = logits.shape[-1]
    s = scores(logits, score)
    expert_ids = expert_ids.astype(jnp.int32)
    gates = jnp.take_along_axis(s, expert_ids, axis=-1)
    if renormalize:  # + 1e-20 as transformers: 0, not NaN, if every chosen sigmoid underflows
        gates = gates / (gates.sum(axis=-1, keepdims=True) + 1e-20)
    gates = gates * routed_scaling_factor
    keep = jnp.ones(expert_ids.shape, bool)
    if real is not None:
        keep = jnp.broadcast_to(real[:, None], expert_ids.shape)
        expert_ids, gates = jnp.where(keep, expert_ids, num_experts), jnp.where(keep, gates, 0.0)
    positions, counts = expert_positions(expert_ids, num_experts)
    probs = s / s.sum(-1, keepdims=True)
    return Routing(probs, gates, expert_ids, positions, keep & (positions < capacity), counts)


def balanced_ids(num_tokens: int, k: int, num_experts: int) -> jax.Array:
    """Forced-balanced routing for benchmarks, round-robin (as torchtitan's
    debug_moe_force_load_balance; Megatron's --moe-router-force-load-balancing draws random
    logits, balanced on average only): token t of a group gets experts (t * k + j) mod E,
    j < k. [T, k] int32; every expert gets T * k / E assignments where E divides T * k, and
    a token k distinct experts where k <= E."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)[:, None]
    return (t * k + jnp.arange(k, dtype=jnp.int32)) % num_experts


def mismatched(expert_ids: jax.Array, own_ids: jax.Array) -> jax.Array:
    """[..., k] bool: the forced id is not among the router's own k choices own_ids [..., k]."""
    return ~jnp.any(expert_ids[..., :, None] == own_ids[..., None, :], axis=-1)


def expert_choice(logits: jax.Array, capacity: int, score: str = "softmax",
                  real: jax.Array | None = None) -> Routing:
    """Expert choice (Zhou et al. 2022): each expert takes the `capacity` tokens of the group
    that score highest for it; a token may get any number of experts, or none.

    Non-causal: whether a token is taken depends on the other tokens of its group, later
    ones included, so it suits encoders, not autoregressive decoding.
    Returns a Routing with k = E (column e is expert e): gates are the token's score where
    expert e took it, positions its rank there (capacity where not taken).
    """
    num_tokens, num_experts = logits.shape
    s = scores(logits, score)
    # Padding ranks below every real token (scores are >= 0) and is refused below.
    choice = s if real is None else jnp.where(real[:, None], s, -1.0)
    _, token_ids = jax.lax.top_k(choice.T, capacity)  # [E, C]; ties: lower token index
    experts = jnp.broadcast_to(jnp.arange(num_experts)[:, None], token_ids.shape)
    positions = jnp.full((num_tokens, num_experts), capacity, jnp.int32)
    positions = positions.at[token_ids, experts].set(
        jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), token_ids.shape))
    keep = positions < capacity
    if real is not None:
        keep = keep & real[:, None]
    expert_ids = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), keep.shape)
    counts = keep.sum(0).astype(jnp.int32)
    return Routing(s / s.sum(-1, keepdims=True), jnp.where(keep, s, 0.0), expert_ids,
                   positions, keep, counts)


def bias_update(bias: jax.Array, tokens_per_expert: jax.Array, rate: float) -> jax.Array:
    """Auxiliary-loss-free balancing (DeepSeek-V3): raise the bias of experts that got fewer
    than the mean number of assignments, lower it for those that got more, by `rate`.
    bias, tokens_per_expert: [..., E] (leading axes: layers)."""
    load = tokens_per_expert.astype(jnp.float32)
    return bias + rate * jnp.sign(load.mean(-1, keepdims=True) - load)


def token_z_loss(logits: jax.Array) -> jax.Array:
    """logsumexp(logits)^2 per token; logits: [..., E]."""
    return jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2


def z_loss(logits: jax.Array) -> jax.Array:
    """mean over tokens of logsumexp(logits)^2; logits: [..., E]."""
    return jnp.mean(token_z_loss(logits))


def balance_loss_from_sums(prob_sum: jax.Array, tokens_per_expert: jax.Array, num_tokens,
                           k: int) -> jax.Array:
    """E * sum_e f_e * P_e from per-expert sums, so shards can add them before dividing."""
    num_experts = prob_sum.shape[-1]
    f = tokens_per_expert / (num_tokens * k)
    p = prob_sum / num_tokens
    return num_experts * jnp.sum(f * p)


def balance_loss(probs: jax.Array, expert_ids: jax.Array) -> jax.Array:
    """Switch balance loss of one group; probs: [T, E], expert_ids: [T, k]."""
    counts = jnp.bincount(expert_ids.reshape(-1), length=probs.shape[-1])
    return balance_loss_from_sums(probs.sum(0), counts, probs.shape[0], expert_ids.shape[-1])


def token_entropy(probs: jax.Array) -> jax.Array:
    """Router entropy in nats per token; probs: [..., E]."""
    return -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)


def entropy(probs: jax.Array) -> jax.Array:
    """Mean router entropy in nats over tokens; probs: [T, E]."""
    return jnp.mean(token_entropy(probs))
