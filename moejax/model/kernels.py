"""Causal self-attention, the kernel chosen by backend in this one place.

  TPU    the splash attention Pallas kernel that ships in jax (a flash-attention that skips
         the blocks above the diagonal), one shard_map'd call per device.
  GPU    cuDNN flash attention through jax.nn.dot_product_attention (bf16/f16 only).
  other  jax.nn.dot_product_attention's XLA implementation.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash_kernel,
    splash_attention_mask as splash_mask,
)
from jax.sharding import Mesh

from moejax import parallel


def xla(q, k, v, scale: float | None = None):
    """jax's own attention, XLA's einsums and softmax: what runs on CPU."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale)


def causal(q: jax.Array, k: jax.Array, v: jax.Array, mesh: Mesh | None,
           scale: float | None = None) -> jax.Array:
    """q: [B, S, H, hd], k and v: [B, S, KV, hd] (H % KV == 0) -> [B, S, H, hd], each query
    attending to the keys at its position and before, the logits scaled by `scale` (None:
    1/sqrt(hd); YaRN's mscale changes it, layers.Rope.softmax_scale)."""
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        # cuDNN checks for itself when traced, so it cannot hide in a platform_dependent
        # branch exported from a CPU host; the GPU benchmark script covers this path.
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                            implementation="cudnn")
    if q.shape[1] % 128:
        # Splash tiles the sequence in blocks of a multiple of 128 (the TPU lane width):
        # shorter or ragged sequences (the smoke configs' 32) take the XLA path on TPU too.
        return xla(q, k, v, scale)
    # Both branches are traced, but only the target platform's is lowered: a CPU program
    # never holds the TPU kernel, and a TPU program can be exported from a CPU host.
    return jax.lax.platform_dependent(q, k, v, tpu=functools.partial(splash, mesh=mesh,
                                                                      scale=scale),
                                      default=functools.partial(xla, scale=scale))


def block_size(seq: int) -> int:
    """The largest of 512, 256, 128 that divides seq: bigger tiles amortize the kernel's
    per-block overhead (MaxText's default tile is 512)."""
    return next(b for b in (512, 256, 128) if seq % b == 0)


def _per_device(q, k, v, *, interpret: bool, scale: float | None = None):
    """[b, S, h, hd], [b, S, kv, hd] -> [b, S, h, hd]: the kernel vmapped over examples."""
    b = block_size(q.shape[1])
    # The backward blocks must be set too: the kernel's VJP runs its own dq and dkv kernels.
    blocks = splash_kernel.BlockSizes(block_q=b, block_kv=b, block_q_dkv=b, block_kv_dkv=b,
                                      block_q_dq=b, block_kv_dq=b)
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((q.shape[1],) * 2)] * q.shape[2])
    kernel = splash_kernel.make_splash_mha(mask, block_sizes=blocks, head_shards=1,
                                           q_seq_shards=1, interpret=interpret)
    q = q * (q.shape[-1] ** -0.5 if scale is None else scale)  # splash does not scale logits
    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    return heads_first(jax.vmap(kernel)(*map(heads_first, (q, k, v))))


def splash(q, k, v, mesh: Mesh | None = None, *, interpret: bool = False,
           scale: float | None = None) -> jax.Array:
    """The splash kernel on [B, S, H, hd] / [B, S, KV, hd] (S a multiple of 128), run per
    device under shard_map: a pallas_call is opaque to XLA's SPMD partitioner. `interpret`
    runs the kernel in Pallas' interpreter, so tests can check it on CPU. `scale`: the
    logits' (None: 1/sqrt(hd))."""
    kernel = functools.partial(_per_device, interpret=interpret, scale=scale)
    if mesh is None:
        return kernel(q, k, v)
    spec = parallel.spec(("batch", None, "heads", None), q.shape, mesh)
    shards = math.prod(mesh.shape[a] for a in jax.tree.leaves(spec[2]))
    if k.shape[2] % shards:
        # Query heads are split but too few kv heads to split alike: repeat each kv head
        # so every device holds the ones its query heads read, and no more.
        k, v = (jnp.repeat(a, math.lcm(k.shape[2], shards) // k.shape[2], axis=2)
                for a in (k, v))
    # check_vma=False: the kernel's pallas_calls declare no per-axis variance of their outputs.
    return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q, k, v)
