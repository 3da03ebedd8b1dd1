"""Routing parity and replay (issue 34, item 5).

Parity: `generate` (prefill and one-token decode steps through the key-value cache) and the
training forward (Transformer.__call__, train=True, over the whole sequence at once) choose
the same experts for the same tokens. The model is tiny and float32; its capacity factor is
E / k, so the capacity path drops nothing (a drop changes a token's next hidden state, hence
the later layers' choices: that is the capacity path working, not a routing disagreement).

Replay: a batch carrying generate's record as batch["routing"] trains on those experts; the
step reports "routing_mismatch", the share of real assignments its routers would not have
chosen. The reference for a forced layer's output is a per-token NumPy sum over the forced
experts' FFNs (tests/reference.py).
"""

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from moejax import generate as gen, parallel
from moejax.moe.layer import DISPATCHES, MoE, MoEConfig
from moejax.run import state
from moejax.run.checkpoint import Checkpoints
from tests import reference

E, K = 8, 2
NEW = 60  # new tokens per prompt
# 16 prompts of 4..19 tokens: right-padded in one prefill. 16 rows: 8 per micro-batch at
# grad_accum 2, one per device of the data=2 x expert=4 mesh.
PROMPTS = [np.random.default_rng(b).integers(1, 257, 4 + b).tolist() for b in range(16)]
MESH = {"data": 2, "expert": 4}


def config(dispatch="dropless", **model):
    """tiny.py:smoke with a dense first layer, then two MoE layers of 8 experts, top-2."""
    c = tiny.get_config("smoke")
    c.model.update(vocab_size=257, num_layers=3, first_dense_layers=1, num_experts=E, top_k=K,
                   dispatch=dispatch, **{"capacity_factor": E / K,
                                         "eval_capacity_factor": E / K, **model})
    c.data.batch_size = len(PROMPTS)
    return c


def setup(c, mesh=None):
    return state.setup(c, parallel.make_mesh(mesh or {}))


def laid_out(s, params):
    return jax.device_put(params, s.shardings["params"])


def generated(c, params, **kw):
    """generate's new tokens and routing record for PROMPTS, greedy, with c's model."""
    model = nnx.merge(setup(c).graphdef, params)
    return gen.generate(model, PROMPTS, NEW, return_routing=True, **kw)


