"""Issue #22, item 4: weighted mixtures of prepared stores (moejax/data/mixture.py, grain's
MapDataset.mix)."""

import json
from fractions import Fraction

import grain
import numpy as np
import pytest

from configs import tiny
from moejax import config_lib
from moejax.data import mixture, store, text
from moejax.data.batches import make_batches

# Three corpora told apart by content: every row of store L holds the letter L, and every row
# is unique (the text is L00000L00001...: no 17-token window repeats).
LETTERS = {"code": "C", "web": "W", "math": "M"}
SIZES = {"code": 2000, "web": 2600, "math": 3100}  # numbers per corpus: unequal stores
WEIGHTS = {"code": 0.25, "web": 0.6, "math": 0.15}  # 2.5, 6 and 1.5 rows of a 10-row batch
B = 10


def cfg_of(**kw):
    cfg = tiny.get_config().data
    cfg.update(**{"seq_len": 16, "batch_size": B, "eval_fraction": 0.2, **kw})
    return cfg


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    for name, letter in LETTERS.items():
        corpus = root / f"{name}.txt"
        corpus.write_text("".join(f"{letter}{i:05d}" for i in range(SIZES[name])))
        store.prepare(cfg_of(source="files", path=str(corpus), format="text"),
                      str(root / name), num_proc=1, print_fn=lambda line: None)
    return root


def mixture_cfg(root, weights=WEIGHTS, **kw):
    spec = ",".join(f"{root / name}:{w}" for name, w in weights.items())
    return cfg_of(source="prepared", mixture=spec, **kw)


def batches(root, split="train", seed=0, **kw):
    cfg = mixture_cfg(root, **kw)
    config_lib.check_data(cfg)
    return make_batches(cfg, text.ByteTokenizer(), split, seed)


def counts(mix, step):
    """{source: rows of global batch `step`}, from where the mixture says they come from."""
    m = mix.mixture
    return dict(zip(m.names, (m.taken((step + 1) * B) - m.taken(step * B)).tolist(),
                    strict=True))


def source_of(row) -> str:
    letters = {chr(t) for t in row if t < 256 and chr(t).isalpha()}
    assert len(letters) == 1, row
    return next(name for name, letter in LETTERS.items() if letter in letters)


def test_proportions_over_1000_steps_are_the_weights(stores):
    mix = batches(stores)
    assert mix.mixture.names == list(LETTERS)
    host = mix.host_batches(slice(0, B))
    seen = {name: 0 for name in LETTERS}
    for step in range(1000):
        rows = host[step]
        assert rows.shape == (B, 17) and rows.dtype == np.int32
        batch = {name: 0 for name in LETTERS}
        for row in rows:  # the source of every row, from its content
            batch[source_of(row)] += 1
        assert batch == counts(mix, step)
        for name, w in WEIGHTS.items():  # every batch is close to the weights, too
            assert abs(batch[name] - B * w) <= 1, (step, batch)
            seen[name] += batch[name]
    realised = {name: rows / (1000 * B) for name, rows in seen.items()}
    for name, w in WEIGHTS.items():
        assert abs(realised[name] / w - 1) < 0.01, realised
    assert dict(zip(mix.mixture.names, mix.mixture.taken(1000 * B).tolist(),
                    strict=True)) == seen
    assert mixture.line(mix.mixture, B, 1000) == (
        "data mixture over 1,000 steps: "
        f"code {realised['code']:.3f} (weight 0.250, {seen['code'] / 1000:.1f} of 10 rows/step "
        f"avg), web {realised['web']:.3f} (weight 0.600, {seen['web'] / 1000:.1f} of 10 "
        f"rows/step avg), math {realised['math']:.3f} (weight 0.150, "
        f"{seen['math'] / 1000:.1f} of 10 rows/step avg)")
    # What TensorBoard shows at step 1000 (data/mix/NAME): the same shares.
    assert mixture.scalars(mix.mixture, B, 1000) == {f"data/mix/{name}": r
                                                     for name, r in realised.items()}
    single = make_batches(cfg_of(), text.ByteTokenizer(), "eval", 0)
    assert single.mixture is None and mixture.line(single.mixture, B, 10) is None
    assert mixture.scalars(single.mixture, B, 10) == {}


@pytest.mark.parametrize("weights", [[Fraction(1, 3)] * 3, [0.3, 0.7], [0.01, 0.99],
                                     [0.123, 0.456, 0.2, 0.221]])
