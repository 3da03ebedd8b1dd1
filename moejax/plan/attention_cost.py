"""What attention costs on a target chip, as model/kernels.causal runs it there: a fused
kernel at its head dim's rate, skipping the key blocks outside a layer's window; XLA's
einsums with their scores through HBM where moejax has no fused kernel; and, for sinks on
cuDNN's packed layout, the second q.k of their normalizer. predict.py adds it to the step."""

import numpy as np

from moejax.model import kernels
from moejax.model.transformer import FORWARD_AGAIN
from moejax.model.xla_attention import band_keys

# A fused attention kernel's fraction of the peak, forward and backward together: its
# softmax runs between two matmuls of each block (docs/performance.md: FlashAttention-3's
# published H100 figures, the backward's 2.5x the forward's FLOPs weighted in).
ATTENTION_EFFICIENCY = 0.5
# ... at head dim 128; at other widths the same kernel's throughput relative to 128's
# (FlashAttention-3's published BF16 forward on H100 at 4k tokens: 476, 638 and 612
# TFLOP/s at head dims 64, 128 and 256): the nearest width at or above the model's.
ATTENTION_HEAD_DIM = {64: 476 / 638, 128: 1.0, 256: 612 / 638}
# Where moejax has no fused attention kernel for the target (attention_fused), XLA's
# attention writes its scores [rows, heads, S, S] in float32 to HBM and reads them back:
# passes of them in the forward (the scores, the masked softmax read and written, the
# values' matmul) and in the backward (the probabilities' gradient written, the softmax's
# backward reading two and writing one, read by the queries' and the keys' matmuls).
XLA_ATTENTION_PASSES = {"forward": 4, "backward": 6}


def attention_efficiency(head_dim: int) -> float:
    """ATTENTION_EFFICIENCY at this query-key width (ATTENTION_HEAD_DIM's)."""
    width = min((w for w in ATTENTION_HEAD_DIM if w >= head_dim), default=max(ATTENTION_HEAD_DIM))
    return ATTENTION_EFFICIENCY * ATTENTION_HEAD_DIM[width]


def attention_fused(p: dict, chip) -> bool:
    """Whether moejax runs a fused attention kernel on `chip` (model/kernels.causal): on GPU
    cuDNN's, in bf16 (with sinks, not under context parallelism); on TPU splash, where its
    blocks of 128 rows divide the sequence (each half of a device's rows under context
    parallelism). Otherwise XLA's einsums and softmax (xla_attention_bytes)."""
    m = p["model"]
    return kernels.fused(chip.platform, "bfloat16" if m["act_bytes"] == 2 else "float32",
                         m["attention_sinks"], m["seq_len"], p["mesh"]["context"])


def xla_attention_bytes(p: dict) -> float:
    """HBM bytes per device per step of XLA's attention scores: float32 [S, S] per head,
    every layer (a window masks them, it does not shrink them), XLA_ATTENTION_PASSES times,
    the forward's again under remat=full. A device's rows x heads x S is its tokens x heads
    (tensor parallelism splits heads and repeats rows; context splits rows)."""
    m = p["model"]
    passes = (XLA_ATTENTION_PASSES["forward"] * (1 + (p["remat"] in FORWARD_AGAIN))
              + XLA_ATTENTION_PASSES["backward"])
    return (4 * passes * m["layers"] * p["tokens_per_step"] / p["devices"] * m["num_heads"]
            * m["seq_len"])


def sink_normalizer(p: dict, chip) -> tuple[float, float]:
    """FLOPs and HBM bytes per device per step of the second q.k that model/cudnn_attention
    runs for sinks on cuDNN's packed layout (documents on a GPU): each row's log-sum-exp,
    float32 einsums whose logits are written and read once, on each forward (again under
    remat=full); it has no backward. A row's logits: all S keys on a causal layer
    (xla_attention.row_lse skips no block), the key tiles its band reaches on a windowed
    one (band_lse, band_keys). (0, 0) wherever it does not run."""
    m = p["model"]
    if not (chip.platform == "gpu" and m["attention_sinks"] and m["documents"]
            and attention_fused(p, chip)):
        return 0.0, 0.0
    seq = m["seq_len"]
    keys = sum(band_keys(seq, w) if w else seq for w in m.get("windows") or [0] * m["layers"])
    logits = ((1 + (p["remat"] in FORWARD_AGAIN)) * keys * p["tokens_per_step"]
              / p["devices"] * m["num_heads"])
    return 2 * m["head_dim"] * logits, 2 * 4 * logits


def window_share(p: dict, chip) -> float:
    """The share of the counted attention work (run/flops.py: every layer causal, S/2 keys a
    query on average) a fused kernel executes, averaged over the layers: a layer with window W
    computes the key tiles its band touches, about W + one tile of keys a query (a GPU
    kernel's 128-key tiles, splash's blocks on TPU), the rest skipped. 1 where no layer has a
    window or attention is XLA's (which skips nothing)."""
    m = p["model"]
    windows = m.get("windows") or [0]
    if not any(windows) or not attention_fused(p, chip):
        return 1.0
    seq = m["seq_len"]
    tile = 128 if chip.platform == "gpu" else kernels.block_size(seq)
    return float(np.mean([min(1.0, (w + tile) / (seq / 2)) if w else 1.0 for w in windows]))


def times(p: dict, chip, flops: float, peak: float, matmul_efficiency: float,
          hbm: float) -> tuple[float, float]:
    """Seconds per step of attention's matmuls (its executed `flops`, hardware_flops') and of
    its logits through HBM, on a device of `peak` FLOP/s and `hbm` bytes/s."""
    if attention_fused(p, chip):
        matmul = flops / peak / attention_efficiency(p["model"]["head_dim"])
        logits = 0.0
    else:  # plain einsums; with sinks in float32, which a GPU runs at half the bf16 rate
        f32 = p["model"]["attention_sinks"] and chip.platform == "gpu"
        matmul = flops / (peak / (2 if f32 else 1)) / matmul_efficiency
        logits = xla_attention_bytes(p)
    normalizer_flops, normalizer_bytes = sink_normalizer(p, chip)  # float32: half rate
    return (matmul + normalizer_flops / (peak / 2) / matmul_efficiency,
            (logits + normalizer_bytes) / hbm)