def padded(seqs):
    """Right-padded tokens and segments (1: real, 0: padding) [B, longest rounded up to 4:
    what context=2 needs, 2 halves per device]."""
    longest = -(-max(map(len, seqs)) // 4) * 4
    tokens, segments = np.zeros((2, len(seqs), longest), np.int32)
    for b, q in enumerate(seqs):
        tokens[b, : len(q)], segments[b, : len(q)] = q, 1
    return tokens, segments


def training_ids(c, params, seqs, mesh=None):
    """The training forward's expert ids [B, S, L, k] for right-padded `seqs`."""
    s = setup(c, mesh)
    tokens, segments = padded(seqs)
    if mesh:
        tokens, segments = jax.device_put((tokens, segments), parallel.token_sharding(s.mesh))
    forward = jax.jit(lambda p, t, sg: nnx.merge(s.graphdef, p)(
        t, train=True, segments=sg, return_routing=True)[1]["expert_ids"])
    return np.moveaxis(np.asarray(forward(laid_out(s, params), tokens, segments)), 0, 2)


def mismatches(ids, routing) -> tuple[int, int]:
    """(tokens compared, tokens whose k experts differ in any MoE layer)."""
    tokens = bad = 0
    for b, record in enumerate(routing):
        tokens += len(record)
        bad += int((ids[b, : len(record)] != record).any((-1, -2)).sum())
    return tokens, bad


@pytest.fixture(scope="module")
def base():
    """The model's parameters, and generate's tokens and routing with the dropless path."""
    c = config()
    params = state.init(setup(c))["params"]
    rows, routing = generated(c, params)
    return params, rows, routing


def test_record_layout(base):
    _, _, routing = base
    for prompt, record in zip(PROMPTS, routing, strict=True):
        # Every token fed: the prompt's, then each new one but the last (never fed).
        assert record.dtype == np.int32 and record.shape == (len(prompt) + NEW - 1, 2, K)
        assert ((0 <= record) & (record < E)).all()
        assert (record[..., 0] != record[..., 1]).all()  # k distinct experts
    assert len(np.unique(np.concatenate(routing)[:, 1])) == E  # the router is not trivial


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_generate_chooses_the_training_forwards_experts(dispatch, base):
    params, rows, routing = base
    if dispatch != "dropless":  # generate through this path too
        rows, routing = generated(config(dispatch), params)
    seqs = [p + r for p, r in zip(PROMPTS, rows, strict=True)]
    tokens, bad = mismatches(training_ids(config(dispatch), params, seqs), routing)
    print(f"parity {dispatch}: {tokens} tokens x 2 MoE layers compared, {bad} mismatches")
    assert tokens >= 1000 and bad == 0


@pytest.mark.parametrize("dispatch, mesh", [("capacity", MESH), ("dropless_ring", MESH),
                                            ("dropless", {"data": 2, "context": 2, "expert": 2})],
                         ids=["capacity-data2-expert4", "ring-data2-expert4",
                              "dropless-data2-context2-expert2"])
def test_parity_on_an_expert_parallel_mesh(dispatch, mesh, base):
    params, rows, routing = base
    seqs = [p + r for p, r in zip(PROMPTS, rows, strict=True)]
    tokens, bad = mismatches(training_ids(config(dispatch), params, seqs, mesh), routing)
    print(f"parity {dispatch} on {mesh}: {tokens} tokens, {bad} mismatches")
    assert tokens >= 1000 and bad == 0


def test_parity_with_sigmoid_bias_and_group_limit():
    """DeepSeek-V3's router: sigmoid scores, a selection bias (random here, so it decides),
    4 groups of 2 experts of which a token's 2 best groups are open, renormalized, x 2.5."""
    c = config(router_score="sigmoid", renormalize=True, n_group=4, topk_group=2,
               routed_scaling_factor=2.5, bias_rate=1e-3)
    model = nnx.merge(setup(c).graphdef, state.init(setup(c))["params"])
    layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, MoE)]
    assert len(layers) == 1 and layers[0].router_bias.shape == (2, E)  # the stacked layers'
    layers[0].router_bias.set_value(jax.random.normal(jax.random.key(5), (2, E)) * 0.1)
    params = nnx.state(model)
    rows, routing = generated(c, params)
    seqs = [p + r for p, r in zip(PROMPTS, rows, strict=True)]
    tokens, bad = mismatches(training_ids(c, params, seqs), routing)
    print(f"parity sigmoid + bias + group limit: {tokens} tokens, {bad} mismatches")
    assert tokens >= 1000 and bad == 0
    # The bias and the group limit decide: without them other experts would win somewhere.
    c.model.update(n_group=1, topk_group=1)
    assert mismatches(training_ids(c, params, seqs), routing)[1] > 0


def test_expert_choice_refuses_to_record_in_one_line():
    c = config("capacity", routing="experts")
    model = nnx.merge(setup(c).graphdef, state.init(setup(c))["params"])
    with pytest.raises(ValueError, match="^return_routing: model.routing='experts' .*non-causal"
                       ".*allowed: tokens$"):
        gen.generate(model, PROMPTS[:1], 2, return_routing=True)
    with pytest.raises(ValueError, match="expert choice is non-causal"):
        model(jnp.zeros((1, 8), jnp.int32), train=True, return_routing=True)


# Replay.

def replay_batch(rows, routing):
    """Generated sequences cut to the shortest, as a train batch [B, S + 1], and their record
    [B, S, L, k] (the inputs' experts)."""
    seqs = [p + r for p, r in zip(PROMPTS, rows, strict=True)]
    n = min(map(len, seqs))
    tokens = np.asarray([q[:n] for q in seqs], np.int32)
    ones = np.ones_like(tokens)
    batch = {"tokens": tokens, "segments": ones, "loss_mask": ones}
    return batch, np.stack([r[: n - 1] for r in routing])


def altered(record, fraction, seed=0, last_layer_only=False):
    """record [..., layers, k] with `fraction` of its assignments moved to an expert the token
    does not have in that layer, and the share of all its assignments moved. last_layer_only:
    in the last MoE layer only, the one whose move cannot change a later layer's choice."""
    rng = np.random.default_rng(seed)
    out = record.copy()
    moved = rng.random(record.shape) < fraction
    if last_layer_only:
        moved[..., :-1, :] = False
    for idx in zip(*np.nonzero(moved), strict=True):  # not the token's, before or after
        taken = {*record[idx[:-1]], *out[idx[:-1]]}
        out[idx] = next(e for e in rng.permutation(E) if e not in taken)
    return out, moved.mean()


