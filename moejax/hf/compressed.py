"""Weight-only quantized Hugging Face checkpoints, in the compressed-tensors format that
transformers reads with the compressed-tensors package: `convert to-hf --quantize` writes the
routed experts' Linear weights so, `convert from-hf` reads them back.

Written in format pack-quantized: what compressed-tensors itself picks for an integer
weight-only scheme of 1-8 bits (its int-quantized is for W8A8: its model-free dequantizer and
vLLM's WNA16 scheme take weight-only int8 as pack-quantized only). Per module <m> of w [out, in]:
  <m>.weight_packed  int32 [out, in * bits / 32]: q + 2**(bits - 1) as unsigned bits, element i
                     of a row at bits i * bits of the row's bit string (word i // (32 / bits),
                     least significant first), as compressed-tensors' pack_to_int32 lays them
  <m>.weight_scale   float32 [out, in / group]: int8 one per output channel (strategy channel,
                     [out, 1]), int4 one per quant.weight_group inputs (strategy group);
                     float32 whatever --dtype (loaders cast them to the model's dtype)
  <m>.weight_shape   int64 [2]: [out, in]
with w = q * scale, q = round(w / scale) symmetric in [-127, 127] / [-7, 7]: moejax's own
quantization (quant.quantize_weight), the numbers `generate --quantize` runs with. Read: that,
and int-quantized's <m>.weight int8 + <m>.weight_scale.
"""

import re

import jax.numpy as jnp
import numpy as np

from moejax.config_lib import ConfigError
from moejax.moe import quant

