"""cuDNN's attention where jax.nn.dot_product_attention's plain call does not reach: documents
(cuDNN's packed layout) and gpt-oss's sinks, for which cuDNN has no input. One device's
rows; kernels.causal runs these per device under shard_map.

Documents. jax 0.10.2 offers the packed (THD) layout only in its private
jax._src.cudnn.fused_attention_stablehlo: each row's runs of one segment id (documents,
padding) become q_seqlen / kv_seqlen [b, M] and q_offsets / kv_offsets [b, M + 1] (-1 past
the last run), mask PADDING_CAUSAL, so every document is its own causal sequence and no
[S, S] mask exists. The kernel saves softmax statistics [b x M, heads, S] float32 for its
backward: at M = S, a row's most possible runs, as many bytes per head as [S, S] scores on
every layer. So M = PACKED_RUNS, and a device whose rows hold more runs takes XLA's flash
attention (`blockwise`) for that step: exact either way, decided per device by lax.cond.

Sinks. A sink s_h is one more logit in every softmax row of head h, carrying no value, so it
only rescales the row: with o and lse the kernel's output and log-sum-exp without it,
y = o x sigmoid(lse - s_h). The kernel's own backward then serves: flash attention's backward
uses the forward's output only for its row sums dy . o; handed y and sigmoid(.) x dy, its
dS = sigmoid(.) P (dy . v_j - dy . y) and dv are those of the final probabilities. The sinks'
gradient is -sum over rows of (1 - sigmoid(.)) (dy . y). lse is the kernel's softmax
statistics on the plain layout ([b, heads, S], as jax's return_residual documents them); on
the packed layout, whose statistics jax lays out per run, a second q.k in XLA a key block at
a time (xla_attention.row_lse; under a sliding window only the key tiles its band reaches,
band_lse).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax._src.cudnn import fused_attention_stablehlo as cudnn

from moejax.model.xla_attention import band_lse, blockwise, document_starts, row_lse

PACKED_RUNS = 32
_SEED, _DROPOUT, _NO_BIAS = 42, 0.0, (False, False)  # what jax's public cuDNN call passes


def packed_runs(segments: jax.Array, runs: int = PACKED_RUNS) -> tuple[jax.Array, jax.Array]:
    """segments [b, S] -> the first `runs` runs of equal ids as cuDNN's packed layout wants
    them: lengths [b, runs] and start offsets [b, runs + 1], -1 past each row's last run."""
    b, seq = segments.shape
    run = jnp.cumsum(document_starts(segments), axis=1) - 1  # [b, S]: the run each token is in
    lengths = jnp.zeros((b, runs), jnp.int32).at[jnp.arange(b)[:, None], run].add(
        1, mode="drop")
    offsets = jnp.cumsum(lengths, axis=1) - lengths
    lengths, offsets = (jnp.where(lengths > 0, a, -1).astype(jnp.int32)
                        for a in (lengths, offsets))
    return lengths, jnp.concatenate([offsets, jnp.full((b, 1), -1, jnp.int32)], 1)


