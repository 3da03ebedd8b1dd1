"""experts_ffn, which computes only the filled rows of each expert, against NumPy.

The reference runs every row of every expert in float64 NumPy; padding rows are zero in,
and the layer never reads their output or sends them a gradient, so the cotangent is zero
there too.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe.experts import _prefix_lengths, experts_ffn, in_width, trailing_filled

D, F = 8, 12


def np_ffn(x, w_in, w_out, activation):
    h = x @ w_in
    if activation == "swiglu":
        g, lin = np.split(h, 2, axis=-1)
        return (g / (1 + np.exp(-g)) * lin) @ w_out
    return np.maximum(h, 0) @ w_out


def case(filled, cap, activation, seed=0):
    rng = np.random.default_rng(seed)
    num_experts, segments = filled.shape
    mask = np.arange(cap)[None, None, :] < filled[:, :, None]  # [E, S, C]
    mask = mask.reshape(num_experts, segments * cap, 1)
    x = rng.standard_normal((num_experts, segments * cap, D)) * mask
    ct = rng.standard_normal(x.shape) * mask
    w_in = rng.standard_normal((num_experts, D, in_width(F, activation))) / D**0.5
    w_out = rng.standard_normal((num_experts, F, D)) / F**0.5
    return x, ct, w_in, w_out


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
@pytest.mark.parametrize("filled,cap", [
    (np.array([[5], [0], [16], [1]]), 16),  # one segment: partial, empty, full, one row
    (np.array([[3, 0, 7], [7, 7, 7], [0, 0, 0], [2, 6, 1]]), 7),  # three segments
    # Fewer rows (S * C) than D: the weight gradients are batched matmuls after the scan.
    (np.array([[3], [0], [6], [1]]), 6),
    (np.array([[1, 0, 2], [2, 2, 2], [0, 0, 0], [2, 1, 0]]), 2),
])
def test_filled_rows_match_running_every_row(filled, cap, activation):
    x, ct, w_in, w_out = case(filled, cap, activation)
    f32 = [jnp.asarray(a, jnp.float32) for a in (x, w_in, w_out)]

    def loss(x, w_in, w_out):
        y = experts_ffn(x, w_in, w_out, activation, jnp.asarray(filled))
        return jnp.sum(y * ct), y

    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(*f32)

    y_ref = np.stack([np_ffn(x[e], w_in[e], w_out[e], activation) for e in range(len(x))])
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    # Gradients: autodiff of the plain all-rows formula, in float64.
    with jax.enable_x64():
        def ref_loss(x, w_in, w_out):
            h = jnp.einsum("etd,edf->etf", x, w_in)
            if activation == "swiglu":
                g, lin = jnp.split(h, 2, axis=-1)
                a = g * jax.nn.sigmoid(g) * lin
            else:
                a = jnp.maximum(h, 0)
            return jnp.sum(jnp.einsum("etf,efd->etd", a, w_out) * ct)
        ref = jax.grad(ref_loss, argnums=(0, 1, 2))(x, w_in, w_out)
    for got, want, name in zip(grads, ref, ("x", "w_in", "w_out"), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=name)


def test_prefix_lengths_cover_every_row_count_in_at_most_sixteen_chunks():
    for rows in (1, 7, 8, 40, 160, 1280, 4096):
        lengths = _prefix_lengths(rows)
        assert lengths[0] == 0 and lengths[-1] == rows and len(lengths) <= 17
        assert all(b > a for a, b in itertools.pairwise(lengths))
        # the branch for n filled rows runs ceil(n / chunk) chunks: never fewer than n rows
        chunk = lengths[1]
        for n in range(rows + 1):
            assert lengths[-(-n // chunk)] >= n


def test_trailing_filled_counts_rows_up_to_the_last_nonzero_one():
    x = np.zeros((2, 2 * 4, 3), np.float32)  # 2 experts, 2 segments of 4 slots
    x[0, 0:3] = 1.0  # expert 0, segment 0: 3 rows
    x[0, 4 + 1, 2] = -2.0  # segment 1: row 1 only, row 0 zero -> 2 rows
    x[1, 4:8] = 0.5  # expert 1: segment 0 empty, segment 1 full
    np.testing.assert_array_equal(trailing_filled(jnp.asarray(x), 2, "swiglu"), [[3, 2], [0, 4]])
    # gelu passes a gradient back through a zero row, so every row runs
    np.testing.assert_array_equal(trailing_filled(jnp.asarray(x), 2, "gelu"), [[4, 4], [4, 4]])