def test_replay_through_the_sharded_accumulating_train_step(base):
    """data=2 x expert=4, two micro-batches, the capacity path: the record replayed changes
    nothing (the same loss and gradients: AdamW's first moment after one step is (1 - b1) x
    the clipped gradient) and reports 0 mismatches; altered ids report exactly the share
    altered. (With drops, capacity factor 1.25 here, a dropped token's next hidden state and
    so its later layers' choices differ from generate's, which drops nothing: the mismatch
    is then not 0 but the share of those, as it should be.)"""
    params, rows, routing = base
    c = config("capacity")
    c.train.grad_accum = 2
    s = setup(c, MESH)
    step = state.train_step_fn(s)
    init = jax.jit(lambda p: {"params": p, "opt_state": s.tx.init(p)},
                   out_shardings=s.shardings)
    batch, record = replay_batch(rows, routing)
    runs = {}
    # The last layer's only: moving an earlier layer's experts moves the hidden state that
    # later layers route, and with it their own choice (more mismatches than moved).
    wrong, share = altered(record, 0.2, last_layer_only=True)
    for name, extra in [("natural", {}), ("replayed", {"routing": record}),
                        ("altered", {"routing": wrong})]:
        put = jax.device_put({**batch, **extra}, parallel.token_sharding(s.mesh))
        runs[name] = step(init(laid_out(s, params)), put, jnp.int32(0))
    (natural, m0), (replayed, m1), (_, m2) = runs["natural"], runs["replayed"], runs["altered"]
    print(f"replay: {record.size // K} token-layers replayed, mismatch "
          f"{float(m1['routing_mismatch'])}; {share:.4f} altered, mismatch "
          f"{float(m2['routing_mismatch']):.4f}")
    assert "routing_mismatch" not in m0
    assert float(m1["routing_mismatch"]) == 0.0
    assert 0.05 < share < 0.15 and float(m2["routing_mismatch"]) == pytest.approx(share, abs=1e-6)
    for key in ("loss", "grad_norm", "balance_loss", "z_loss", "dropped_frac", "expert_load"):
        np.testing.assert_allclose(m1[key], m0[key], rtol=1e-6, err_msg=key)
    assert float(m2["loss"]) != float(m0["loss"])  # the altered experts do change it
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9),
                 replayed, natural)


def test_replay_with_multi_token_prediction():
    """The record covers the main model's MoE layers; the MTP module (an MoE block of its
    own) routes by its router. The main layers' own choice replayed: the same loss, and
    "routing_mismatch" over the main layers only, 0."""
    c = config("capacity", mtp_layers=1)
    s = setup(c)
    params = state.init(s)["params"]
    tokens = jax.random.randint(jax.random.key(2), (2, 17), 1, 257)
    ones = jnp.ones_like(tokens)
    batch = {"tokens": tokens, "segments": ones, "loss_mask": ones}

    @jax.jit
    def both(params, batch):
        model = nnx.merge(s.graphdef, params)
        ids = model(batch["tokens"][:, :-1], train=True, return_routing=True)[1]["expert_ids"]
        record = {**batch, "routing": jnp.moveaxis(ids, 0, 2)}  # [B, S, 2 MoE layers, k]
        loss = functools.partial(state.loss_fn, graphdef=s.graphdef, rng=None, tc=c.train)
        return loss(params, batch=batch), loss(params, batch=record)

    (loss0, m0), (loss1, m1) = both(params, batch)
    assert float(m1["routing_mismatch"]) == 0.0 and "routing_mismatch" not in m0
    assert float(m1["mtp_loss"]) > 0
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    assert m1["expert_load"].shape == (3, E)  # the 2 main MoE layers, then the MTP block
    np.testing.assert_allclose(m1["expert_load"], m0["expert_load"])


