"""Causal self-attention with documents, the kernel chosen by backend in this one place.

A query attends to the keys at its position and before; given `segments` [B, S] (each token's
document, 1, 2, ... in row order, 0 = padding), only to those of its own document. Padding
attends to padding, so no row of the softmax is empty.

  TPU    the splash attention Pallas kernel that ships in jax (a flash-attention that skips
         the blocks above the diagonal), one shard_map'd call per device; documents are its
         SegmentIds(q=, kv=), and-ed with its CausalMask inside the kernel.
  GPU    cuDNN flash attention (bf16/f16 only) through jax.nn.dot_product_attention;
         documents (cuDNN's packed layout, Hopper or newer; older GPUs take XLA's) and
         sinks through cudnn_attention.py, one call per device under shard_map.
  other  jax.nn.dot_product_attention's XLA implementation, the document mask explicit.

With mesh.context > 1 the sequence is split over devices and the causal work balanced
(context.py); per device TPU runs splash (block-sparse over the balanced rows), GPU cuDNN with
the mask as a bias [b, 1, S / context, S], others `blockwise` (xla_attention.py), a flash
attention in XLA whose logits are [b, S / context, h, 512] at a time, so long-context plans on
XLA:CPU are not dominated by [S, S] score buffers no accelerator holds.

Sinks (gpt-oss): `sinks` [H] gives each query head h one more logit s_h in every softmax row,
unscaled, that takes probability mass and carries no value: p_j = exp(l_j) / (exp(s_h) +
sum_k exp(l_k)). Splash takes them in its kernel (forward and gradient, per device and over
context); XLA, `blockwise` and `masked` (xla_attention.py) add the term to the normalizer;
cuDNN has no such input: cudnn_attention.py rescales each row of its output for the sink
and hands its backward the rescaled output (not under context parallelism, whose GPU rows
then take XLA's). sinks=None leaves every path as it was.
"""

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash_kernel,
    splash_attention_mask as splash_mask,
)
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax.model import context, cudnn_attention
from moejax.model.xla_attention import (
    blockwise,
    document_mask,
    masked,
    row_max,
)


def fused(platform: str, dtype, sinks: bool, seq: int, context_size: int = 1) -> bool:
    """Whether `causal` runs a fused kernel on `platform`: on "gpu" cuDNN's, for bf16 or f16,
    with sinks not under context parallelism; on "tpu" splash, where 128 divides its rows
    (the sequence; under context parallelism each half of a device's rows, seq / (2
    context_size)). Otherwise XLA's einsums, their scores in HBM (plan/predict.py prices
    which)."""
    if platform == "gpu":
        return (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
                and not (sinks and context_size > 1))
    return platform == "tpu" and splash_rows(seq, context_size) % 128 == 0


def splash_rows(seq: int, context_size: int = 1) -> int:
    """The rows splash tiles per call: the sequence, or under context parallelism each half
    of a device's rows (context.py balances causal work by halves)."""
    return seq // (2 * context_size) if context_size > 1 else seq


def unfused_note(config, platform: str, context_size: int = 1) -> str | None:
    """The start-up line of a run whose attention has no fused kernel on its TPU or GPU
    (`context_size`: its mesh's context axis)."""
    mc, seq = config.model, config.data.seq_len
    sinks = bool(mc.get("attention_sinks"))
    if platform not in ("gpu", "tpu") or fused(platform, mc.dtype, sinks, seq, context_size):
        return None
    rows = splash_rows(seq, context_size)
    why = ("attention sinks under context parallelism" if platform == "gpu" and sinks else
           f"model.dtype={mc.dtype}" if platform == "gpu" else
           f"128 does not divide the {rows} rows of a device")
    return (f"attention: no fused kernel on {platform} ({why}); XLA's einsums write every "
            "layer's [S, S] scores per head to memory and read them back (plan --target "
            "prices it)")


# Set while the planner compiles, on XLA:CPU, a step whose target runs a fused kernel
# (`standing_in_for_fused`): the XLA path then holds what a fused kernel holds, not [S, S].
_STAND_IN: list = []


@contextlib.contextmanager
def standing_in_for_fused():
    """Within: `xla` is moejax's flash attention in XLA (`blockwise`: keys 512 at a time,
    the backward from the saved log-sum-exp), so that XLA:CPU's memory of a compiled step is
    a fused kernel's, not its own [rows, heads, S, S] scores (plan --target, --search)."""
    _STAND_IN.append(True)
    try:
        yield
    finally:
        _STAND_IN.pop()


