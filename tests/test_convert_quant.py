"""convert to-hf --quantize and from-hf of compressed-tensors checkpoints (moejax/hf/compressed.py):
the written tensors against NumPy, the round trip against params.quantize_experts, and our
dequantization against what compressed-tensors itself makes of the same export
(tests/fixtures/make_compressed_tensors_fixture.py)."""

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx
from safetensors.numpy import save_file

from moejax import convert
from moejax.config_lib import ConfigError
from moejax.hf import compressed
from moejax.hf.convert import Tensors
from moejax.moe import quant
from moejax.run import params
from tests.test_convert import FIXTURES, load_model, tensors

NAME = "qwen2_moe"  # routed experts, and a shared expert that must stay float
SRC = os.path.join(FIXTURES, NAME)
HERE = os.path.dirname(os.path.abspath(__file__))
MESH = {"fsdp": 2, "expert": 4}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("quant") / "run")
    convert.from_hf(SRC, work, MESH)
    return work


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """int8 / int4 -> (the folder to-hf wrote, at the imported bfloat16, and what it printed)."""
    out = {}
    for how in ("int8", "int4"):
        folder, printed = str(tmp_path_factory.mktemp(how)), io.StringIO()
        with contextlib.redirect_stdout(printed):
            convert.to_hf(run, folder, quantize=how)
        out[how] = folder, printed.getvalue()
    return out