def kept(forced, real, capacity):
    """[B, S, k] True where an assignment gets a slot in its 16-token group: every real
    token's 1st choice in token order, then every 2nd choice, capacity slots per expert."""
    keep = np.zeros(forced.shape, bool)
    for rows in (slice(0, 2), slice(2, 4)):  # the two groups
        ids, mask, out = forced[rows].reshape(-1, K), real[rows].reshape(-1), keep[rows]
        filled, flat = np.zeros(E, int), out.reshape(-1, K)
        for j in range(K):
            for t in np.nonzero(mask)[0]:
                flat[t, j] = filled[ids[t, j]] < capacity
                filled[ids[t, j]] += 1
        keep[rows] = flat.reshape(out.shape)
    return keep


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_forced_layer_matches_a_per_token_reference(dispatch):
    """One MoE layer, some tokens padding, a fifth of the assignments forced elsewhere: the
    output is each real token's sum over its forced experts that got a slot (capacity: 4 per
    expert and group, so some do not) of gate x FFN, the gates the router's renormalized
    scores at those experts, and the mismatch the share forced away."""
    d, f = 16, 32
    cfg = MoEConfig(num_experts=E, top_k=K, capacity_factor=1.0, min_capacity=1,
                    renormalize=True, num_groups=2, dispatch=dispatch)
    layer = MoE(d, f, cfg, "swiglu", mesh=None, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 8, d))
    real = np.ones((4, 8), bool)
    real[1, 5:] = real[3, 2:] = False
    run = nnx.jit(lambda m, x, real, forced: m(x, train=True, real=real, forced=forced,
                                               return_ids=True))
    own = np.asarray(run(layer, x, real, None)[1]["expert_ids"])  # the router's choice
    forced, _ = altered(own, 0.2, seed=3)
    y, aux = run(layer, x, real, forced)
    moved = np.asarray([[[e not in own[b, t] for e in forced[b, t]] for t in range(8)]
                        for b in range(4)])  # [B, S, k] assignments forced away
    want_mismatch = moved[real].mean()
    assert 0.1 < want_mismatch < 0.3
    assert float(aux["routing_mismatch"]) == pytest.approx(want_mismatch, abs=1e-6)
    np.testing.assert_array_equal(aux["expert_ids"], np.where(real[..., None], forced, E))
    # Capacity: ceil(1.0 x 16 tokens x 2 / 8) = 4 slots; dropless: a slot for every one.
    keep = kept(forced, real, 4 if dispatch == "capacity" else 16)
    assert keep[real].all() == (dispatch == "dropless")
    assert float(aux["dropped_frac"]) == pytest.approx(1 - keep[real].mean(), abs=1e-6)

    logits = np.asarray(x, np.float64) @ np.asarray(layer.router[...], np.float64)
    s = reference.scores(logits, "softmax")
    w_in = np.asarray(layer.w_in[...], np.float64)
    w_in = w_in.reshape(*w_in.shape[:-2], -1)
    w_out = np.asarray(layer.w_out[...], np.float64)
    want = np.zeros((4, 8, d))
    for b, t in zip(*np.nonzero(real), strict=True):
        gates = s[b, t, forced[b, t]] / s[b, t, forced[b, t]].sum()
        xt = np.asarray(x[b, t], np.float64)[None]
        want[b, t] = sum(g * reference.expert_ffn(xt, w_in[e], w_out[e], "swiglu")[0]
                         for g, e, slot in zip(gates, forced[b, t], keep[b, t], strict=True)
                         if slot)
    np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-4)


def test_cli_writes_the_routing_of_each_prompt(base, tmp_path, monkeypatch, capsys):
    params, _, _ = base
    c = config()
    s = setup(c)
    ckpt = Checkpoints(str(tmp_path), 1, False)
    ckpt.save(0, {"params": params, "opt_state": s.tx.init(params)}, {"step": 0,
                                                                      "tokens_seen": 0})
    ckpt.close()
    (tmp_path / "config.json").write_text(c.to_json_best_effort())
    out = tmp_path / "routing.npy"
    argv = ["generate", "--workdir", str(tmp_path), "--prompt", "def ", "--prompt", "x = 1",
            "--tokens", "5", "--temperature", "0", "--routing_out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    gen.main()
    printed = capsys.readouterr().out
    # "def " and "x = 1" in bytes: 4 and 5 prompt tokens, then 4 of the 5 new ones fed.
    for i, tokens in enumerate((8, 9)):
        record = np.load(tmp_path / f"routing-{i}.npy")
        assert record.shape == (tokens, 2, K) and record.dtype == np.int32
        assert f"routing-{i}.npy: {tokens} tokens x 2 MoE layers x top-2" in printed
    monkeypatch.setattr(sys, "argv", [*argv[:-1], str(tmp_path / "routing.txt")])
    with pytest.raises(SystemExit, match="^error: --routing_out='.*routing.txt': allowed: a "
                       "path ending in .npy or .jsonl$"):
        gen.main()
    # The same weights as an expert-choice run (its parameters have the same names): refused.
    c.model.update(routing="experts", dispatch="capacity")
    (tmp_path / "config.json").write_text(c.to_json_best_effort())
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="^error: --routing_out: model.routing='experts' is not "
                       "a token's own choice .*non-causal.*; allowed: tokens$"):
        gen.main()


