"""The expert kernels against NumPy: the capacity experts (CPU's filled-rows scan and the
batched matmul GPUs and TPUs run) and the grouped matmul of the dropless path (megablox, the
TPU kernel, run in Pallas interpret mode, and lax.ragged_dot).

The capacity reference runs every row of every expert in float64 NumPy; padding rows are
zero in, and the layer never reads their output or sends them a gradient, so the cotangent
is zero there too.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import parallel
from moejax.moe import cpu, experts
from moejax.moe.cpu import _prefix_lengths, trailing_filled
from moejax.moe.experts import batched_experts, grouped_matmul, megablox_gmm
from moejax.moe.ffn import in_width

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


@pytest.mark.parametrize("kernel", ["cpu", "batched"])
@pytest.mark.parametrize("activation", ["swiglu", "relu"])
@pytest.mark.parametrize("filled,cap", [
    (np.array([[5], [0], [16], [1]]), 16),  # one segment: partial, empty, full, one row
    (np.array([[3, 0, 7], [7, 7, 7], [0, 0, 0], [2, 6, 1]]), 7),  # three segments
    # Fewer rows (S * C) than D: the weight gradients are batched matmuls after the scan.
    (np.array([[3], [0], [6], [1]]), 6),
    (np.array([[1, 0, 2], [2, 2, 2], [0, 0, 0], [2, 1, 0]]), 2),
])
def test_capacity_experts_match_running_every_row(filled, cap, activation, kernel):
    x, ct, w_in, w_out = case(filled, cap, activation)
    f32 = [jnp.asarray(a, jnp.float32) for a in (x, w_in, w_out)]

    def loss(x, w_in, w_out):
        if kernel == "cpu":
            y = cpu.experts_ffn(x, w_in, w_out, activation, jnp.asarray(filled), filled.shape[1])
        else:
            y = batched_experts(x, w_in, w_out, activation)
        return jnp.sum(y * ct), y

    # Jitted: one program per case, not one per eager op.
    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*f32)

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
        ref = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2)))(x, w_in, w_out)
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


def np_grouped(x, w, sizes):
    """Group g's rows of x times w[g]; rows past the last group zero."""
    out, start = np.zeros((x.shape[0], w.shape[-1])), 0
    for g, n in enumerate(sizes):
        out[start:start + n] = x[start:start + n] @ w[g]
        start += n
    return out


GROUPS = [  # uneven, empty (first, middle, last), all in one, fewer rows than the buffer
    [37, 0, 100, 63], [0, 200, 0, 0], [0, 50, 90, 0], [20, 3, 0, 1],
]


@functools.partial(jax.jit, static_argnums=0)
def grouped_value_and_grads(kernel, x, w, group_sizes, ct):
    """y = kernel(x, w, group_sizes) and the gradients of sum(y * ct); one program per kernel,
    whatever the group sizes (an input, not a constant)."""
    f = (lambda *a: megablox_gmm(*a, interpret=True)) if kernel == "megablox" else grouped_matmul

    def loss(x, w):
        y = f(x, w, group_sizes)
        return jnp.sum(y * ct), y

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w)


@pytest.mark.parametrize("kernel", ["megablox", "ragged_dot"])
@pytest.mark.parametrize("sizes", GROUPS, ids=str)
def test_grouped_matmul_and_its_gradients_match_numpy(kernel, sizes):
    rng = np.random.default_rng(1)
    m, k, n = 200, 16, 24
    x, ct = rng.standard_normal((m, k)), rng.standard_normal((m, n))
    w = rng.standard_normal((len(sizes), k, n))
    (_, y), (dx, dw) = grouped_value_and_grads(
        kernel, x.astype(np.float32), w.astype(np.float32), np.asarray(sizes, np.int32),
        ct.astype(np.float32))
    np.testing.assert_allclose(y, np_grouped(x, w, sizes), atol=1e-4)
    # d/dx = ct @ w[g].T on group g's rows; d/dw[g] = x[rows of g].T @ ct[rows of g].
    np.testing.assert_allclose(dx, np_grouped(ct, w.transpose(0, 2, 1), sizes), atol=1e-4)
    starts = np.cumsum([0, *sizes])
    want_dw = np.stack([x[a:b].T @ ct[a:b] for a, b in zip(starts, starts[1:], strict=False)])
    np.testing.assert_allclose(dw, want_dw, atol=1e-4)


class StandInMegablox:
    """megablox's gmm and tgmm from their documented contracts in plain jnp: Pallas interpret
    mode does not run inside shard_map, where the layer calls the kernels."""

    @staticmethod
    def gmm(lhs, rhs, sizes, dtype, tiling, transpose_rhs=False, interpret=False):
        rhs = rhs.swapaxes(1, 2) if transpose_rhs else rhs
        return jax.lax.ragged_dot(lhs, rhs, sizes[:rhs.shape[0]]).astype(dtype)

    @staticmethod
    def tgmm(lhs, rhs, sizes, dtype, tiling, group_offset, num_groups, interpret=False):
        group = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(rhs.shape[0]), side="right")
        onehot = (group[:, None] == jnp.arange(num_groups)).astype(lhs.dtype)
        return jnp.einsum("km,mg,mn->gkn", lhs, onehot, rhs).astype(dtype)


def test_megablox_inside_shard_map_has_the_gradients_of_the_plain_run(monkeypatch):
    """The kernels declare no varying mesh axes for their outputs; the layer calls them inside
    shard_map, where tokens vary over `data` and the weights do not: their gradient must be
    the sum over the data shards, as without shard_map."""
    monkeypatch.setattr(experts, "megablox", StandInMegablox)
    rng = np.random.default_rng(2)
    sizes = jnp.asarray([10, 0, 30, 24], jnp.int32)
    x = jnp.asarray(rng.standard_normal((4, 64, 16)), jnp.float32)  # 4 shards of 64 rows
    w = jnp.asarray(rng.standard_normal((4, 16, 8)), jnp.float32)
    mesh = parallel.make_mesh({"data": 4})

    def loss(x, w):  # every shard: the same groups over its own rows
        return jnp.sum(jnp.sin(megablox_gmm(x, w, sizes)))

    sharded = jax.shard_map(lambda x, w: jax.lax.psum(loss(x[0], w), "data"), mesh=mesh,
                            in_specs=(P("data"), P()), out_specs=P())
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    got = jax.jit(jax.grad(sharded, argnums=(0, 1)))(xs, w)
    want = jax.grad(lambda x, w: sum(loss(x[i], w) for i in range(4)), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(got[0], want[0], atol=1e-4)
    np.testing.assert_allclose(got[1], want[1], atol=1e-4)


def test_stand_in_megablox_matches_the_kernel():
    rng = np.random.default_rng(3)
    sizes = jnp.asarray([100, 0, 20, 8], jnp.int32)  # 128 rows, and an empty group
    x, dy = (jnp.asarray(rng.standard_normal((128, n)), jnp.float32) for n in (16, 8))
    w = jnp.asarray(rng.standard_normal((3, 16, 8)), jnp.float32)  # the last group: no weights
    for f in ("gmm", "tgmm"):
        args = (x, w, sizes) if f == "gmm" else (x.T, dy, sizes)
        extra = () if f == "gmm" else (None, 3)
        got = getattr(StandInMegablox, f)(*args, jnp.float32, (128, 16, 8), *extra)
        want = getattr(experts.megablox, f)(*args, jnp.float32, (128, 16, 8), *extra,
                                            interpret=True)
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f)
