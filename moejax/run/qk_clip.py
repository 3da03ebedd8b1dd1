"""QK-clip (MuonClip, Kimi K2 report section 2.1): after an optimizer step, each attention head
whose largest logit S_h in the step's forward pass exceeded tau has its query and key weights
rescaled so that its logits shrink by gamma_h = min(1, tau / S_h), and no others change.

A head's logits are bilinear in its query and its key (rotary positions rotate them, YaRN's
mscale multiplies them by constants), so scaling the query by a and the key by b scales
every logit by a * b:
  grouped-query  the heads h of kv group g share one key: the key (and its bias) by
                 sqrt(m_g), m_g = min over h in g of gamma_h, and query head h by
                 gamma_h / sqrt(m_g); with one head per group (MHA) sqrt(gamma_h) on both.
                 The values and gpt-oss's sinks are untouched.
  latent (MLA)   Kimi's rule: head h's q_nope and k_nope columns (q or q_up, kv_up) by
                 sqrt(gamma_h), its q_rope columns by gamma_h; the rotary key, shared by all
                 heads (kv_down), and the value columns of kv_up untouched.
q_down and kv_down feed RMSNorms that would undo a rescale: only the matrices after them
change. Queries and keys under model.qk_norm would be normed back alike, so config_lib
refuses train.qk_clip > 0 with qk_norm.
"""

import jax
import jax.numpy as jnp

from moejax.run.checkpoint import path_name


def gammas(top: jax.Array, tau: float) -> jax.Array:
    """[..., h] largest logits -> [..., h] the factor each head's logits shrink by."""
    return jnp.where(top > tau, tau / jnp.maximum(top, tau), 1.0).astype(jnp.float32)


def gqa_factors(gamma: jax.Array, kv_heads: int) -> tuple[jax.Array, jax.Array]:
    """[..., h] -> the query heads' factors [..., h] and the kv groups' key factors
    [..., kv]: their product is gamma_h for every head."""
    grouped = gamma.reshape(*gamma.shape[:-1], kv_heads, -1)  # [..., kv, group]
    key = jnp.sqrt(grouped.min(-1))
    return (grouped / key[..., None]).reshape(gamma.shape), key


def mla_columns(gamma: jax.Array, nope: int, rest: int, rest_factor) -> jax.Array:
    """[..., h] -> [..., h, nope + rest]: sqrt(gamma) on a head's nope columns, then
    rest_factor(gamma) on the rest (q_rope: gamma; kv_up's values: 1)."""
    def wide(a, n):
        return jnp.broadcast_to(a[..., None], (*a.shape, n))

    return jnp.concatenate([wide(jnp.sqrt(gamma), nope), wide(rest_factor(gamma), rest)], -1)


def factor(leaf: str, gamma: jax.Array, shapes: dict, module: str, nope: int):
    """What parameter `leaf` of attention `module` is multiplied by, broadcastable to its
    shape (leading layer axes, then the module's own dims); None: left alone. shapes: every
    parameter's, by path."""
    if module + ".kv_up" in shapes:  # latent attention
        width = shapes[f"{module}.{leaf}"][-1] if leaf in ("q", "q_up", "kv_up") else 0
        if leaf in ("q", "q_up"):  # [..., in, h, nope + rope]
            return mla_columns(gamma, nope, width - nope, lambda g: g)[..., None, :, :]
        if leaf == "kv_up":  # [..., rank, h, nope + v]
            return mla_columns(gamma, nope, width - nope, jnp.ones_like)[..., None, :, :]
        return None
    query, key = gqa_factors(gamma, shapes[module + ".kv"][-2])
    key = jnp.stack([key, jnp.ones_like(key)], -2)  # [..., 2, kv]: key, value
    return {"q": query[..., None, :, None],  # [..., d, h, hd]
            "q_bias": query[..., None],  # [..., h, hd]
            "kv": key[..., None, :, :, None],  # [..., d, 2, kv, hd]
            "kv_bias": key[..., None]}.get(leaf)  # [..., 2, kv, hd]


def clip(params, max_logits: dict, tau: float, nope: int = 0):
    """params (the model's state tree) with every attention module named in `max_logits`
    QK-clipped at tau: max_logits maps a module's path ("stacks.0.blocks.1.attn",
    "mtp.0.block.attn") to its heads' largest logits [..., h], with the leading layer axes
    its parameters have. nope: model.qk_nope_head_dim, latent attention's unrotated width.
    Each weight is scaled in float32 and stored back in its own dtype."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    shapes = {path_name(p): x.shape for p, x in flat}
    factors = {}
    for module, top in max_logits.items():
        gamma = gammas(top, tau)
        for name in shapes:
            module_of, _, leaf = name.rpartition(".")
            if module_of == module and (f := factor(leaf, gamma, shapes, module, nope)) is not None:
                factors[name] = f

    def scale(path, x):
        f = factors.get(path_name(path))
        return x if f is None else (x.astype(jnp.float32) * f).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(scale, params)