def test_records_from_generate_train_through_the_data_path(base, tmp_path):
    """generate's records as a file (--routing_out FILE.jsonl) -> data.format=replay rows ->
    the train step: the recorded experts replayed change nothing (mismatch 0, the same loss),
    the loss only on the new tokens; a record altered in its last MoE layer reports exactly
    the share altered; a record that does not fit the model is one line."""
    from moejax import config_lib
    from moejax.data import replay, text

    params, rows, routing = base
    path = tmp_path / "records.jsonl"
    gen.write_routing(str(path), PROMPTS, rows, routing)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [len(r["tokens"]) for r in lines] == [len(p) + NEW for p in PROMPTS]
    c = config()
    c.data.update(source="files", path=str(path), format="replay", seq_len=80, eval_fraction=0.0)
    config_lib.validate(c, 1)
    packed = replay.rows(c.data, "train", c.model)
    assert packed.shape == (16, 3 + 2 * K, 81)  # one record a row: the next does not fit
    for row, prompt, new, record in zip(packed, PROMPTS, rows, routing, strict=True):
        n = len(prompt) + len(new)
        np.testing.assert_array_equal(row[3:, : n - 1].T.reshape(-1, 2, K), record)
        assert (row[3:, n - 1:] == -1).all()  # the last token (never fed) and the padding
        assert row[2, : len(prompt)].sum() == 0 and row[2, len(prompt):n].all()
    batch = text.batch_arrays(packed, None, True)
    s = setup(c)
    step = state.train_step_fn(s)
    init = jax.jit(lambda p: {"params": p, "opt_state": s.tx.init(p)}, out_shardings=s.shardings)
    natural = {k: v for k, v in batch.items() if k != "routing"}
    _, m0 = step(init(laid_out(s, params)), natural, jnp.int32(0))
    _, m1 = step(init(laid_out(s, params)), batch, jnp.int32(0))
    assert float(m1["routing_mismatch"]) == 0.0
    np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-6)
    wrong = [altered(r, 0.2, seed=i, last_layer_only=True)[0] for i, r in enumerate(routing)]
    gen.write_routing(str(path), PROMPTS, rows, wrong)
    moved = sum(int((w != r).sum()) for w, r in zip(wrong, routing, strict=True))
    real = sum(len(p) + NEW for p in PROMPTS) * 2 * K  # every real token's assignments
    batch = text.batch_arrays(replay.rows(c.data, "train", c.model), None, True)
    _, m2 = step(init(laid_out(s, params)), batch, jnp.int32(0))
    assert float(m2["routing_mismatch"]) == pytest.approx(moved / real, abs=1e-6)
    c.model.top_k = 1
    with pytest.raises(config_lib.ConfigError, match=r"records.jsonl:1: not a routing record "
                       r"\(routing: shape \[63, 2, 2\]; allowed: \[64 or 63, 2 MoE layers, "
                       r"top_k=1\] ints\); allowed: one JSON object a line"):
        replay.rows(c.data, "train", c.model)


@pytest.mark.slow
def test_train_cli_replays_records(base, tmp_path):
    """python -m moejax.train's data path end to end on data=2 x expert=4: records written by
    generate from the run's initial weights, replayed at step 1 with 0 mismatches."""
    from moejax import train

    params, rows, routing = base
    path = tmp_path / "records.jsonl"
    gen.write_routing(str(path), PROMPTS * 2, rows * 2, routing * 2)  # 32: train and eval
    c = config()
    c.mesh.update(data=2, expert=4)
    c.data.update(source="files", path=str(path), format="replay", seq_len=80, batch_size=8,
                  eval_fraction=0.5)
    c.train.update(steps=3, warmup_steps=1, log_every=1, eval_every=3, eval_batches=1,
                   keep_best=False)
    history = train.train_and_evaluate(c, str(tmp_path / "run"))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    mismatch = {r["step"]: r["moe/routing_mismatch"] for r in logged
                if "moe/routing_mismatch" in r}
    # Warm-up's first step moves nothing (learning rate 0); the second does.
    assert mismatch[1] == mismatch[2] == 0.0 and 0.0 < mismatch[3] < 1.0
    assert np.isfinite(history["eval_loss"][3])