BITS = {"int8": 8, "int4": 4}
FORMATS = ("pack-quantized", "int-quantized")  # what from-hf reads


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """q: int [..., n] in [-2**(bits-1), 2**(bits-1)) -> int32 [..., ceil(n * bits / 32)]."""
    per = 32 // bits
    u = (q.astype(np.int64) + (1 << (bits - 1))).astype(np.uint32)
    u = np.pad(u, [(0, 0)] * (u.ndim - 1) + [(0, -u.shape[-1] % per)])
    u = u.reshape(*u.shape[:-1], -1, per) << (bits * np.arange(per, dtype=np.uint32))
    return u.sum(-1, dtype=np.uint32).view(np.int32)  # disjoint bits: the sum is the or


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """pack's inverse: int32 [..., words] -> int8 [..., n]."""
    u = np.ascontiguousarray(packed).view(np.uint32)[..., None]
    u = (u >> (bits * np.arange(32 // bits, dtype=np.uint32))) & ((1 << bits) - 1)
    u = u.reshape(*packed.shape[:-1], -1)[..., :n]
    return (u.astype(np.int16) - (1 << (bits - 1))).astype(np.int8)


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """q: int [out, in], scale [out, groups] -> float32 [out, in]: q times its group's scale."""
    group = -(-q.shape[-1] // scale.shape[-1])
    scale = np.repeat(scale.astype(np.float32), group, -1)[..., :q.shape[-1]]
    return q.astype(np.float32) * scale


class Quantizer:
    """to-hf --quantize `how`: a routed expert's [out, in] weight becomes its compressed-tensors
    tensors; counts bytes (before: at the files' dtype) and collects what config.json says."""

    def __init__(self, how: str, file_dtype):
        self.how, self.dtype = how, np.dtype(file_dtype)
        self.groups, self.ignore = {}, {"lm_head"}  # int4 group size (int8: None) -> modules
        self.bytes = {"experts": [0, 0], "all": [0, 0]}  # before, after

    def __call__(self, name: str, w: np.ndarray, expert: bool) -> dict:
        before = w.size * self.dtype.itemsize
        if not expert:
            if w.ndim == 2:  # a Linear (or the embedding) left as it is
                self.ignore.add(name.removesuffix(".weight"))
            self.bytes["all"][0] += before
            self.bytes["all"][1] += before
            return {name: w.astype(self.dtype)}
        m = name.removesuffix(".weight")
        qa = quant.quantize_weight(jnp.asarray(w), self.how, -1)  # eager, as generate's
        q, scale = np.asarray(qa.qvalue).astype(np.int8), np.asarray(qa.scale, np.float32)
        out = {f"{m}.weight_packed": pack(q, BITS[self.how]), f"{m}.weight_scale": scale,
               f"{m}.weight_shape": np.array(w.shape, np.int64)}
        after = sum(t.nbytes for t in out.values())
        group = w.shape[-1] // scale.shape[-1] if self.how == "int4" else None  # int8: a row
        self.groups.setdefault(group, set()).add(m)
        for key in self.bytes:
            self.bytes[key][0] += before
            self.bytes[key][1] += after
        return out

    def config(self) -> dict:
        """config.json's quantization_config. One group targets `re:.*experts.*` (every
        routed expert's projection, not Qwen2-MoE's shared_expert; vLLM's fused MoE layers
        need gate, up and down in one scheme: true for all released models); projections with
        different group sizes (int4 where d_model and d_ff give different gcds with 128)
        get a group each, targeting them by projection name (gate/up vs down), or by module
        name where one projection name has two sizes. `ignore` names every other Linear."""
        items = sorted(self.groups.items(), key=lambda g: g[0] or 0)
        projs = [{m.rsplit(".", 1)[-1] for m in modules} for _, modules in items]
        by_module = sum(map(len, projs)) > len(set().union(*projs))
        groups = {}
        for i, ((group, modules), names) in enumerate(zip(items, projs, strict=True)):
            weights = {"num_bits": BITS[self.how], "type": "int", "symmetric": True,
                       "strategy": "group" if self.how == "int4" else "channel",
                       "group_size": group, "dynamic": False}
            targets = (["re:.*experts.*"] if len(items) == 1 else sorted(modules) if by_module
                       else [rf"re:.*experts.*\.({'|'.join(sorted(names))})$"])
            groups[f"group_{i}"] = {"targets": targets, "weights": weights,
                                    "input_activations": None, "output_activations": None,
                                    "format": "pack-quantized"}
        return {"quant_method": "compressed-tensors", "format": "pack-quantized",
                "quantization_status": "compressed", "config_groups": groups,
                "ignore": sorted(self.ignore), "kv_cache_scheme": None,
                "sparsity_config": {}, "transform_config": {}}

    def line(self) -> str:
        (eb, ea), (ab, aa) = self.bytes["experts"], self.bytes["all"]
        return (f"routed experts {eb / 2**20:,.2f} -> {ea / 2**20:,.2f} MiB ({self.how} "
                f"weight-only, scales included, 1/{eb / max(ea, 1):.2f}); all weights "
                f"{ab / 2**20:,.2f} -> {aa / 2**20:,.2f} MiB")


def check_config(qc: dict) -> dict:
    """config.json's quantization_config, if from-hf can read it: {group name: its weights'
    scheme}; otherwise one line naming the key and what is allowed."""
    def refuse(key, value, allowed):
        raise ConfigError(f"config.json quantization_config{key}={value!r}: not supported; "
                          f"allowed: {allowed}")

    if not isinstance(qc, dict):
        refuse("", qc, "an object, as compressed-tensors writes it")
    if qc.get("quant_method") != "compressed-tensors":
        refuse(".quant_method", qc.get("quant_method"), "compressed-tensors")
    if qc.get("format") not in FORMATS:
        refuse(".format", qc.get("format"), " or ".join(FORMATS))
    schemes = {}
    for name, g in (qc.get("config_groups") or {}).items():
        w = g.get("weights") or {}
        if g.get("format") not in (None, *FORMATS):
            refuse(f".config_groups.{name}.format", g.get("format"), " or ".join(FORMATS))
        group = w.get("group_size")
        for key, ok, allowed in [("type", w.get("type") == "int", "int"),
                                 ("num_bits", w.get("num_bits") in (4, 8), "4 or 8"),
                                 ("symmetric", w.get("symmetric") is True, "true"),
                                 ("strategy", w.get("strategy") in ("channel", "group"),
                                  "channel or group"),
                                 ("group_size", w.get("strategy") != "group" or (
                                     isinstance(group, int) and not isinstance(group, bool)
                                     and group > 0), "an integer > 0 (strategy group)")]:
            if not ok:
                refuse(f".config_groups.{name}.weights.{key}", w.get(key), allowed)
        schemes[name] = w
    return schemes


def matches(module: str, target: str) -> bool:
    """compressed-tensors' rule: `re:` a regex matched at the start, `Linear` the class (every
    module with a packed weight is one), otherwise the exact name."""
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target in ("Linear", module)


class Dequantized:
    """A quantized checkpoint's tensors (a convert.Tensors) seen as the float tensors they
    stand for: <m>.weight = q * scale, unpacked from <m>.weight_packed or int-quantized's
    int8 <m>.weight; `files`, `shape`, `dtype` and `get` as Tensors has them. Every module's
    tensors are checked against the scheme of the group that targets it (bit width, scale
    groups) from their headers: a header that disagrees with its data would dequantize to
    other numbers without a word."""

    def __init__(self, tensors, qc: dict):
        schemes = check_config(qc)
        groups = qc.get("config_groups") or {}
        self.tensors, self.files, self.bits = tensors, dict(tensors.files), {}
        for name in tensors.files:
            m, _, part = name.rpartition(".")
            if part == "weight_packed":
                for extra in ("weight_scale", "weight_shape"):
                    if f"{m}.{extra}" not in tensors.files:
                        raise ConfigError(f"tensor {name}: no {m}.{extra} beside it; allowed: "
                                          "a pack-quantized module's three tensors")
                    del self.files[f"{m}.{extra}"]
                del self.files[name]
                self.files[f"{m}.weight"] = tensors.files[name]
                found = [g for g, s in groups.items()
                         if any(matches(m, t) for t in s.get("targets", ()))]
                if not found:
                    raise ConfigError(f"tensor {name}: no quantization_config.config_groups "
                                      "target matches it; allowed: a module some group targets")
                self.bits[f"{m}.weight"] = schemes[found[0]]["num_bits"]
                self.check_packed(m, found[0], schemes[found[0]])
            elif part == "weight_scale" and f"{m}.weight" in tensors.files:
                del self.files[name]  # int-quantized: int8 weight, float scale
                self.bits[f"{m}.weight"] = 8
                if tensors.dtype(f"{m}.weight") != "I8":
                    raise ConfigError(f"tensor {m}.weight is {tensors.dtype(f'{m}.weight')} "
                                      "beside a weight_scale; allowed: I8 (int-quantized)")

    def check_packed(self, m: str, group: str, scheme: dict):
        """<m>'s packed words, scale and shape agree with each other and with `scheme`."""
        t = self.tensors
        dtypes = [t.dtype(f"{m}.{p}") for p in ("weight_packed", "weight_shape", "weight_scale")]
        if dtypes[0] != "I32" or dtypes[1] not in ("I64", "I32") or not dtypes[2].startswith(
                ("F", "BF")):
            raise ConfigError(f"tensor {m}.weight_packed / _shape / _scale are {', '.join(dtypes)}"
                              "; allowed: I32, I64, a float (pack-quantized)")
        shape = [int(s) for s in t.get(f"{m}.weight_shape").reshape(-1)]
        if len(shape) != 2 or min(shape) < 1:
            raise ConfigError(f"tensor {m}.weight_shape={shape}: not [out, in]; allowed: two "
                              "sizes >= 1")
        (out, n), bits = shape, scheme["num_bits"]
        packed = [out, -(-n * bits // 32)]
        if list(t.shape(f"{m}.weight_packed")) != packed:
            raise ConfigError(
                f"tensor {m}.weight_packed is {list(t.shape(f'{m}.weight_packed'))}, and "
                f"quantization_config.config_groups.{group}.weights.num_bits={bits} packs "
                f"weight_shape {shape} into {packed}; allowed: the bit width it was packed with")
        scale = [out, 1 if scheme["strategy"] == "channel" else -(-n // scheme["group_size"])]
        if list(t.shape(f"{m}.weight_scale")) != scale:
            raise ConfigError(
                f"tensor {m}.weight_scale is {list(t.shape(f'{m}.weight_scale'))}, and "
                f"quantization_config.config_groups.{group}.weights (strategy "
                f"{scheme['strategy']}, group_size {scheme.get('group_size')}) makes it {scale}; "
                "allowed: the scheme it was quantized with")

    def dtype(self, name) -> str:
        return "F32" if name in self.bits else self.tensors.dtype(name)

    def shape(self, name):
        m = name.removesuffix(".weight")
        if name in self.bits and f"{m}.weight_shape" in self.tensors.files:
            return tuple(int(s) for s in self.tensors.get(f"{m}.weight_shape"))
        return self.tensors.shape(name)

    def get(self, name) -> np.ndarray:
        if name not in self.bits:
            return self.tensors.get(name)
        m = name.removesuffix(".weight")
        scale = self.tensors.get(f"{m}.weight_scale")
        if f"{m}.weight_packed" in self.tensors.files:
            out, n = self.shape(name)
            q = unpack(self.tensors.get(f"{m}.weight_packed"), self.bits[name], n)[:out]
        else:
            q = self.tensors.get(name)
        return dequantize(q, scale.reshape(q.shape[0], -1))