def attention(q, k, v, segments=None, sinks=None, *, scale=None, window: int = 0):
    """q [b, S, h, hd], k and v [b, S, kv, hd] -> [b, S, h, hd], causal, within the documents
    of `segments` [b, S] (None: a row is one), within `window` (> 0) keys back, with `sinks`
    [h] (None: none). Packed, kv heads are repeated to the query's (jax 0.10.2 steps the kv
    offsets by the query's heads x hd per token)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if segments is None and sinks is None:
        # jax's (left, right) window: keys q - left .. q + right, so W - 1 back.
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, scale=scale, implementation="cudnn",
            local_window_size=(window - 1, 0) if window else None)
    if segments is None:
        return _sunk(q, k, v, sinks, None, None, None, _Cudnn(scale, window, packed=False))
    if k.shape[2] != q.shape[2]:
        k, v = (jnp.repeat(a, q.shape[2] // k.shape[2], axis=2) for a in (k, v))
    index = jnp.arange(q.shape[1])
    block = math.gcd(q.shape[1], 512)

    def packed(q, k, v, segments, sinks):
        lengths, offsets = packed_runs(segments)
        call = _Cudnn(scale, window, packed=True)
        if sinks is None:
            return cudnn.dot_product_attention(
                q, k, v, None, None, lengths, lengths, offsets, offsets, scale=scale,
                mask_type=call.mask, qkv_layout="BTNH", sliding_window_length=window or None)
        lse = (band_lse(q, k, segments, scale, window) if window else
               row_lse(q, k, segments, segments, index, scale, block))
        return _sunk(q, k, v, sinks, lengths, offsets, lse, call)

    def flash(q, k, v, segments, sinks):
        return blockwise(q, k, v, segments, segments, index, sinks, scale, block, window)

    fits = document_starts(segments).sum(1).max() <= PACKED_RUNS
    return jax.lax.cond(fits, packed, flash, q, k, v, segments, sinks)


@dataclasses.dataclass(frozen=True)
class _Cudnn:
    """jax's cuDNN forward and backward rules, called as its public call calls them, with
    the output the backward sees in our hands."""

    scale: float
    window: int
    packed: bool

    @property
    def mask(self):
        return cudnn.MaskType.PADDING_CAUSAL if self.packed else cudnn.MaskType.CAUSAL

    def _static(self):
        return (self.scale, _SEED, _DROPOUT, _NO_BIAS, self.mask,
                cudnn.AttentionLayout.BTNH.value, self.window or None,
                cudnn.check_cudnn_version())

    def forward(self, q, k, v, lengths, offsets):
        """-> output [b, S, h, hd], softmax statistics (plain: [b, h, S] f32), residuals."""
        runs = (None,) * 4 if lengths is None else (lengths, lengths, offsets, offsets)
        cudnn.check_layout(q, k, v, None, *runs, None, None, cudnn.AttentionLayout.BTNH)
        none = jnp.zeros(0, q.dtype)  # jax's placeholder for an absent input
        runs = tuple(none if a is None else a for a in runs)
        (out, stats), res = cudnn._dot_product_attention_fwd_rule(
            q, k, v, none, *runs, none, none, *self._static(), True)
        return out, stats, res

    def backward(self, res, y, dy):
        """dq, dk, dv, the kernel's row sums taken with y as its output."""
        res = (*res[:-1], y)
        grads = cudnn._dot_product_attention_bwd_rule(*self._static(), True, res, (dy, None))
        return grads[:3]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _sunk(q, k, v, sinks, lengths, offsets, lse, call):
    """The kernel's attention with each row rescaled for its sink (module docstring)."""
    return _sunk_fwd(q, k, v, sinks, lengths, offsets, lse, call)[0]


def _sunk_fwd(q, k, v, sinks, lengths, offsets, lse, call):
    out, stats, res = call.forward(q, k, v, lengths, offsets)
    if lse is None:
        lse = jnp.swapaxes(stats, 1, 2)  # [b, h, S] -> [b, S, h]
    keep = jax.nn.sigmoid(lse - sinks.astype(jnp.float32))  # the row's mass off the sink
    y = (out.astype(jnp.float32) * keep[..., None]).astype(out.dtype)
    return y, (res, y, keep, sinks, lengths, offsets, lse)


def _sunk_bwd(call, residuals, dy):
    res, y, keep, sinks, lengths, offsets, lse = residuals
    dq, dk, dv = call.backward(res, y, (dy.astype(jnp.float32) * keep[..., None]).astype(
        dy.dtype))
    rowdot = (dy.astype(jnp.float32) * y.astype(jnp.float32)).sum(-1)  # [b, S, h]
    dsinks = -((1 - keep) * rowdot).sum((0, 1)).astype(sinks.dtype)
    return dq, dk, dv, dsinks, None, None, None if lse is None else jnp.zeros_like(lse)


_sunk.defvjp(_sunk_fwd, _sunk_bwd)