def test_counts_are_monotone_exact_and_random_access(weights):
    """Any weights: the rows each source gave sum to the rows read, never fall, follow the
    weights (grain rounds them to integers, the smallest to 100: within 1%, and a few rows),
    and are found for any row count directly, 10^12 rows in as fast as 10."""
    w = np.array([float(x) for x in weights])
    w /= w.sum()
    k = len(w)
    for seed in (0, 7):
        mix = mixture.Mixture([str(i) for i in range(k)], w, [np.zeros((5, 1), np.int32)] * k,
                              seed, True)
        taken = np.array([mix.taken(32 * s) for s in range(1001)])
        assert (taken.sum(1) == 32 * np.arange(1001)).all()
        assert (np.diff(taken, axis=0) >= 0).all()
        want = 32 * np.arange(1001)[:, None] * w
        assert (np.abs(taken - want) <= k + 0.01 * want).all()
        far = 10**12 * 32
        assert mix.taken(far).sum() == far and (np.abs(mix.taken(far) / far / w - 1) < 0.01).all()
        # Counted against grain's own choice, row by row, for the first 2,000 rows.
        sources = np.array([mix.picks[p][0] for p in range(2000)])
        for n in (0, 1, 17, 2000):
            assert mix.taken(n).tolist() == np.bincount(sources[:n], minlength=k).tolist()


def test_determinism_random_access_and_host_rows(stores):
    a, b = batches(stores, seed=3), batches(stores, seed=3)
    ha, hb = a.host_batches(slice(0, B)), b.host_batches(slice(0, B))
    for step in range(500):
        ha[step]
    # A resumed run: step 500 first, with no earlier step read, gives the very same rows.
    np.testing.assert_array_equal(hb[500], ha[500])
    for step in [7, 0, 499, 10**6]:
        np.testing.assert_array_equal(hb[step], ha[step])
    other = batches(stores, seed=4).host_batches(slice(0, B))
    assert not np.array_equal(other[0], ha[0])
    # Hosts: rows 4:7 of the global batch are exactly what a host reading 4:7 gets.
    for step in (0, 11):
        np.testing.assert_array_equal(a.host_batches(slice(4, 7))[step], ha[step][4:7])


def test_each_source_reads_its_own_shuffled_order(stores):
    """Source i's rows, as the mixture takes them, are its split in grain's index-shuffled
    order (its own seed, a new order each epoch): every sequence once per epoch."""
    mix, tok = batches(stores, seed=5), text.ByteTokenizer()
    cfg = mixture_cfg(stores)
    for i, name in enumerate(mix.mixture.names):
        own = store.open_split(cfg, tok, "train", path=str(stores / name))
        n, seed = len(own), mixture.seed_of(5, i)
        rows, step = [], 0
        while mix.mixture.taken(step * B)[i] < 2 * n:  # two epochs of this source
            batch = mix.host_batches(slice(0, B))[step]
            rows += [r for r in batch if source_of(r) == name]
            step += 1
        ids = [grain.experimental.index_shuffle(p % n, max_index=n - 1, seed=seed + p // n,
                                                rounds=4) for p in range(len(rows))]
        np.testing.assert_array_equal(np.stack(rows), own[ids])
        for epoch in (0, 1):  # every sequence exactly once per epoch
            assert sorted(ids[epoch * n:(epoch + 1) * n]) == list(range(n))
        assert ids[:n] != ids[n:2 * n]  # each epoch reshuffled
        assert len({tuple(r) for r in rows}) == n and len(rows) >= 2 * n  # by content


def test_eval_batches_are_each_split_in_order(stores):
    mix = batches(stores, split="eval")
    tok, cfg = text.ByteTokenizer(), mixture_cfg(stores)
    host = mix.host_batches(slice(0, B))
    rows = np.concatenate([host[step] for step in range(6)])
    for name in mix.mixture.names:
        own = store.open_split(cfg, tok, "eval", path=str(stores / name))
        mine = [r for r in rows if source_of(r) == name]
        np.testing.assert_array_equal(np.stack(mine), own[np.arange(len(mine)) % len(own)])
    np.testing.assert_array_equal(batches(stores, split="eval").host_batches(slice(0, B))[2],
                                  host[2])


