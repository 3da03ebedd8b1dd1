"""Multi-token prediction (DeepSeek-V3, arXiv 2412.19437 section 2.2): module k predicts the
token k + 1 places ahead of each position from the previous depth's hidden state and the
embedding of the token k places ahead, through one more block and the model's own output head.

Depth k's input at position i is proj([enorm(embed(t[i + k])), hnorm(h[i])]), h being the main
model's final-normed last hidden state (k = 1) or the previous module's block output; its
logits at i score t[i + k + 1].
Training adds mtp_coef times the mean over depths of their cross-entropies to the loss;
generation runs the main model only (these modules could draft tokens for speculative decoding).
"""

import jax.numpy as jnp
from flax import nnx

from moejax.model.layers import DTYPES, RMSNorm, param


class MTP(nnx.Module):
    def __init__(self, cfg, block, rngs):
        param_dtype = DTYPES[cfg.param_dtype]
        d = cfg.d_model
        self.enorm = RMSNorm(d, cfg.norm_eps, param_dtype)
        self.hnorm = RMSNorm(d, cfg.norm_eps, param_dtype)
        self.proj = param(rngs, (2 * d, d), ("embed", None), param_dtype, 2 * d)
        self.block = block  # a transformer Block for layer num_layers + k
        self.head_norm = RMSNorm(d, cfg.norm_eps, param_dtype)
        self.dtype = DTYPES[cfg.dtype]

    def __call__(self, h, ahead, positions, segments, *, train, rng, max_logit=False):
        """h: [B, S, d] the previous depth's hidden state, ahead: [B, S, d] the embeddings of
        the tokens k places ahead -> (this depth's hidden state, its MoE aux or None), the
        hidden state head_norm'd for the output head, and with max_logit its attention's
        largest logit per head [h] (else None)."""
        x = jnp.concatenate([self.enorm(ahead), self.hnorm(h)], -1)
        x = x @ self.proj[...].astype(self.dtype)
        h, aux, top = self.block(x, positions, segments, train=train, rng=rng,
                                 max_logit=max_logit)
        return h, aux, self.head_norm(h), top
