"""Packed documents and padding (data.documents; moejax/run/state.py target_weights, the model's
segments, the MoE layer's `real` tokens): a document packed with others gets the logits, loss
and gradients it gets alone, and padding changes no router statistic, no bias update and no
parameter update."""


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import tiny
from moejax import parallel
from moejax.data import text
from moejax.run import state
from moejax.run.checkpoint import path_name

EOS = 63


def small(**model):
    config = tiny.get_config("smoke")
    config.model.update(vocab_size=64, num_heads=4, num_kv_heads=2, head_dim=8, **model)
    config.train.update(balance_coef=0.0, z_coef=0.0)
    return config


def flat(tree):
    return {path_name(p): np.asarray(g) for p, g in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_batch_arrays_from_eos():
    # Hand-computed: the EOS ends its document; the next token starts the next one.
    rows = np.array([[5, 6, EOS, 7, EOS, EOS, 8]])
    got = text.batch_arrays(rows, EOS, documents=True)
    np.testing.assert_array_equal(got["segments"], [[1, 1, 1, 2, 2, 3, 4]])
    np.testing.assert_array_equal(got["loss_mask"], np.ones_like(rows))
    assert text.batch_arrays(rows, EOS, documents=False)["segments"].tolist() == [[1] * 7]
    chat = np.stack([rows[0], [1, 1, 1, 2, 2, 0, 0], [0, 1, 1, 0, 1, 0, 0]])[None]
    got = text.batch_arrays(chat, EOS, documents=True)
    np.testing.assert_array_equal(got["segments"], chat[:, 1])
    np.testing.assert_array_equal(got["loss_mask"], chat[:, 2])
    # Input i scores token i + 1 only inside its document, where supervised.
    w = state.target_weights({k: jnp.asarray(v) for k, v in got.items()})
    np.testing.assert_array_equal(w, [[1, 1, 0, 1, 0, 0]])


def test_packed_documents_are_alone():
    """Two documents packed in one row (with MTP, so its shifted targets stop at document
    ends too) against each one alone in a row of its own: logits, loss and gradients,
    float32. Dropless dispatch and no router noise: a token's expert output is its own."""
    config = small(dispatch="dropless", mtp_layers=1)
    s = state.setup(config, parallel.make_mesh({}))
    params, graphdef = state.init(s)["params"], s.graphdef
    docs = np.append(np.random.default_rng(0).integers(0, EOS, (2, 10)),
                     np.full((2, 1), EOS), axis=1).astype(np.int32)
    row = docs.reshape(1, -1)
    packed = {k: jnp.asarray(v) for k, v in text.batch_arrays(row, EOS, True).items()}
    counts = state.scored_counts(packed, 1)
    # Every target but each document's first token (and MTP's: its first two).
    np.testing.assert_array_equal(counts, [row.size - 2, row.size - 4])

    @jax.jit
    def run(params, batch):
        logits, _ = nnx.merge(graphdef, params)(batch["tokens"][:, :-1], train=False,
                                                 segments=batch["segments"][:, :-1])
        loss_grad = jax.value_and_grad(state.loss_fn, has_aux=True)
        (loss, metrics), grads = loss_grad(params, graphdef, batch, None, config.train, counts)
        return logits, loss, metrics["mtp_loss"], grads

    logits, loss, mtp, grads = run(params, packed)
    # Alone: a row each; with the packed row's denominators, their losses and gradients add
    # up to the packed row's.
    alone, alone_loss, alone_mtp, alone_grads = run(params, state.as_batch(jnp.asarray(docs)))
    width = docs.shape[1]
    for d in range(2):
        np.testing.assert_allclose(logits[0, d * width:(d + 1) * width - 1], alone[d],
                                   atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(loss, alone_loss, rtol=1e-5)  # ce + mtp_coef * mtp
    np.testing.assert_allclose(mtp, alone_mtp, rtol=1e-5)
    got, want = flat(grads), flat(alone_grads)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-4, err_msg=name)
    # Without documents the row is one sequence: the second document's logits change.
    across = run(params, {**packed, "segments": jnp.ones_like(packed["segments"])})[0]
    assert np.abs(across[0, width:] - logits[0, width:]).max() > 1e-3


def test_padding_changes_no_router_statistic():
    """A batch whose rows are half padding (in front, where it would take capacity slots first)
    against the same real tokens alone: one train step with capacity dispatch, the
    auxiliary-loss-free bias, balance and z losses on, on an 8-device mesh. The capacity
    factor is doubled for the unpadded batch, whose groups are half as long, so both have the
    same slots per expert."""
    config = small(router_score="sigmoid", bias_rate=1e-2, capacity_factor=0.5, min_capacity=0)
    config.train.update(balance_coef=1e-2, z_coef=1e-3)
    config.mesh.update(data=2, expert=4)
    mesh = parallel.make_mesh(parallel.mesh_sizes(config.mesh, jax.device_count()))
    rng = np.random.default_rng(1)
    real = rng.integers(0, EOS - 1, (8, 17)).astype(np.int32)
    padded = np.concatenate([np.full((8, 16), EOS, np.int32), real], axis=1)
    segments = np.concatenate([np.zeros((8, 16), np.int32), np.ones((8, 17), np.int32)], 1)

    def step(config, batch):
        s = state.setup(config, mesh)
        batch = jax.device_put(batch, parallel.token_sharding(mesh))
        return state.train_step_fn(s)(state.init(s), batch, jnp.int32(0))

    new, metrics = step(config, {"tokens": padded, "segments": segments,
                                 "loss_mask": np.ones_like(padded)})
    unpadded = config.copy_and_resolve_references()
    unpadded.model.capacity_factor = 1.0
    want_new, want = step(unpadded, {"tokens": real, "segments": np.ones_like(real),
                                     "loss_mask": np.ones_like(real)})
    assert want["dropped_frac"].min() > 0.05  # capacity is really binding
    assert (metrics["max_row_runs"], want["max_row_runs"]) == (2, 1)  # padding, a document
    for key in ("expert_load", "balance_loss", "z_loss", "dropped_frac", "ce_loss", "loss"):
        np.testing.assert_allclose(metrics[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    got, expected = flat(new["params"]), flat(want_new["params"])
    assert any(name.endswith("router_bias") for name in got)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-6, err_msg=name)


def test_loss_is_the_mean_over_the_whole_batch_whatever_grad_accum():
    """Micro-batches with very different numbers of scored targets (a prompt-masked row and a
    fully scored one): grad_accum = 2 gives the loss and the update of grad_accum = 1, as the
    mean is taken over the scored targets of the whole batch, not per micro-batch."""
    config = small(dispatch="dropless")
    config.data.update(batch_size=4, seq_len=16)
    mesh = parallel.make_mesh({})
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, EOS, (4, 17)).astype(np.int32)
    # Rows 0 and 2 form micro-batch 0 of 2 (every 2nd row): nearly all masked; 1 and 3 not.
    loss_mask = np.ones_like(tokens)
    loss_mask[[0, 2], :15] = 0
    batch = {"tokens": tokens, "segments": np.ones_like(tokens), "loss_mask": loss_mask}
    runs = []
    for accum in (1, 2):
        c = config.copy_and_resolve_references()
        c.train.grad_accum = accum
        s = state.setup(c, mesh)
        new, metrics = state.train_step_fn(s)(state.init(s), batch, jnp.int32(0))
        runs.append((metrics, flat(new["params"])))
    (m1, p1), (m2, p2) = runs
    np.testing.assert_allclose(m2["ce_loss"], m1["ce_loss"], rtol=1e-6)
    # 16 scored targets in rows 1 and 3, 2 in rows 0 and 2: a mean of the micro-batches'
    # own means would weigh those 2 like 16.
    np.testing.assert_allclose(m2["scored_frac"], (2 * 16 + 2 * 2) / 64, rtol=1e-6)
    for name in p1:
        np.testing.assert_allclose(p2[name], p1[name], atol=1e-6, err_msg=name)
