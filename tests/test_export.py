"""The whole train step of tiny:smoke as a TPU or a GPU runs it, lowered on this CPU machine
(`jax.export`), for each way assignments reach their experts.

An exported module names the source file of every op in its locations, so the CPU-only code
(moejax/moe/cpu.py) is absent exactly when no op of it was lowered; the CPU export is the
control that shows the check can fail.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from configs import tiny
from moejax import config_lib, parallel
from moejax.run import state

MESH = {"data": 2, "expert": 4}
CPU_CODE = "moejax/moe/cpu.py"


@functools.cache
def exported(dispatch: str, platform: str, quantization: str = "none") -> str:
    config = tiny.get_config("smoke")
    config.model.update(vocab_size=257, dispatch=dispatch, quantization=quantization)
    config.mesh.update(MESH)
    config.data.update(seq_len=128, batch_size=8)  # splash attention works in 128-row blocks
    config_lib.validate(config, jax.device_count())
    s = state.setup(config, parallel.make_mesh(MESH))
    tokens = jax.ShapeDtypeStruct((8, 129), jnp.int32, sharding=parallel.token_sharding(s.mesh))
    step = state.train_step_fn(s)
    # ragged_all_to_all is a custom call without a compatibility promise for serialized
    # exports; these are read here, never stored.
    unstable = [jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]
    return jax.export.export(step, platforms=(platform,), disabled_checks=unstable)(
        s.abstract, tokens, jnp.int32(0)).mlir_module()


def test_cpu_export_holds_the_cpu_experts():
    assert CPU_CODE in exported("capacity", "cpu")


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_capacity_path_is_one_batched_matmul_per_projection(platform):
    module = exported("capacity", platform)
    assert CPU_CODE not in module
    assert "batched_experts" in module  # moejax/moe/experts.py: XLA's batched dot
    assert "ragged_dot" not in module and "all_to_all" in module


@pytest.mark.parametrize("dispatch", ["dropless", "dropless_ring"])
def test_dropless_on_tpu_runs_the_megablox_kernel(dispatch):
    module = exported(dispatch, "tpu")
    assert CPU_CODE not in module and "ragged_dot" not in module
    assert "tpu_custom_call" in module and "megablox/gmm.py" in module
    assert ("ragged_all_to_all" in module) == (dispatch == "dropless")


@pytest.mark.parametrize("dispatch", ["dropless", "dropless_ring"])
def test_dropless_on_gpu_runs_ragged_dot(dispatch):
    module = exported(dispatch, "cuda")
    assert CPU_CODE not in module and "tpu_custom_call" not in module
    assert "chlo.ragged_dot" in module
    assert ("ragged_all_to_all" in module) == (dispatch == "dropless")
    if dispatch == "dropless_ring":
        assert "all_gather" in module and "reduce_scatter" in module


def test_attention_is_the_splash_kernel_on_tpu_only():
    assert "splash_attention_kernel.py" in exported("capacity", "tpu")
    for platform in ("cuda", "cpu"):  # cuDNN is chosen when traced on a GPU host (attention.py)
        assert "splash_attention_kernel.py" not in exported("capacity", platform)


QUANTIZED = {"int8": "xi8>", "fp8": "xf8E4M3FN>"}  # an operand's element type in the module


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("quantization", ["int8", "fp8"])
@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_quantized_experts_run_qwix_matmuls_of_the_quantized_type(dispatch, quantization,
                                                                  platform):
    """Quantized, the capacity experts are a batched dot_general and the dropless ones a
    ragged dot on every backend (moejax/moe/quant.py): megablox has no quantized form."""
    module = exported(dispatch, platform, quantization)
    op = "stablehlo.dot_general" if dispatch == "capacity" else '"chlo.ragged_dot"'
    matmuls = [line for line in module.splitlines()
               if op in line and QUANTIZED[quantization] in line]
    assert len(matmuls) >= 2, matmuls  # w_in and w_out
    assert "moejax/moe/quant.py" in module
    assert CPU_CODE not in module and "megablox/gmm.py" not in module
    assert ("ragged_all_to_all" in module) == (dispatch == "dropless")


@functools.cache
def exported_weight_only(name: str, platform: str) -> str:
    """The forward of tiny:smoke as generate runs it (dropless, eval) with its routed experts
    weight-only `name` (moejax/moe/quant.py), on the MESH."""
    from flax import nnx

    from moejax.run import params

    config = tiny.get_config("smoke")
    config.model.update(vocab_size=257, dispatch="dropless")
    config.mesh.update(MESH)
    config.data.update(seq_len=128, batch_size=8)
    s = state.setup(config, parallel.make_mesh(MESH))
    model = nnx.merge(s.graphdef, state.init(s)["params"])
    params.quantize_experts(model, name)
    graphdef, params = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((8, 128), jnp.int32, sharding=parallel.token_sharding(s.mesh))

    def forward(params, tokens):
        return nnx.merge(graphdef, params)(tokens, train=False)[0]

    unstable = [jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]
    return jax.export.export(jax.jit(forward), platforms=(platform,),
                             disabled_checks=unstable)(params, tokens).mlir_module()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_weight_only_experts_enter_as_their_integer_type(name, platform):
    """The program takes the experts' values as i8 / i4 (what a device holds between calls)
    and dequantizes them inside, where the float kernels of its backend then run."""
    module = exported_weight_only(name, platform)
    main = next(line for line in module.splitlines() if "func.func public @main" in line)
    assert main.count({"int8": "xi8>", "int4": "xi4>"}[name]) == 2, main  # w_in and w_out
    assert "round_nearest_even" not in module  # quantized once, outside: only dequantized
    assert CPU_CODE not in module
    kernel = "megablox/gmm.py" if platform == "tpu" else "chlo.ragged_dot"
    assert kernel in module


@functools.cache
def exported_mla(platform: str) -> tuple[str, str]:
    """deepseek_v3:smoke (latent attention, group-limited sigmoid routing, dropless, a
    multi-token prediction module) on the MESH: its train step, and one decode step over the
    compressed cache as generate runs it."""
    from flax import nnx

    from configs import deepseek_v3

    config = deepseek_v3.get_config("smoke")
    config.model.update(vocab_size=257, dispatch="dropless")
    config.mesh.update(fsdp=1, **MESH)
    config.data.update(seq_len=128, batch_size=8)
    config_lib.validate(config, jax.device_count())
    s = state.setup(config, parallel.make_mesh(MESH))
    tokens = jax.ShapeDtypeStruct((8, 129), jnp.int32, sharding=parallel.token_sharding(s.mesh))
    unstable = [jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]
    step = jax.export.export(state.train_step_fn(s), platforms=(platform,),
                             disabled_checks=unstable)(s.abstract, tokens, jnp.int32(0))

    def decode(params, token, start):
        model = nnx.merge(s.graphdef, params)
        return model.decode(token, start, model.init_cache(8, 256))[0]

    token = jax.ShapeDtypeStruct((8, 1), jnp.int32, sharding=parallel.token_sharding(s.mesh))
    start = jax.ShapeDtypeStruct((8,), jnp.int32, sharding=parallel.token_sharding(s.mesh))
    one = jax.export.export(jax.jit(decode), platforms=(platform,), disabled_checks=unstable)(
        s.abstract["params"], token, start)
    return step.mlir_module(), one.mlir_module()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_latent_attention_step_and_decode_export(platform):
    """The train step runs MLA through the backend's attention (splash on TPU) and the MTP
    module; decode reads the compressed cache [.., B, L, kv_lora_rank] and never a per-head
    one."""
    step, decode = exported_mla(platform)
    for module in (step, decode):
        assert "moejax/model/mla.py" in module and CPU_CODE not in module
    assert "moejax/model/mtp.py" in step
    assert ("splash_attention_kernel.py" in step) == (platform == "tpu")
    assert ("megablox/gmm.py" in step) == (platform == "tpu")
    assert ("chlo.ragged_dot" in step) == (platform == "cuda")
    # [repeats, period, B, L, kv_lora_rank] and [.., qk_rope_head_dim] of the 3-layer MoE stack
    assert "tensor<3x1x8x256x32xf32>" in decode and "tensor<3x1x8x256x8xf32>" in decode
    assert "x256x4x" not in decode  # no per-head [B, L, heads, ...] cache


@functools.cache
def exported_context(platform: str) -> str:
    """tiny:smoke's train step with the sequence split over context = 2 and packed documents
    (the batch dict of tokens, segments, loss_mask): 512 positions make halves of 128 rows,
    what splash needs per device."""
    config = tiny.get_config("smoke")
    config.model.update(vocab_size=257, dispatch="dropless")
    mesh = {"data": 2, "context": 2, "expert": 2}
    config.mesh.update(mesh)
    config.data.update(seq_len=512, batch_size=8)
    config_lib.validate(config, jax.device_count())
    s = state.setup(config, parallel.make_mesh(mesh))
    row = jax.ShapeDtypeStruct((8, 513), jnp.int32, sharding=parallel.token_sharding(s.mesh))
    batch = {"tokens": row, "segments": row, "loss_mask": row}
    unstable = [jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]
    return jax.export.export(state.train_step_fn(s), platforms=(platform,),
                             disabled_checks=unstable)(s.abstract, batch,
                                                       jnp.int32(0)).mlir_module()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_context_parallel_step_exports(platform):
    """Attention balanced over context (moejax/model/context.py): its ppermutes and
    all-gathers, and splash per device on TPU only."""
    module = exported_context(platform)
    assert "moejax/model/context.py" in module and CPU_CODE not in module
    assert "stablehlo.collective_permute" in module and "stablehlo.all_gather" in module
    assert ("splash_attention_kernel.py" in module) == (platform == "tpu")