def xla(q, k, v, scale: float | None = None, segments=None, window: int = 0, sinks=None):
    """jax's own attention, XLA's einsums and softmax: what runs on CPU."""
    if _STAND_IN:
        seq = q.shape[1]
        segments = jnp.ones(q.shape[:2], jnp.int32) if segments is None else segments
        return blockwise(q, k, v, segments, segments, jnp.arange(seq), sinks,
                         q.shape[-1] ** -0.5 if scale is None else scale, math.gcd(seq, 512),
                         window)
    if segments is None and not window and sinks is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale)
    index = jnp.arange(q.shape[1])
    mask = document_mask(segments, segments, index, index, window)
    return masked(q, k, v, mask, scale, sinks)


def causal(q: jax.Array, k: jax.Array, v: jax.Array, mesh: Mesh | None,
           scale: float | None = None, segments: jax.Array | None = None,
           window: int = 0, sinks: jax.Array | None = None) -> jax.Array:
    """q: [B, S, H, hd], k and v: [B, S, KV, hd] (H % KV == 0) -> [B, S, H, hd], each query
    attending to the keys at its position and before, of its own segment when `segments`
    [B, S] int32 is given (documents are contiguous, so sequence order is each one's position
    order), and with `window` W > 0 only to the W most recent of them, itself included
    (model.sliding_window); the logits scaled by `scale` (None: 1/sqrt(hd); YaRN's mscale
    changes it, layers.Rope.softmax_scale). `sinks` [H] float (sharded as the heads): each
    head's learned sink logit (gpt-oss; None: none)."""
    if window < 0:
        raise ValueError(f"sliding window {window}; allowed: 0 (off) or a positive int")
    if context.size(mesh) > 1:
        return context_parallel(q, k, v, mesh, scale, segments, window=window, sinks=sinks)
    if jax.default_backend() == "gpu" and fused("gpu", q.dtype, sinks is not None, 0):
        # cuDNN checks for itself when traced, so it cannot hide in a platform_dependent
        # branch exported from a CPU host; bench/attention_gpu.py checks these on a GPU,
        # tests/test_attention.py and test_sinks.py trace them on a CPU host.
        if segments is None and sinks is None:  # cuDNN's own partitioning serves it
            return cudnn_attention.attention(q, k, v, scale=scale, window=window)
        if segments is None or _hopper():
            return _sharded(functools.partial(cudnn_attention.attention, scale=scale,
                                              window=window), q, k, v, segments, mesh, sinks)
        return xla(q, k, v, scale, segments, window, sinks)
    if not fused("tpu", q.dtype, sinks is not None, q.shape[1]):
        # Splash tiles the sequence in blocks of a multiple of 128 (the TPU lane width):
        # shorter or ragged sequences (the smoke configs' 32) take the XLA path on TPU too.
        return xla(q, k, v, scale, segments, window, sinks)
    # Both branches are traced, but only the target platform's is lowered: a CPU program
    # never holds the TPU kernel, and a TPU program can be exported from a CPU host.
    return jax.lax.platform_dependent(
        q, k, v, segments, sinks,
        tpu=functools.partial(_splash_args, mesh=mesh, scale=scale, window=window),
        default=lambda q, k, v, segments, sinks: xla(q, k, v, scale, segments, window, sinks))


def max_logits(q: jax.Array, k: jax.Array, mesh: Mesh | None, scale: float | None = None,
               segments: jax.Array | None = None, window: int = 0) -> jax.Array:
    """[H] float32: each head's largest logit q.k x scale over the (query, key) pairs
    `causal` lets attend (its causal, document and window masks), over the whole batch;
    without gradient. No kernel exposes its logits, so every path computes this the same
    way, a second q.k in XLA a key block at a time (xla_attention.row_max): never [S, S] per
    head. With context parallelism, per device over its balanced rows (context.attend)."""
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if context.size(mesh) > 1:
        # attend carries a "value" it gathers; one column of k is the cheapest stand-in.
        rows = context.attend(functools.partial(_max_rows, scale=scale, window=window),
                              q, k, k[..., :1], segments, mesh)
        return rows.max((0, 1, 3))
    index = jnp.arange(q.shape[1])
    return _max_rows(q, k, None, segments, segments, index, {}, scale=scale,
                     window=window).max((0, 1, 3))


def _max_rows(q, k, v, q_segments, kv_segments, q_index, extra, *, scale, window):
    """context.attend's per-device function for max_logits: [b, Sq, h, 1], each row's max."""
    del v, extra
    if q_segments is None:
        q_segments = jnp.zeros(q.shape[:2], jnp.int32)
        kv_segments = jnp.zeros(k.shape[:2], jnp.int32)
    block = math.gcd(k.shape[1], 512)
    return row_max(q, k, q_segments, kv_segments, q_index, scale, block, window)[..., None]


def _splash_args(q, k, v, segments, sinks, *, mesh, scale, window):
    return splash(q, k, v, mesh, scale=scale, segments=segments, window=window, sinks=sinks)


