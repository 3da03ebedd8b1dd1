"""The XLA:CPU experts kernel (moejax/moe/cpu_experts.cc) against a float64 reference.

Widths are multiples of 16 but not of the kernel's 48- and 64-column tiles, and row counts
are not multiples of its 6- and 8-row tiles, so every tail path runs.
"""

import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe import cpu_experts
from moejax.moe.experts import experts_ffn


def _buildable() -> bool:
    """A C++ compiler and AVX-512: where both are, the kernel must build (no silent skip)."""
    compiler = shutil.which("c++") or shutil.which("g++")
    try:
        return compiler is not None and " avx512f" in open("/proc/cpuinfo").read()
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _buildable(),
                                reason="no C++ compiler or no AVX-512: the XLA path runs")

D = 32


def case(filled, cap, F, seed=0):
    rng = np.random.default_rng(seed)
    num_experts, segments = filled.shape
    mask = (np.arange(cap)[None, None, :] < filled[:, :, None]).reshape(num_experts, -1, 1)
    x = rng.standard_normal((num_experts, segments * cap, D)) * mask
    ct = rng.standard_normal(x.shape) * mask  # the layer sends no gradient to padding
    w_in = rng.standard_normal((num_experts, D, 2 * F)) / D**0.5
    w_out = rng.standard_normal((num_experts, F, D)) / F**0.5
    return x, ct, w_in, w_out


def reference(x, ct, w_in, w_out):
    """Every row of every expert, float64: outputs and the gradients of sum(y * ct)."""
    def loss(x, w_in, w_out):
        g, lin = jnp.split(jnp.einsum("etd,edf->etf", x, w_in), 2, axis=-1)
        y = jnp.einsum("etf,efd->etd", g * jax.nn.sigmoid(g) * lin, w_out)
        return jnp.sum(y * ct), y

    with jax.enable_x64():
        (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, w_in, w_out)
        return np.asarray(y), [np.asarray(g) for g in grads]


@pytest.mark.parametrize("filled,cap,F", [
    (np.array([[37], [0], [50], [1], [13]]), 50, 80),  # partial, empty, full, one row
    (np.array([[3, 0, 7], [7, 7, 7], [0, 0, 0], [2, 6, 1]]), 7, 80),  # three capacity groups
    # 64 rows x 2F columns of dh pass 512 KiB: the weight gradient goes panel by panel
    (np.array([[64], [61]]), 64, 1040),
])
def test_kernel_matches_float64_reference(filled, cap, F):
    assert cpu_experts.available()
    x, ct, w_in, w_out = case(filled, cap, F)
    f32 = [jnp.asarray(a, jnp.float32) for a in (x, w_in, w_out)]
    assert cpu_experts.supports(*f32, "swiglu")  # the kernel runs, not the XLA fallback
    ct32 = jnp.asarray(ct, jnp.float32)

    def loss(x, w_in, w_out):
        y = experts_ffn(x, w_in, w_out, "swiglu", jnp.asarray(filled, jnp.int32))
        return jnp.sum(y * ct32), y

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    hlo = step.lower(*f32).as_text()
    assert "moejax_experts_fwd" in hlo and "moejax_experts_bwd" in hlo

    (_, y), grads = step(*f32)
    y_ref, grads_ref = reference(x, ct, w_in, w_out)
    np.testing.assert_allclose(y, y_ref, atol=2e-5)
    for got, want, name in zip(grads, grads_ref, ("x", "w_in", "w_out"), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=name)


def test_kernel_is_not_used_where_xla_is_faster():
    F = 80
    x = jnp.zeros((2, cpu_experts.MAX_ROWS + 1, D))
    w_in, w_out = jnp.zeros((2, D, 2 * F)), jnp.zeros((2, F, D))
    assert cpu_experts.supports(x[:, :-1], w_in, w_out, "swiglu")
    assert not cpu_experts.supports(x, w_in, w_out, "swiglu")  # too many rows per expert
    assert not cpu_experts.supports(x[:, :-1], w_in, w_out, "relu")
    assert not cpu_experts.supports(x[:, :-1, :24], w_in[:, :24], w_out[..., :24], "swiglu")
    bf16 = [a.astype(jnp.bfloat16) for a in (x[:, :-1], w_in, w_out)]
    assert not cpu_experts.supports(*bf16, "swiglu")


def test_a_failed_build_raises_so_the_xla_path_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEJAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", shutil.which("false"))
    with pytest.raises(subprocess.CalledProcessError):
        cpu_experts._build()
    assert not list(tmp_path.glob("*.so"))  # nothing half-written is left to load
