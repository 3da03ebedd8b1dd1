"""The Switch scaling experiment: its variants' accounting, and the runner on smoke variants."""

import pytest

from moejax import scaling
from moejax.config_lib import ConfigError


def test_variants_differ_only_in_expert_parameters():
    dense = scaling.param_summary(scaling.variant_config("dense"))
    assert dense["total"] == dense["active"] and dense["router"] == 0
    totals = [dense["total"]]
    for variant in ("e2", "e4", "e8", "e16"):
        c = scaling.param_summary(scaling.variant_config(variant))
        # Same work per token: the router is all a token touches that dense lacks (< 1%).
        assert c["active"] - c["router"] == dense["active"], variant
        assert c["router"] < 0.01 * dense["active"]
        totals.append(c["total"])
    assert totals == sorted(totals) and len(set(totals)) == 5  # more experts, more parameters


def test_overrides_and_unknown_keys():
    config = scaling.variant_config("e4", ["--config.train.steps=7",
                                           "--config.model.jitter_eps=0.5"])
    assert config.train.steps == 7 and config.model.jitter_eps == 0.5
    with pytest.raises(ConfigError, match="unknown key train.stepz; did you mean train.steps?"):
        scaling.variant_config("e4", ["--config.train.stepz=7"])
    with pytest.raises(ConfigError, match="unknown variant 'e3'; allowed: dense, e2"):
        scaling.variant_config("e3")


# The runs on one device: the runner's table, plot and reuse do not depend on the layout, and
# the steps, evaluations and saves of a run on the 8 simulated devices take longer.
ONE = ["--config.mesh.data=1"]


@pytest.mark.slow  # two trainings: 23 s of the fast suite's 10 minutes
def test_runner_writes_table_and_plot_then_reuses_finished_runs(tmp_path, monkeypatch):
    variants, out, runs = ["dense,smoke", "e2,smoke"], tmp_path / "docs", tmp_path / "runs"
    records = scaling.run(variants, str(out), str(runs), ONE, command="python -m ...")
    text = (out / "scaling.md").read_text()
    for variant in variants:
        assert f"| {variant} |" in text
    assert records[1]["routing"] and "every MoE variant beats dense" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert (out / "scaling.png").read_bytes().startswith(b"\x89PNG")

    # Text written around the generated block survives; finished runs are not trained again.
    (out / "scaling.md").write_text("# intro\n\n" + text + "\n## Findings\n")

    def no_training(*args):
        raise AssertionError("trained again")

    monkeypatch.setattr(scaling, "train_and_evaluate", no_training)
    again = scaling.run(variants, str(out), str(runs), ONE, command="python -m ...")
    assert [r["eval"] for r in again] == [r["eval"] for r in records]
    text = (out / "scaling.md").read_text()
    assert text.startswith("# intro") and text.endswith("## Findings\n")
    assert text.count(scaling.BEGIN) == 1

    # The command line: --config's own variant goes after each of --variants' (the same runs).
    argv = ["--config", f"{scaling.SWITCH}:smoke", "--variants=dense,e2", f"--out={out}",
            f"--workdir={runs}", *ONE]
    scaling.main(["scaling", *argv])
    text = (out / "scaling.md").read_text()
    assert "python -m moejax.scaling " + " ".join(argv) in text and "| e2,smoke |" in text

    # A workdir holding a different config is an error, not a silent mix of two runs.
    with pytest.raises(SystemExit, match="lr"):
        scaling.run(variants[:1], str(out), str(runs), [*ONE, "--config.train.lr=0.1"])