def unpack_reference(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """compressed-tensors' layout, value by value: a row's int32 words are one bit string,
    word 0 lowest; value j is its bits [j * bits, (j + 1) * bits), less 2**(bits - 1)."""
    rows = []
    for row in packed.astype(np.int64) & 0xFFFFFFFF:
        bitstring = sum(int(word) << (32 * i) for i, word in enumerate(row))
        rows.append([(bitstring >> (j * bits) & (1 << bits) - 1) - (1 << bits - 1)
                     for j in range(n)])
    return np.array(rows)


def assert_rounded(q: np.ndarray, x: np.ndarray):
    """q == round(x), except that within 1e-4 of a tie (bfloat16 weights make some ratios
    k + 1/2 to a few ulps) either neighbour is right."""
    tie = np.abs(np.abs(x - np.floor(x)) - 0.5) < 1e-4
    np.testing.assert_array_equal(q[~tie], np.round(x[~tie]))
    assert (np.abs(q - x)[tie] <= 0.5 + 1e-4).all()


def is_routed(name):
    return ".mlp.experts." in name


def test_int8_tensors_are_the_rounded_weights_over_row_absmax(exported):
    got, ref = tensors(exported["int8"][0]), tensors(SRC)
    m = "model.layers.1.mlp.experts.3.gate_proj"
    w = ref[f"{m}.weight"].astype(np.float32)  # [16, 32], as imported (exactly: bf16 values)
    absmax = np.abs(w).max(1, keepdims=True)
    assert got[f"{m}.weight_packed"].dtype == np.int32
    assert got[f"{m}.weight_packed"].shape == (16, 32 // 4)
    q = unpack_reference(got[f"{m}.weight_packed"], 8, 32)
    assert_rounded(q, w / (absmax / 127))
    assert q.min() >= -127 and q.max() <= 127 and (np.abs(q).max(1) == 127).all()
    scale = got[f"{m}.weight_scale"]
    assert (scale.shape, scale.dtype) == ((16, 1), np.float32)
    np.testing.assert_allclose(scale, absmax / 127, rtol=1e-6)
    assert got[f"{m}.weight_shape"].tolist() == [16, 32]


def test_int4_tensors_unpack_to_moejax_quantization(exported):
    got, ref = tensors(exported["int4"][0]), tensors(SRC)
    for m, (out, n) in [("model.layers.0.mlp.experts.5.down_proj", (32, 16)),
                        ("model.layers.1.mlp.experts.0.up_proj", (16, 32))]:
        w = ref[f"{m}.weight"].astype(np.float32)
        qa = quant.quantize_weight(jnp.asarray(w), "int4", -1)
        group = quant.weight_group(n, "int4")
        assert got[f"{m}.weight_packed"].shape == (out, n // 8)
        q = unpack_reference(got[f"{m}.weight_packed"], 4, n)
        np.testing.assert_array_equal(q, np.asarray(qa.qvalue).astype(np.int8))
        assert q.min() >= -7 and q.max() <= 7
        assert got[f"{m}.weight_scale"].shape == (out, n // group)
        np.testing.assert_array_equal(got[f"{m}.weight_scale"], np.asarray(qa.scale))
        assert got[f"{m}.weight_shape"].tolist() == [out, n]


def test_int4_groups_of_a_row_against_numpy():
    """256 inputs: two groups of 128 a row, each with its own absmax / 7; 12 inputs: groups
    of 4, packed into one and a half words."""
    rng = np.random.default_rng(1)
    for shape, group in [((6, 256), 128), ((5, 12), 4)]:
        w = (rng.normal(size=shape) * 10.0 ** rng.uniform(-2, 1, shape[:1] + (1,)))
        w = w.astype(np.float32)
        t = compressed.Quantizer("int4", np.float32)("x.experts.0.w1.weight", w, True)
        absmax = np.abs(w.reshape(shape[0], -1, group)).max(-1)
        np.testing.assert_allclose(t["x.experts.0.w1.weight_scale"], absmax / 7, rtol=1e-6)
        q = unpack_reference(t["x.experts.0.w1.weight_packed"], 4, shape[1])
        assert_rounded(q, w / np.repeat(absmax / 7, group, 1))
        assert t["x.experts.0.w1.weight_packed"].shape == (shape[0], -(-shape[1] // 8))
        np.testing.assert_array_equal(compressed.unpack(t["x.experts.0.w1.weight_packed"], 4,
                                                      shape[1]), q)


def test_one_group_where_the_group_sizes_agree():
    """d_model and d_ff multiples of 128 (every released model): one int4 group of 128 that
    targets every routed expert, the config vLLM takes for its fused MoE layers."""
    quantizer = compressed.Quantizer("int4", np.float32)
    rng = np.random.default_rng(2)
    for proj, shape in [("gate_proj", (128, 256)), ("up_proj", (128, 256)),
                        ("down_proj", (256, 128))]:
        w = rng.normal(size=shape).astype(np.float32)
        quantizer(f"model.layers.0.mlp.experts.0.{proj}.weight", w, True)
    quantizer("model.layers.0.mlp.gate.weight", np.zeros((4, 256), np.float32), False)
    qc = quantizer.config()
    assert list(qc["config_groups"]) == ["group_0"]
    group = qc["config_groups"]["group_0"]
    assert (group["targets"], group["weights"]["group_size"]) == (["re:.*experts.*"], 128)
    assert qc["ignore"] == ["lm_head", "model.layers.0.mlp.gate"]


@pytest.mark.parametrize("how", ["int8", "int4"])
def test_the_export_and_its_config(exported, how):
    folder, printed = exported[how]
    got, ref = tensors(folder), tensors(SRC)
    with open(os.path.join(folder, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert (qc["quant_method"], qc["format"]) == ("compressed-tensors", "pack-quantized")
    groups = qc["config_groups"]
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
               "group_size": None, "dynamic": False}
    if how == "int8":
        assert list(groups) == ["group_0"]
        assert groups["group_0"]["targets"] == ["re:.*experts.*"]
        assert groups["group_0"]["weights"] == weights
    else:  # d_ff = 16 and d_model = 32: groups of 16 (down) and 32 (gate, up) inputs
        sizes = {g["weights"]["group_size"]: g["targets"] for g in groups.values()}
        assert sizes == {16: [r"re:.*experts.*\.(down_proj)$"],
                         32: [r"re:.*experts.*\.(gate_proj|up_proj)$"]}
        for g in groups.values():
            assert g["weights"] == dict(weights, num_bits=4, strategy="group",
                                        group_size=g["weights"]["group_size"])
    assert all(g["input_activations"] is None and g["format"] == "pack-quantized"
               for g in groups.values())
    # every other Linear (attention, router, the shared expert and its gate) ignored, by name
    others = {n.removesuffix(".weight") for n in ref if ref[n].ndim == 2 and not is_routed(n)}
    assert set(qc["ignore"]) == others | {"lm_head"}
    assert any("shared_expert." in m for m in others)
    for m in qc["ignore"]:
        assert not any(re.match(t[3:], m) for g in groups.values() for t in g["targets"]), m
    # routed experts: three tensors each, matched by exactly one group; the rest as imported
    for n in ref:
        m = n.removesuffix(".weight")
        if is_routed(n):
            assert f"{m}.weight" not in got
            assert {got[f"{m}.{p}"].dtype for p in ("weight_packed", "weight_shape")} == \
                {np.dtype(np.int32), np.dtype(np.int64)}
            assert sum(any(re.match(t[3:], m) for t in g["targets"])
                       for g in groups.values()) == 1
        else:
            assert got[n].tobytes() == ref[n].tobytes(), n
    parts = {"weight_packed", "weight_scale", "weight_shape"}
    assert {k for k in got if k.rsplit(".", 1)[1] in parts} == \
        {f"{n.removesuffix('.weight')}.{p}" for n in ref if is_routed(n) for p in parts}
    # the bytes before (at the files' bfloat16) and after, scales included
    before = sum(ref[n].nbytes for n in ref if is_routed(n))
    after = sum(got[k].nbytes for k in got if k.rsplit(".", 1)[1] in parts)
    total = sum(t.nbytes for t in ref.values())
    line = (f"routed experts {before / 2**20:,.2f} -> {after / 2**20:,.2f} MiB ({how} "
            f"weight-only, scales included, 1/{before / after:.2f}); all weights "
            f"{total / 2**20:,.2f} -> {(total - before + after) / 2**20:,.2f} MiB")
    assert printed.splitlines()[0].startswith("wrote step 0 of ")
    assert printed.splitlines()[1] == line


@pytest.mark.parametrize("how", ["int8", "int4"])
def test_round_trip_is_the_model_generate_quantizes(run, exported, tmp_path, how):
    """from-hf of the export: its routed experts are the dequantized int8 / int4 weights of
    params.quantize_experts (what generate --quantize runs), everything else the original;
    so are its logits."""
    back = str(tmp_path / "back")
    convert.from_hf(exported[how][0], back, MESH)
    _, got = load_model(back)
    _, ref = load_model(run)
    params.quantize_experts(ref, how)
    got_params = dict(nnx.to_flat_state(nnx.state(got, nnx.Param)))
    ref_params = dict(nnx.to_flat_state(nnx.state(ref, nnx.Param)))
    assert got_params.keys() == ref_params.keys()
    routed = 0
    for path, v in ref_params.items():
        want = v.get_value()
        if isinstance(want, qwix.QArray):
            routed += 1
            want = qwix.dequantize(want)
        np.testing.assert_array_equal(np.asarray(got_params[path].get_value()),
                                      np.asarray(want), err_msg=str(path))
    assert routed == 2  # w_in and w_out
    ids = np.load(os.path.join(SRC, "expected.npz"))["input_ids"]
    np.testing.assert_allclose(np.asarray(got(ids, train=False)[0]),
                               np.asarray(ref(ids, train=False)[0]), atol=1e-5, rtol=0)


def fixture_maker():
    path = os.path.join(HERE, "fixtures", "make_compressed_tensors_fixture.py")
    spec = importlib.util.spec_from_file_location("make_compressed_tensors_fixture", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("how", ["int8", "int4"])
def test_dequantization_equals_compressed_tensors_own(tmp_path, how):
    """The fixture's seeded weights, exported again: our reading of them equals what
    compressed-tensors' own decompressor made of them, value for value."""
    maker = fixture_maker()
    expected = np.load(os.path.join(HERE, "fixtures", "compressed_tensors.npz"))
    qc = maker.export(how, str(tmp_path))
    read = compressed.Dequantized(Tensors(str(tmp_path)), qc)
    names = sorted(k.split("/", 1)[1] for k in expected if k.startswith(f"{how}/"))
    assert sorted(read.files) == names == sorted(maker.weights())
    for n in names:
        assert read.shape(n) == expected[f"{how}/{n}"].shape
        np.testing.assert_array_equal(read.get(n), expected[f"{how}/{n}"], err_msg=n)


def test_int_quantized_reads_as_the_same_weights(tmp_path):
    """compressed-tensors' int-quantized layout (<m>.weight int8 + <m>.weight_scale) reads
    back to the same weights as the pack-quantized one."""
    maker = fixture_maker()
    packed_dir, int_dir = tmp_path / "packed", tmp_path / "int"
    packed_dir.mkdir(), int_dir.mkdir()
    qc = maker.export("int8", str(packed_dir))
    t = tensors(str(packed_dir))
    for k in [k for k in t if k.endswith(".weight_packed")]:
        m = k.removesuffix(".weight_packed")
        t[f"{m}.weight"] = compressed.unpack(t.pop(k), 8, int(t.pop(f"{m}.weight_shape")[1]))
    save_file(t, str(int_dir / "model.safetensors"))
    qc_int = dict(qc, format="int-quantized")
    packed = compressed.Dequantized(Tensors(str(packed_dir)), qc)
    read = compressed.Dequantized(Tensors(str(int_dir)), qc_int)
    assert sorted(read.files) == sorted(packed.files)
    for n in packed.files:
        assert read.shape(n) == packed.shape(n)
        np.testing.assert_array_equal(read.get(n), packed.get(n), err_msg=n)


def edit_quantization(qc, group=None, **changes):
    if group:
        qc["config_groups"]["group_0"]["weights"].update(changes)
    else:
        qc.update(changes)


@pytest.mark.parametrize("edit,drop,message", [
    (dict(format="float-quantized"), None,
     "quantization_config.format='float-quantized': not supported; allowed: pack-quantized "
     "or int-quantized"),
    (dict(quant_method="gptq"), None,
     "quantization_config.quant_method='gptq': not supported; allowed: compressed-tensors"),
    (dict(group=True, symmetric=False), None,
     "config_groups.group_0.weights.symmetric=False: not supported; allowed: true"),
    (dict(group=True, num_bits=2), None,
     "config_groups.group_0.weights.num_bits=2: not supported; allowed: 4 or 8"),
    ({}, "model.layers.0.mlp.experts.2.up_proj.weight_shape",
     "tensor model.layers.0.mlp.experts.2.up_proj.weight_packed: no "
     "model.layers.0.mlp.experts.2.up_proj.weight_shape beside it"),
])
def test_bad_quantized_checkpoints_fail_in_one_line(exported, tmp_path, edit, drop, message):
    src = str(tmp_path / "src")
    shutil.copytree(exported["int8"][0], src)
    with open(os.path.join(src, "config.json")) as f:
        hf = json.load(f)
    edit_quantization(hf["quantization_config"], **edit)
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(hf, f)
    if drop:
        t = tensors(src)
        del t[drop]
        save_file(t, os.path.join(src, "model.safetensors"))
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        convert.from_hf(src, str(tmp_path / "run"), {"data": 1})
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "0")
    assert not os.path.exists(tmp_path / "run" / "hf")


def test_quantize_is_a_flag_of_to_hf_only(run, tmp_path):
    with pytest.raises(SystemExit) as e:
        convert.main(["convert", "from-hf", SRC, "--workdir", str(tmp_path / "w"),
                      "--quantize", "int8"])
    assert str(e.value.code) == ("error: --quantize: not a flag of from-hf; allowed: "
                                 "--workdir, --mesh")
    with pytest.raises(ConfigError, match="--quantize='int2': unknown; allowed: none, int8, "
                                          "int4"):
        convert.to_hf(run, str(tmp_path / "out"), quantize="int2")


def test_a_plain_export_of_a_quantized_import_is_not_quantized(exported, tmp_path):
    """The imported config.json's quantization_config does not outlive its weights."""
    back = str(tmp_path / "back")
    convert.from_hf(exported["int8"][0], back, MESH)
    with contextlib.redirect_stdout(io.StringIO()):
        convert.to_hf(back, str(tmp_path / "out"))
    with open(tmp_path / "out" / "config.json") as f:
        assert "quantization_config" not in json.load(f)
    assert not any(k.endswith("weight_packed") for k in tensors(str(tmp_path / "out")))


@pytest.mark.parametrize("how", ["int8", "int4"])
def test_transformers_loads_the_export(run, exported, how):
    """With torch, transformers and compressed-tensors installed (none is a moejax
    dependency): AutoModelForCausalLM reads the export and computes our quantized logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported[how][0],
                                                           dtype=torch.float32)
    _, ref = load_model(run)
    params.quantize_experts(ref, how)
    ids = np.load(os.path.join(SRC, "expected.npz"))["input_ids"]
    with torch.no_grad():
        theirs = hf(torch.tensor(ids).long()).logits.numpy()
    np.testing.assert_allclose(theirs, np.asarray(ref(ids, train=False)[0]), atol=1e-4, rtol=0)
