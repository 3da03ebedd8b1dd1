"""Dropless expert parallelism (moejax/moe/dropless.py): ragged all-to-alls and the ring.

XLA:CPU cannot run `lax.ragged_all_to_all`, so here the exchanges go through
`emulated_ragged_all_to_all`, written from that op's documented contract with a dense
all_to_all, and the result must equal the all-experts reference. The layer itself is lowered
for a GPU to check that it takes that path there and the ring on CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import parallel
from moejax.moe.dropless import ragged_ffn, ring_ffn
from tests import reference
from tests.test_layer import D, F, make, tokens

E = 8


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
    """Slice i of operand (input_offsets[i], send_sizes[i] rows) goes to device
    i // (len(send_sizes) / devices), which writes it at the output_offsets[i] its sender
    chose; each slice travels padded to the operand's length."""
    rows = operand.shape[0]
    r = jnp.arange(rows)
    picked = jnp.where(r < send_sizes[:, None], input_offsets[:, None] + r, rows)
    slices = jnp.take(operand, picked, axis=0, mode="fill", fill_value=0)  # [n, rows, d]
    got = jax.lax.all_to_all(slices, axis_name, 0, 0, tiled=True)  # (source, slice) order
    at = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    dest = jnp.where(r < recv_sizes[:, None], at[:, None] + r, output.shape[0])
    return output.at[dest.reshape(-1)].set(got.reshape(-1, operand.shape[1]), mode="drop")


def routing(n, k, key):
    """Distinct experts per token, skewed so that some experts get several times their share
    and the last expert none."""
    logits = (jax.random.normal(key, (n, E)) + jnp.linspace(2.0, 0.0, E)).at[:, -1].set(-1e9)
    gates, ids = jax.lax.top_k(jax.nn.softmax(logits), k)
    return gates, ids.astype(jnp.int32)


def dense_reference(x, gates, ids, w_in, w_out):
    """Every expert on every token, combined by the gates: a plain JAX twin of reference.moe
    with nothing dropped, for gradients."""
    h = jnp.einsum("nd,edf->enf", x, w_in)
    gate, lin = jnp.split(h, 2, axis=-1)
    out = jnp.einsum("enf,efd->end", jax.nn.silu(gate) * lin, w_out)
    weight = jnp.zeros((x.shape[0], E)).at[jnp.arange(x.shape[0])[:, None], ids].add(gates)
    return jnp.einsum("end,ne->nd", out, weight)


# Both exchanges on each split of the 8 devices, one expert per token on the first and two on
# the others: each (exchange, split) and each (exchange, top-k) is run.
@pytest.mark.parametrize("how", ["ragged", "ring"])
@pytest.mark.parametrize("k,data,expert", [(1, 4, 2), (2, 2, 4), (2, 1, 8)])
def test_dropless_expert_parallel_equals_all_experts_reference(how, k, data, expert):
    keys = jax.random.split(jax.random.key(3), 5)
    n = 128
    x = jax.random.normal(keys[0], (n, D))
    gates, ids = routing(n, k, keys[1])
    w_in = jax.random.normal(keys[2], (E, D, 2 * F)) * D**-0.5
    w_out = jax.random.normal(keys[3], (E, F, D)) * F**-0.5
    ct = jax.random.normal(keys[4], (n, D))
    counts = np.bincount(np.asarray(ids).reshape(-1), minlength=E)
    assert counts.max() > 2 * counts.mean() and counts.min() == 0  # uneven, one expert idle

    mesh = parallel.make_mesh({"data": data, "expert": expert})
    tok, exp = P(parallel.TOKEN_AXES), P(parallel.EXPERT_AXIS)

    def layer(x, gates, ids, w_in, w_out):
        args = (x, gates, ids, {"w_in": w_in, "w_out": w_out}, "swiglu", parallel.EXPERT_AXIS)
        if how == "ring":
            return ring_ffn(*args)
        return ragged_ffn(*args, ragged_all_to_all=emulated_ragged_all_to_all)

    sharded = jax.shard_map(layer, mesh=mesh, in_specs=(tok, tok, tok, exp, exp),
                            out_specs=tok)
    args = [jax.device_put(a, NamedSharding(mesh, s))
            for a, s in zip((x, gates, ids, w_in, w_out), (tok, tok, tok, exp, exp), strict=True)]

    def loss(f):
        return lambda x, g, w_in, w_out: jnp.sum(f(x, g, args[2], w_in, w_out) * ct)

    y = jax.jit(sharded)(*args)
    want = sum(np.asarray(gates)[:, j, None] * np.stack(
        [reference.expert_ffn(np.asarray(x)[t:t + 1], np.asarray(w_in)[i], np.asarray(w_out)[i],
                              "swiglu")[0] for t, i in enumerate(np.asarray(ids)[:, j])])
        for j in range(k))
    np.testing.assert_allclose(y, want, atol=1e-5)

    grads = jax.jit(jax.grad(loss(sharded), argnums=(0, 1, 2, 3)))(
        args[0], args[1], args[3], args[4])
    want_grads = jax.grad(loss(dense_reference), argnums=(0, 1, 2, 3))(x, gates, w_in, w_out)
    for name, g, g0 in zip(("x", "gates", "w_in", "w_out"), grads, want_grads, strict=True):
        np.testing.assert_allclose(g, g0, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("dispatch", ["dropless", "dropless_ring"])
def test_dropless_layer_lowers_to_ragged_all_to_all_on_gpu_and_the_ring_on_cpu(dispatch):
    mesh = parallel.make_mesh({"data": 2, "expert": 4})
    model = make(E, 2, 1.0, dispatch=dispatch, mesh=mesh)
    graphdef, state = nnx.split(model)
    x = jax.device_put(tokens(), parallel.token_sharding(mesh))

    def loss(state, x):
        y, aux = nnx.merge(graphdef, state)(x, train=True)
        return jnp.sum(y**2) + aux["balance_loss"]

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(state, x)
    gpu = step.lower(lowering_platforms=("cuda",)).as_text()
    cpu = step.lower().as_text()
    # There and back in the forward pass, and both again in the backward.
    assert gpu.count("ragged_all_to_all") == (4 if dispatch == "dropless" else 0)
    for program in (cpu,) if dispatch == "dropless" else (cpu, gpu):
        assert "ragged_all_to_all" not in program and "all_to_all" not in program
        assert "all_gather" in program and "reduce_scatter" in program
