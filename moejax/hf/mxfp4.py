"""gpt-oss's MXFP4 expert weights read as the tensors they stand for, the numbers transformers'
own dequantizer (integrations/mxfp4.py, convert_moe_packed_tensors) makes of them.

openai's gpt-oss checkpoints (config.json quantization_config {"quant_method": "mxfp4"}) store
each MoE layer's mlp.experts.gate_up_proj and down_proj as two uint8 tensors (OCP Microscaling
FP4):
  X_blocks [E, rows, G, 16]  G blocks of 32 E2M1 values per row, two a byte: value 2j in byte
                             j's low nibble, value 2j + 1 in its high one; a nibble is a sign
                             bit (8) and an index into the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6
  X_scales [E, rows, G]      each block's E8M0 scale s: its values times 2 ** (s - 127)
for HF tensor X [E, G * 32, rows], the blocks running along X's middle (input) axis:
gate_up_proj [E, d, 2f] (gate and up interleaved on the last axis) as blocks [E, 2f, d/32, 16],
down_proj [E, f, d] as blocks [E, d, f/32, 16].

Every such value (two significant bits times 2 ** -128 .. 2 ** 130) is a bfloat16 exactly, and
those past bfloat16's range are inf in both transformers' result and ours, so bfloat16 is the
default output: the same numbers as float32 in half the memory, which matters at gpt-oss-120b's
size (one layer's gate_up_proj is 128 x 2880 x 5760 values: 4.2 GB in bfloat16, 8.5 in float32).
One tensor (or one expert's slice of it) is made at a time, in chunks of blocks, so the working
memory beyond the output stays a few MB.
"""

import functools

import ml_dtypes
import numpy as np

from moejax.config_lib import ConfigError

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
BIAS = 127  # E8M0's exponent bias
BLOCK = 32  # values sharing one scale
PARTS = ("_blocks", "_scales")
DTYPES = (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32))
CHUNK = 1 << 12  # blocks per gather: temporaries of ~1 MB, which the caches hold


def hf_name(name: str) -> str | None:
    """The HF tensor a checkpoint tensor is half of: "..._blocks" or "..._scales" -> "...";
    None for any other name."""
    for part in PARTS:
        if name.endswith(part):
            return name.removesuffix(part)
    return None


def packed_names(name: str) -> tuple[str, str]:
    """HF tensor X -> the checkpoint's (X_blocks, X_scales)."""
    return f"{name}_blocks", f"{name}_scales"


def hf_shape(blocks_shape) -> tuple:
    """[..., rows, G, 16] -> the HF tensor's [..., G * 32, rows]."""
    *lead, rows, groups, _ = blocks_shape
    return (*lead, groups * BLOCK, rows)


@functools.cache
def byte_table(dtype) -> np.ndarray:
    """[256 scales, 256 bytes, 2]: the (low-nibble, high-nibble) values a byte stands for under a
    scale. ldexp is exact (no 0 * inf): 0 stays 0 under scale 255, as in transformers."""
    nibbles = np.arange(256)[:, None] >> np.array([0, 4]) & 0xF  # [byte, (low, high)]
    exps = np.arange(256)[:, None, None] - BIAS
    with np.errstate(over="ignore"):  # 2 ** 128 and up: inf, as in transformers
        table = np.ldexp(E2M1[nibbles][None], exps)
    out = table.astype(dtype)
    out.flags.writeable = False
    return out


def pair_table(dtype) -> np.ndarray:
    """byte_table as one flat array of value pairs, indexed by scale * 256 + byte: each pair an
    unsigned integer twice the dtype's width, so one np.take makes both values of a byte (ten
    times faster than indexing the 3-D table)."""
    table = byte_table(dtype)
    return table.view(f"u{2 * table.itemsize}").reshape(-1)