@pytest.mark.parametrize("spec,problem", [
    ("a:0.3,b", "entry 'b': no weight"),
    ("a:0.3,b:x", "entry 'b:x': no weight"),
    ("a:0.3,b:nan", "entry 'b:nan': no weight"),
    ("a:0.3,b:inf", "entry 'b:inf': no weight"),
    ("a:0.3,b:1/0", "entry 'b:1/0': no weight"),
    ("a:0.3,b:0", "entry 'b:0': weight 0 is not > 0"),
    ("a:0.3,b:-0.7", "entry 'b:-0.7': weight -0.7 is not > 0"),
    ("a:0.3,:0.7", "entry ':0.7' names no store"),
    ("a:0.3,,b:0.7", "entry '' names no store"),
    ("a:0.5,a:0.5", "store 'a' appears twice"),
])
def test_bad_mixture_strings_are_refused_in_one_line(spec, problem):
    cfg = cfg_of(source="prepared", mixture=spec)
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.check_data(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"data.mixture={spec!r}: {problem}")
    assert msg.endswith("allowed: " + config_lib.MIXTURE_FORM)


def test_mixture_needs_prepared_source_and_no_path():
    with pytest.raises(config_lib.ConfigError, match=r"^data.mixture='a:1': needs "
                       r"data.source='prepared'.*data.mixture='' \(one source\)$"):
        config_lib.check_data(cfg_of(mixture="a:1"))
    with pytest.raises(config_lib.ConfigError, match=r"^data.path='x': unused with "
                       r"data.mixture.*allowed: ''$"):
        config_lib.check_data(cfg_of(source="prepared", path="x", mixture="a:1"))
    assert config_lib.parse_mixture("a:3, b/c:7") == [("a", Fraction(3, 10)),
                                                       ("b/c", Fraction(7, 10))]
    assert config_lib.parse_mixture("x:y/z:1") == [("x:y/z", 1)]  # a ':' in a path
    config_lib.check_data(cfg_of(source="prepared", mixture="a:1"))  # files: checked on open


def test_bad_stores_are_refused_in_one_line(stores, tmp_path):
    tok = text.ByteTokenizer()
    cfg = mixture_cfg(stores, {"code": 0.5, "nope": 0.5})
    with pytest.raises(config_lib.ConfigError, match=r"^data.mixture entry '.*nope': no such "
                       "folder; allowed: a folder written by python -m moejax.data prepare$"):
        make_batches(cfg, tok, "train", 0)
    with pytest.raises(config_lib.ConfigError, match=r"^data.mixture entry '.*code': the eval "
                       r"split holds \d+ sequences .*allowed: at least data.batch_size=1000 "):
        make_batches(mixture_cfg(stores, batch_size=1000), tok, "eval", 0)
    with pytest.raises(config_lib.ConfigError, match=r"^data.eval_fraction=0.1: the store "
                       r"data.mixture entry '.*code' holds out 0.2; allowed: 0.2 "):
        make_batches(mixture_cfg(stores, eval_fraction=0.1), tok, "train", 0)
    pytest.importorskip("tokenizers")
    from tests.test_store import hf_tokenizer_file

    path = hf_tokenizer_file(tmp_path)
    with pytest.raises(config_lib.ConfigError) as e:
        make_batches(mixture_cfg(stores, tokenizer=path), text.make_tokenizer(path),
                          "train", 0)
    assert "\n" not in str(e.value) and str(e.value).startswith(
        "data.mixture entry ") and "prepared with tokenizer 'byte'" in str(e.value)


def test_training_on_a_mixture_logs_the_proportions_so_far(stores, tmp_path):
    from moejax.train import train_and_evaluate

    config = tiny.get_config("smoke")
    config.data.update(source="prepared", mixture=mixture_cfg(stores).mixture, eval_fraction=0.2)
    config.mesh.data = 1  # the logged proportions do not depend on the layout
    config.train.update(steps=2, warmup_steps=1, log_every=1, eval_every=2, eval_batches=1)
    train_and_evaluate(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        logged = {row["step"]: {k: v for k, v in row.items() if k.startswith("data/mix/")}
                  for row in map(json.loads, f) if "train/loss" in row}
    mix = make_batches(config.data, text.ByteTokenizer(), "train", config.seed).mixture
    assert logged == {step: mixture.scalars(mix, config.data.batch_size, step) for step in (1, 2)}
    assert sorted(logged[2]) == ["data/mix/code", "data/mix/math", "data/mix/web"]