def _hopper() -> bool:
    capability = getattr(jax.devices()[0], "compute_capability", "0")
    return int(str(capability).split(".")[0]) >= 9


def block_size(seq: int) -> int:
    """The largest of 512, 256, 128 that divides seq: bigger tiles amortize the kernel's
    per-block overhead (MaxText's default tile is 512)."""
    return next(b for b in (512, 256, 128) if seq % b == 0)


def _make_splash(heads: int, seq: int, block: int, *, interpret: bool, q_index=None,
                 q_shards: int = 1, window: int = 0):
    """The splash kernel for `heads` heads over [seq, seq], causal in sequence order (with
    `window` W > 0 a LocalMask of the W - 1 keys before and none after, whose blocks wholly
    outside the band are skipped as those above the diagonal are); with q_index [seq] the
    query rows are those positions (context parallelism's balanced order) and the kernel's
    mask info splits over q_shards devices by rows."""
    # The backward blocks must be set too: the kernel's VJP runs its own dq and dkv kernels.
    b = block
    blocks = splash_kernel.BlockSizes(block_q=b, block_kv=b, block_q_dkv=b, block_kv_dkv=b,
                                      block_q_dq=b, block_kv_dq=b)
    if window:
        mask = splash_mask.LocalMask((seq, seq), window_size=(window - 1, 0), offset=0)
    else:
        mask = splash_mask.CausalMask((seq, seq))
    if q_index is not None:
        # The mask function compares q_sequence (loaded per query block) with key indices.
        mask.q_sequence = np.asarray(q_index, np.int32)
    return splash_kernel.make_splash_mha(splash_mask.MultiHeadMask([mask] * heads),
                                         block_sizes=blocks, head_shards=1,
                                         q_seq_shards=q_shards, interpret=interpret)


def _run_splash(kernel, q, k, v, q_segments, kv_segments, scale, sinks=None):
    """[b, Sq, h, hd], [b, Skv, kv, hd], segments [b, Sq] / [b, Skv] or None, sinks [h] or
    None -> [b, Sq, h, hd]: the kernel vmapped over examples."""
    q = q * (q.shape[-1] ** -0.5 if scale is None else scale)  # splash does not scale logits
    if sinks is not None:
        # The kernel adds them unscaled (as gpt-oss does) in float32, but returns their
        # gradient in the activations' dtype whatever theirs: passed in that dtype, the
        # gradient's dtype is the one autodiff expects (bfloat16 sinks, as gpt-oss stores).
        sinks = sinks.astype(q.dtype)
    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    q, k, v = map(heads_first, (q, k, v))
    if q_segments is None:
        y = jax.vmap(lambda q, k, v: kernel(q, k, v, sinks=sinks))(q, k, v)
    else:
        y = jax.vmap(lambda q, k, v, qs, ks: kernel(
            q, k, v, segment_ids=splash_kernel.SegmentIds(q=qs, kv=ks), sinks=sinks))(
                q, k, v, q_segments, kv_segments)
    return heads_first(y)


def _per_device(q, k, v, segments=None, sinks=None, *, interpret: bool,
                scale: float | None = None, window: int = 0):
    """[b, S, h, hd], [b, S, kv, hd], [b, S] or None, [h] or None -> [b, S, h, hd]."""
    kernel = _make_splash(q.shape[2], q.shape[1], block_size(q.shape[1]), interpret=interpret,
                          window=window)
    return _run_splash(kernel, q, k, v, segments, segments, scale, sinks)


def _sharded(kernel, q, k, v, segments, mesh: Mesh | None, sinks=None):
    """kernel(q, k, v[, segments=][, sinks=]) per device under shard_map over rows and heads
    (the sinks [H] split as the heads): a pallas_call (or cuDNN's packed call) is opaque to
    XLA's SPMD partitioner."""
    extra = {name: a for name, a in (("segments", segments), ("sinks", sinks)) if a is not None}
    if mesh is None:
        return kernel(q, k, v, **extra)
    spec, head_shards = context.specs(q.shape, mesh)
    k, v = context.repeat_kv(k, v, head_shards)
    extra_specs = {"segments": P(spec[0], spec[1]), "sinks": P(spec[2])}
    # check_vma=False: the kernel's pallas_calls declare no per-axis variance of their outputs.
    return jax.shard_map(lambda q, k, v, extra: kernel(q, k, v, **extra), mesh=mesh,
                         in_specs=(spec, spec, spec, {n: extra_specs[n] for n in extra}),
                         out_specs=spec, check_vma=False)(q, k, v, extra)