def dequantize(blocks: np.ndarray, scales: np.ndarray, dtype=ml_dtypes.bfloat16) -> np.ndarray:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> [..., G * 32] of `dtype` (bfloat16 or
    float32: the same numbers), in the blocks' own order (no transpose)."""
    if np.dtype(dtype) not in DTYPES:
        raise ValueError(f"dtype {np.dtype(dtype)}: want bfloat16 or float32")
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise ValueError(f"blocks {blocks.dtype}, scales {scales.dtype}: want uint8 both")
    if blocks.shape[-1:] != (BLOCK // 2,) or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"blocks {blocks.shape}, scales {scales.shape}: want [..., G, 16] "
                         "and [..., G]")
    pairs = pair_table(np.dtype(dtype))
    flat_blocks, flat_scales = blocks.reshape(-1, BLOCK // 2), scales.reshape(-1)
    out = np.empty((flat_scales.size, BLOCK // 2), pairs.dtype)
    for start in range(0, flat_scales.size, CHUNK):
        rows = slice(start, start + CHUNK)
        index = flat_scales[rows, None].astype(np.uint16) << 8 | flat_blocks[rows]
        np.take(pairs, index, out=out[rows])
    return out.view(dtype).reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK)


def hf_tensor(blocks: np.ndarray, scales: np.ndarray, dtype=ml_dtypes.bfloat16) -> np.ndarray:
    """blocks [E, rows, G, 16] and scales [E, rows, G] (or one expert's [rows, G, 16] and
    [rows, G]) -> HF tensor [E, G * 32, rows] (or [G * 32, rows]) as transformers loads it: the
    dequantized rows transposed (a view, not a copy)."""
    return np.swapaxes(dequantize(blocks, scales, dtype), -1, -2)


class Dequantized:
    """A gpt-oss MXFP4 checkpoint's tensors (a files.Tensors) seen as the bfloat16 tensors they
    stand for: X for each X_blocks + X_scales pair; `files`, `shape`, `dtype` and `get` as
    Tensors has them. Every pair is checked from the headers before any data is read."""

    def __init__(self, tensors, qc: dict):
        if qc.get("quant_method") != "mxfp4":
            raise ConfigError(f"config.json quantization_config.quant_method="
                              f"{qc.get('quant_method')!r}: not mxfp4; allowed: mxfp4")
        self.tensors, self.files, self.packed = tensors, dict(tensors.files), set()
        for name in tensors.files:
            x = hf_name(name)
            if x is None:
                continue
            blocks, scales = packed_names(x)
            if blocks not in tensors.files or scales not in tensors.files:
                raise ConfigError(f"tensor {name}: no {scales if name == blocks else blocks} "
                                  "beside it; allowed: MXFP4 X_blocks and X_scales in pairs")
            if name == scales:
                continue
            b, s = tensors.shape(blocks), tensors.shape(scales)
            dtypes = tensors.dtype(blocks), tensors.dtype(scales)
            if dtypes != ("U8", "U8") or len(b) < 3 or b[-1] != BLOCK // 2 or b[:-1] != s:
                raise ConfigError(f"tensors {blocks} / {scales} are {dtypes[0]} {list(b)} / "
                                  f"{dtypes[1]} {list(s)}; allowed: U8 [..., rows, G, 16] and "
                                  "U8 [..., rows, G] (MXFP4 as gpt-oss stores it)")
            del self.files[blocks], self.files[scales]
            self.files[x] = tensors.files[blocks]
            self.packed.add(x)

    def dtype(self, name) -> str:
        return "BF16" if name in self.packed else self.tensors.dtype(name)

    def shape(self, name):
        if name in self.packed:
            return hf_shape(self.tensors.shape(packed_names(name)[0]))
        return self.tensors.shape(name)

    def get(self, name) -> np.ndarray:
        if name not in self.packed:
            return self.tensors.get(name)
        blocks, scales = packed_names(name)
        return hf_tensor(self.tensors.get(blocks), self.tensors.get(scales))
