"""MXFP4 dequantization (moejax/hf/mxfp4.py) against transformers' own (committed outputs of its
convert_moe_packed_tensors, tests/fixtures/mxfp4_reference.npz), hand-computed E2M1 values,
and the two gpt-oss fixture checkpoints, which hold one model: bf16 and MXFP4-packed experts.
Fixtures: tests/fixtures/make_gpt_oss_fixtures.py."""

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from moejax.config_lib import ConfigError
from moejax.hf import mxfp4
from moejax.hf.files import Tensors, read_json

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = np.load(FIXTURES / "mxfp4_reference.npz")
DTYPES = (ml_dtypes.bfloat16, np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["all", "gate_up", "down"])
def test_matches_transformers(case, dtype):
    """all: every nibble at even and odd positions under every scale 0..255 (inf where the value
    overflows, as in transformers); gate_up / down: random bytes, finite scales 0..252, in
    gpt-oss's [E, rows, G, 16] shapes with G = 3 and 2."""
    blocks, scales = REFERENCE[f"{case}_blocks"], REFERENCE[f"{case}_scales"]
    want = REFERENCE[f"{case}_out"]
    got = mxfp4.hf_tensor(blocks, scales, dtype)
    assert got.dtype == dtype and got.shape == want.shape == mxfp4.hf_shape(blocks.shape)
    np.testing.assert_array_equal(got.astype(np.float32), want)
    assert np.array_equal(np.signbit(got.astype(np.float32)), np.signbit(want))  # -0 too
    if case != "all":
        assert np.isfinite(want).all() and set(np.unique(scales)) >= {0, 252}


def test_all_nibbles_and_scales_covered():
    blocks = REFERENCE["all_blocks"]
    assert set(np.unique(blocks & 15)) == set(np.unique(blocks >> 4)) == set(range(16))
    assert set(np.unique(REFERENCE["all_scales"])) == set(range(256))
    assert np.isinf(REFERENCE["all_out"]).any()  # scales 253..255 overflow the larger values


def test_hand_computed_values():
    """E2M1 (0, 0.5, 1, 1.5, 2, 3, 4, 6; nibbles 8..15 the negatives) times 2 ** (scale - 127);
    value 2j in byte j's low nibble, 2j + 1 in its high nibble."""
    nibbles = np.arange(16, dtype=np.uint8)
    block = nibbles[0::2] | (nibbles[1::2] << 4)  # values in nibble order 0..15
    e2m1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    for scale, factor in [(127, 1.0), (128, 2.0), (130, 8.0), (125, 0.25), (0, 2.0**-127),
                          (252, 2.0**125)]:
        blocks = np.tile(block, 2).reshape(1, 1, 16)  # one block: nibbles 0..15 twice
        got = mxfp4.dequantize(blocks, np.array([[scale]], np.uint8), np.float32)[0]
        want = np.array(e2m1 * 2) * factor
        np.testing.assert_array_equal(got, want.astype(np.float32))
        assert np.signbit(got[8]) and not np.signbit(got[0])
    # two bytes by hand: 0x72 = (low 2, high 7) = (1, 6); 0xF9 = (low 9, high 15) = (-0.5, -6)
    blocks = np.zeros((1, 16), np.uint8)
    blocks[0, :2] = 0x72, 0xF9
    got = mxfp4.dequantize(blocks, np.array([128], np.uint8))  # times 2
    assert got.dtype == ml_dtypes.bfloat16 and got.shape == (32,)
    assert got[:4].astype(np.float32).tolist() == [2.0, 12.0, -1.0, -12.0]
    assert not got[4:].astype(np.float32).any()


def test_hf_layout_and_one_expert():
    """X[e, g * 32 + i, r] is value i of block g of row r of expert e; one expert's slice
    dequantizes to that expert's slice of the whole; chunks of blocks change nothing."""
    blocks, scales = REFERENCE["gate_up_blocks"], REFERENCE["gate_up_scales"]
    whole = mxfp4.hf_tensor(blocks, scales, np.float32)
    e, r, g, j = 2, 5, 1, 7
    low, high = blocks[e, r, g, j] & 15, blocks[e, r, g, j] >> 4
    factor = 2.0 ** (int(scales[e, r, g]) - 127)
    assert whole[e, g * 32 + 2 * j, r] == mxfp4.E2M1[low] * factor
    assert whole[e, g * 32 + 2 * j + 1, r] == mxfp4.E2M1[high] * factor
    np.testing.assert_array_equal(mxfp4.hf_tensor(blocks[e], scales[e], np.float32), whole[e])