def splash(q, k, v, mesh: Mesh | None = None, *, interpret: bool = False,
           scale: float | None = None, segments: jax.Array | None = None,
           window: int = 0, sinks: jax.Array | None = None) -> jax.Array:
    """The splash kernel on [B, S, H, hd] / [B, S, KV, hd] (S a multiple of 128), run per
    device under shard_map. `interpret` runs the kernel in Pallas' interpreter, so tests can
    check it on CPU. `scale`: the logits' (None: 1/sqrt(hd)). `segments` [B, S]: documents.
    `window`: `causal`'s sliding window (0: off). `sinks` [H]: `causal`'s."""
    kernel = functools.partial(_per_device, interpret=interpret, scale=scale, window=window)
    return _sharded(kernel, q, k, v, segments, mesh, sinks)


def context_parallel(q, k, v, mesh: Mesh, scale: float | None = None, segments=None, *,
                     interpret: bool = False, window: int = 0, sinks=None) -> jax.Array:
    """`causal` with the sequence split over mesh axis context (context.py): per device XLA's
    masked attention, cuDNN with the mask as a bias on GPU, or splash on TPU where the
    halves are multiples of 128 rows (`interpret`: splash in Pallas' interpreter, for tests).
    `window`: `causal`'s; the rows' positions are global (context.query_index), so every
    path masks by them as the one-device kernels do. `sinks` [H]: `causal`'s (not on cuDNN
    here: GPUs take the XLA rows)."""
    if jax.default_backend() == "gpu" and fused("gpu", q.dtype, sinks is not None, 0,
                                                context.size(mesh)):
        return context.attend(functools.partial(_xla_rows, scale=scale, cudnn=True,
                                                window=window), q, k, v, segments, mesh)
    splash_path = functools.partial(_splash_rows, mesh=mesh, scale=scale, interpret=interpret,
                                    window=window)
    if interpret:
        return splash_path(q, k, v, segments, sinks)

    def xla_path(q, k, v, segments, sinks):
        extra, extra_spec = _head_extra(sinks, q.shape, mesh)
        return context.attend(functools.partial(_xla_rows, scale=scale, window=window),
                              q, k, v, segments, mesh, extra, extra_spec)

    if not fused("tpu", q.dtype, sinks is not None, q.shape[1], context.size(mesh)):
        return xla_path(q, k, v, segments, sinks)
    return jax.lax.platform_dependent(q, k, v, segments, sinks, tpu=splash_path,
                                      default=xla_path)


def _head_extra(sinks, q_shape, mesh: Mesh) -> tuple[dict, dict]:
    """What context.attend carries to every device beside the rows, and its shard_map spec:
    the sinks (if any), split as the heads."""
    if sinks is None:
        return {}, {}
    return {"sinks": sinks}, {"sinks": P(context.specs(q_shape, mesh)[0][2])}


def _xla_rows(q, k, v, q_segments, kv_segments, q_index, extra, *, scale, cudnn=False,
              window=0):
    """Balanced query rows against all keys: cuDNN with the mask as a bias, or XLA's
    blockwise attention (`blockwise`), keys a block at a time. extra: `_head_extra`'s."""
    if cudnn:
        mask = document_mask(q_segments, kv_segments, q_index, jnp.arange(k.shape[1]), window)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                            implementation="cudnn")
    if q_segments is None:
        q_segments = jnp.zeros(q.shape[:2], jnp.int32)
        kv_segments = jnp.zeros(k.shape[:2], jnp.int32)
    block = math.gcd(q.shape[1], 512)  # a chunk of the sequence or a part of one
    return blockwise(q, k, v, q_segments, kv_segments, q_index, extra.get("sinks"),
                     q.shape[-1] ** -0.5 if scale is None else scale, block, window)


def _splash_rows(q, k, v, segments, sinks=None, *, mesh, scale, interpret, window=0):
    """Splash per device on the balanced rows: a CausalMask whose q_sequence is each row's
    position, its mask info split over context by rows, so every device skips the blocks
    above its own rows' diagonal."""
    c, seq = context.size(mesh), q.shape[1]
    heads = q.shape[2] // context.specs(q.shape, mesh)[1]  # this device's
    kernel = _make_splash(heads, seq, block_size(seq // (2 * c)), interpret=interpret,
                          q_index=context.query_index(seq, c), q_shards=c, window=window)
    kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, P(None, context.AXIS)))
    extra, extra_spec = _head_extra(sinks, q.shape, mesh)

    def rows(q, k, v, q_segments, kv_segments, q_index, extra):
        del q_index  # the kernel's mask info holds it
        return _run_splash(extra["kernel"], q, k, v, q_segments, kv_segments, scale,
                           extra.get("sinks"))

    return context.attend(rows, q, k, v, segments, mesh, {"kernel": kernel, **extra},
                          {"kernel": kernel_spec, **extra_spec})
