"""Router math against values worked out by hand."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe import router


def sm(*logits):
    z = [math.exp(v) for v in logits]
    return [v / sum(z) for v in z]


def test_top1_with_tie_and_overflow():
    # Token 3 ties: the lower expert id wins. Expert 0 gets three 1st choices but has 2 slots.
    logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [1.0, 1.0]])
    r = router.route(logits, k=1, capacity=2, renormalize=False)
    np.testing.assert_array_equal(r.expert_ids[:, 0], [0, 1, 0, 0])
    np.testing.assert_array_equal(r.positions[:, 0], [0, 0, 1, 2])
    np.testing.assert_array_equal(r.keep[:, 0], [True, True, True, False])
    np.testing.assert_array_equal(r.tokens_per_expert, [3, 1])
    want_gates = [sm(2, 0)[0], sm(0, 1)[1], sm(3, 0)[0], 0.5]
    np.testing.assert_allclose(r.gates[:, 0], want_gates, rtol=1e-6)

    p0 = (sm(2, 0)[0] + sm(0, 1)[0] + sm(3, 0)[0] + 0.5) / 4
    want_balance = 2 * (3 / 4 * p0 + 1 / 4 * (1 - p0))
    np.testing.assert_allclose(router.balance_loss(r.probs, r.expert_ids), want_balance, rtol=1e-6)
    lse = [math.log(math.exp(2) + 1), math.log(1 + math.e), math.log(math.exp(3) + 1),
           1 + math.log(2)]
    np.testing.assert_allclose(router.z_loss(logits), sum(v * v for v in lse) / 4, rtol=1e-6)


@pytest.mark.parametrize("renormalize", [False, True])
def test_top2_first_choices_take_slots_before_second_choices(renormalize):
    # With one slot per expert every 1st choice fits and every 2nd choice is dropped. Token-major
    # priority would instead give token 0's 2nd choice (expert 1) the slot token 1 wants first.
    logits = jnp.array([[3.0, 2.0, 0.0], [2.0, 3.0, 0.0], [0.0, 2.0, 3.0]])
    r = router.route(logits, k=2, capacity=1, renormalize=renormalize)
    np.testing.assert_array_equal(r.expert_ids, [[0, 1], [1, 0], [2, 1]])
    np.testing.assert_array_equal(r.positions, [[0, 1], [0, 1], [0, 2]])
    np.testing.assert_array_equal(r.keep, [[True, False]] * 3)
    np.testing.assert_array_equal(r.tokens_per_expert, [2, 3, 1])
    p = sm(3, 2, 0)
    want = [1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))] if renormalize else p[:2]
    np.testing.assert_allclose(r.gates[0], want, rtol=1e-6)

    probs = np.array([sm(3, 2, 0), sm(2, 3, 0), sm(0, 2, 3)])
    f = np.array([2, 3, 1]) / 6
    np.testing.assert_allclose(router.balance_loss(r.probs, r.expert_ids),
                               3 * np.sum(f * probs.mean(0)), rtol=1e-6)


def test_top2_tie_breaks_to_lower_ids():
    r = router.route(jnp.array([[0.0, 5.0, 5.0, 0.0]]), k=2, capacity=4, renormalize=False)
    np.testing.assert_array_equal(r.expert_ids, [[1, 2]])
    np.testing.assert_allclose(r.gates, [[sm(0, 5, 5, 0)[1]] * 2], rtol=1e-6)


def test_balanced_router_scores_one():
    # Uniform probabilities and an even spread of choices: f_e = P_e = 1/E.
    probs = jnp.full((8, 4), 0.25)
    ids = jnp.array([[0, 1], [2, 3]] * 4)
    np.testing.assert_allclose(router.balance_loss(probs, ids), 1.0, rtol=1e-6)


def test_capacity_formula():
    assert router.capacity(4096, 8, 2, 1.25, 1) == 1280
    assert router.capacity(100, 64, 1, 1.0, 1) == 2  # ceil(100 / 64)
    assert router.capacity(10, 64, 1, 1.0, 4) == 4  # the minimum wins


def test_positions_match_loop():
    ids = np.random.default_rng(0).integers(0, 5, size=(50, 3))
    pos, counts = router.expert_positions(jnp.array(ids, jnp.int32), 5)
    filled, want = np.zeros(5, int), np.zeros_like(ids)
    for j in range(3):
        for t in range(50):
            want[t, j] = filled[ids[t, j]]
            filled[ids[t, j]] += 1
    np.testing.assert_array_equal(pos, want)
    np.testing.assert_array_equal(counts, filled)


def test_jitter_noise_range():
    import jax

    noise = router.jitter_noise(jax.random.key(0), (1000,), 0.1)
    assert 0.9 <= float(noise.min()) < 0.92 and 1.08 < float(noise.max()) <= 1.1


def test_entropy():
    np.testing.assert_allclose(router.entropy(jnp.full((3, 4), 0.25)), math.log(4), rtol=1e-6)