def test_chunks(monkeypatch):
    blocks, scales = REFERENCE["down_blocks"], REFERENCE["down_scales"]
    monkeypatch.setattr(mxfp4, "CHUNK", 5)  # 48 blocks: 10 chunks, the last one short
    got = mxfp4.hf_tensor(blocks, scales)
    np.testing.assert_array_equal(got.astype(np.float32), REFERENCE["down_out"])


def test_names():
    x = "model.layers.3.mlp.experts.gate_up_proj"
    assert mxfp4.hf_name(f"{x}_blocks") == mxfp4.hf_name(f"{x}_scales") == x
    assert mxfp4.packed_names(x) == (f"{x}_blocks", f"{x}_scales")
    for other in (f"{x}_bias", x, "model.layers.3.mlp.router.weight"):
        assert mxfp4.hf_name(other) is None
    assert mxfp4.hf_shape((128, 5760, 90, 16)) == (128, 2880, 5760)  # gpt-oss-120b gate_up


def test_refuses_bad_inputs():
    with pytest.raises(ValueError, match="uint8"):
        mxfp4.dequantize(np.zeros((2, 16), np.int8), np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match=r"\[\.\.\., G\]"):
        mxfp4.dequantize(np.zeros((2, 16), np.uint8), np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        mxfp4.dequantize(np.zeros((2, 16), np.uint8), np.zeros(2, np.uint8), np.float16)


def test_fixture_checkpoints_hold_one_model():
    """The MXFP4 folder, dequantized, is the bf16 folder tensor for tensor, bit for bit."""
    hf = FIXTURES / "hf"
    qc = read_json(str(hf / "gpt_oss_mxfp4" / "config.json"))["quantization_config"]
    packed = mxfp4.Dequantized(Tensors(str(hf / "gpt_oss_mxfp4")), qc)
    plain = Tensors(str(hf / "gpt_oss"))
    assert sorted(packed.files) == sorted(plain.files)
    assert len(packed.packed) == 8  # 4 layers x (gate_up_proj, down_proj)
    for name in plain.files:
        assert (packed.dtype(name), packed.shape(name)) == (plain.dtype(name), plain.shape(name))
        got, want = packed.get(name), plain.get(name)
        assert got.dtype == want.dtype and np.array_equal(got.view(np.uint16),
                                                          want.view(np.uint16)), name


class Headers:
    """Just the headers a Dequantized checks."""

    def __init__(self, headers):
        self.headers, self.files = headers, dict.fromkeys(headers, "model.safetensors")

    def dtype(self, name):
        return self.headers[name][0]

    def shape(self, name):
        return self.headers[name][1]


@pytest.mark.parametrize("headers,match", [
    ({"x_blocks": ("U8", (4, 2, 16))}, "no x_scales beside it"),
    ({"x_scales": ("U8", (4, 2))}, "no x_blocks beside it"),
    ({"x_blocks": ("U8", (4, 2, 16)), "x_scales": ("U8", (4, 3))}, "allowed: U8"),
    ({"x_blocks": ("I8", (4, 2, 16)), "x_scales": ("U8", (4, 2))}, "allowed: U8"),
    ({"x_blocks": ("U8", (4, 2, 8)), "x_scales": ("U8", (4, 2))}, "allowed: U8"),
])
def test_refuses_bad_checkpoints(headers, match):
    with pytest.raises(ConfigError, match=match):
        mxfp4.Dequantized(Headers(headers), {"quant_method": "mxfp4"})
    with pytest.raises(ConfigError, match="not mxfp4"):
        mxfp4.Dequantized(Headers({}), {"quant_method": "fp8"})
