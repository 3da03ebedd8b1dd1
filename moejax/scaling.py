"""Switch Transformer's scaling result at small scale: dense vs top-1 MoE with 2-16 experts,
at equal FLOPs per token and equal steps (configs/switch_scaling.py).

  python -m moejax.scaling --config configs/switch_scaling.py[:smoke] [--variants dense,e2,e4]
      [--workdir runs/scaling] [--out docs] [--config.train.steps=300 ...]

Each variant trains in WORKDIR/<variant> through train.train_and_evaluate, its config read as
`--config PATH:<variant>` with the --config.KEY=VALUE overrides (a variant of --config itself,
as in `:smoke`, is appended to each: `:e4,smoke`). A variant whose workdir holds a finished run
of the same config is not trained again; an unfinished one resumes from its newest checkpoint.
Then OUT/scaling.md gets the results between two marker lines (text around them is kept) and
OUT/scaling.png the held-out loss curves, one line per variant. OUT is WORKDIR unless given:
the checked-in docs/scaling.md changes only when asked for (`make scaling` passes --out docs).
"""

import datetime
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from moejax import cli, config_lib
from moejax.data import text
from moejax.model.transformer import Transformer, moe_layer_ids
from moejax.run.flops import train_flops_per_token
from moejax.run.params import param_counts
from moejax.run.workdir import changed_keys
from moejax.train import train_and_evaluate

VARIANTS = ("dense", "e2", "e4", "e8", "e16")
BEGIN = "<!-- scaling:begin (written by moejax.scaling) -->"
END = "<!-- scaling:end -->"


SWITCH = os.path.join(config_lib.CONFIGS, "switch_scaling.py")


def variant_config(variant: str, overrides: Sequence[str] = (), path: str = SWITCH):
    """PATH:<variant> with `--config.train.steps=300`-style overrides, read as train reads
    --config (cli.load): a bad key or value is its one-line ConfigError."""
    config = cli.load(f"{path}:{variant}", overrides)
    # Filled in here as the trainer does, so this config compares equal to its config.json.
    config.model.vocab_size = (config.model.vocab_size
                               or text.make_tokenizer(config.data.tokenizer).vocab_size)
    return config


def param_summary(config) -> dict:
    """{'total', 'active', 'router'} parameters of the model, counted on its abstract shapes.
    Router weights (d_model x E per MoE layer) are the only active parameters dense lacks."""
    model = nnx.eval_shape(lambda: Transformer(config.model, mesh=None, rngs=nnx.Rngs(0)))
    counts = param_counts(model, config.model.top_k, config.model.num_experts)
    router = sum(math.prod(v.shape) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                 if path[-1] == "router")
    return {"total": counts["total"], "active": counts["active"], "router": router}


def read_metrics(workdir: str) -> list[dict]:
    """metrics.jsonl rows. A resumed run logs the steps after its checkpoint again: the later
    rows, from the run that went on, are the ones that count, so callers let them win."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_curve(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}


def routing_stats(rows: list[dict], num_experts: int, since_step: int) -> list[dict]:
    """Per MoE layer, averaged over the train logs from `since_step` on: dropped fraction and
    the busiest and idlest expert's share of assignments, in units of the uniform share 1/E."""
    latest = {}
    for r in rows:
        if r["step"] >= since_step and any(k.startswith("moe/layer_") for k in r):
            latest[r["step"]] = r
    layers = sorted({k.split("/")[1] for r in latest.values() for k in r
                     if k.startswith("moe/layer_")})
    stats = []
    for layer in layers:
        load = np.array([[r[f"moe/{layer}/load/expert_{e:02d}"] for e in range(num_experts)]
                         for r in latest.values()]) * num_experts
        dropped = np.mean([r[f"moe/{layer}/dropped_frac"] for r in latest.values()])
        stats.append({"layer": int(layer.split("_")[1]), "dropped": float(dropped),
                      "max_load": float(load.max(1).mean()), "min_load": float(load.min(1).mean())})
    return stats


def saved_config_differs(config, workdir: str) -> list[str]:
    """Keys whose values differ from the config.json a run already wrote in workdir."""
    return [key for key, _, _ in changed_keys(workdir, config) if key != "train.stop_at"]


def git(*args) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def git_commit() -> str:
    """Short commit hash of the code, with '+changes' if tracked files differ from it."""
    try:
        changed = git("status", "--porcelain", "--untracked-files=no").strip()
        return git("rev-parse", "--short", "HEAD").strip() + ("+changes" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    """'<cpu model>, <n> cores' (Linux), or what platform knows."""
    model = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    return f"{model}, {os.cpu_count()} cores"


def run_variant(variant: str, config, workdir: str) -> dict:
    """Train `variant` in workdir unless a finished run of this config is there already."""
    if differs := saved_config_differs(config, workdir):
        raise SystemExit(f"error: {workdir} holds a run of another config (differs in "
                         f"{', '.join(differs[:5])}); delete it or pass another --workdir")
    steps = config.train.steps
    info_path = os.path.join(workdir, "scaling.json")
    if steps not in eval_curve(read_metrics(workdir)):
        info = {"wall_s": 0.0}
        if os.path.exists(info_path):  # an interrupted earlier call: add to its time
            with open(info_path) as f:
                info = json.load(f)
        print(f"=== {variant}: training in {workdir}", flush=True)
        start = time.perf_counter()
        train_and_evaluate(config, workdir)
        info.update(wall_s=info["wall_s"] + time.perf_counter() - start, commit=git_commit())
        with open(info_path, "w") as f:
            json.dump(info, f)
        if steps not in eval_curve(read_metrics(workdir)):  # SIGTERM: saved, not finished
            raise SystemExit(f"{variant} stopped before step {steps}; run the same command "
                             "again to resume")
    else:
        print(f"=== {variant}: reusing the finished run in {workdir}", flush=True)
    info = {}
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
    rows = read_metrics(workdir)
    counts = param_summary(config)
    return {
        "variant": variant, "experts": config.model.num_experts, **counts,
        "flops": train_flops_per_token(counts["active"], config.model, config.data.seq_len),
        "moe_layers": moe_layer_ids(config.model),
        "eval": eval_curve(rows), "wall_s": info.get("wall_s"), "commit": info.get("commit"),
        "routing": routing_stats(rows, config.model.num_experts, since_step=steps * 3 // 4),
    }


def results_markdown(records: list[dict], config, command: str) -> str:
    """The generated part of scaling.md: setup line, tables and the checks of the claim."""
    steps = config.train.steps
    m, d, t = config.model, config.data, config.train
    evals = sorted(records[0]["eval"])
    marks = sorted({min(evals, key=lambda s, q=q: abs(s - steps * q)) for q in (0.25, 0.5, 0.75)})
    dense = next((r for r in records if r["experts"] == 0), None)
    commits = sorted({r["commit"] or "unknown" for r in records})
    moe_layers = next((r["moe_layers"] for r in records if r["moe_layers"]), [])
    lines = [
        BEGIN,
        "```bash",
        command,
        "```",
        "",
        f"Written {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Trained at commit "
        f"{', '.join(commits)}; jax {jax.__version__}, {jax.devices()[0].device_kind} "
        f"({machine()}, shared with other jobs: wall times are indicative only).",
        "",
        f"Model: {m.num_layers} layers, d_model {m.d_model}, {m.num_heads} heads, {m.activation} "
        f"FFN d_ff {m.d_ff} (per expert; dense: the same width), top-{m.top_k}, MoE in layers "
        f"{moe_layers}, capacity factor {m.capacity_factor} train / "
        f"{m.eval_capacity_factor} eval, balance coef {t.balance_coef}. Data: {d.source}, "
        f"{d.tokenizer} tokens, batch {d.batch_size} x {d.seq_len} = {d.batch_size * d.seq_len} "
        f"tokens, {steps} steps, lr {t.lr} {t.schedule}, seed {config.seed} (the same batches "
        f"in the same order for every variant). Held-out loss: {t.eval_batches} fixed batches "
        f"of held-out files, every {t.eval_every} steps.",
        "",
        "| variant | experts | total params | active params / token | train MFLOP / token | "
        + " | ".join(f"held-out loss @{s}" for s in marks)
        + f" | **@{steps}** | vs dense | wall time |",
        "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in marks)
        + " | ---: | ---: | ---: |",
    ]
    for r in records:
        final = r["eval"][steps]
        vs = f"{final - dense['eval'][steps]:+.4f}" if dense and r is not dense else ""
        wall = f"{r['wall_s'] / 60:.1f} min" if r["wall_s"] else "n/a"
        router = f" (incl. {r['router']:,} router)" if r["router"] else ""
        lines.append(
            f"| {r['variant']} | {r['experts'] or '-'} | {r['total']:,} | {r['active']:,}{router} "
            f"| {r['flops'] / 1e6:.2f} | " + " | ".join(f"{r['eval'][s]:.4f}" for s in marks)
            + f" | **{final:.4f}** | {vs} | {wall} |")

    moe = [r for r in records if r["experts"]]
    if moe:
        lines += ["", f"Routing over the last quarter of training (train batches, capacity "
                  f"factor {m.capacity_factor}); load in units of the uniform share 1/E:", "",
                  "| variant | MoE layer | dropped | busiest expert | idlest expert |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for r in moe:
            for s in r["routing"]:
                lines.append(f"| {r['variant']} | {s['layer']} | {100 * s['dropped']:.1f}% | "
                             f"{s['max_load']:.2f} | {s['min_load']:.2f} |")

    lines += ["", "Checks of the claim, on the final held-out loss:", ""]
    ranked = sorted(records, key=lambda r: r["eval"][steps])
    lines.append("- best first: " + " < ".join(
        f"{r['variant']} {r['eval'][steps]:.4f}" for r in ranked))
    if dense and moe:
        beat = [r["variant"] for r in moe if r["eval"][steps] < dense["eval"][steps]]
        lines.append(f"- every MoE variant beats dense: {'yes' if len(beat) == len(moe) else 'no'}"
                     f" ({len(beat)} of {len(moe)}{': ' + ', '.join(beat) if beat else ''})")
    by_e = sorted(moe, key=lambda r: r["experts"])
    if len(by_e) > 1:
        final = [r["eval"][steps] for r in by_e]
        better = all(b < a for a, b in zip(final[:-1], final[1:], strict=True))
        lines.append(f"- held-out loss improves with every doubling of experts: "
                     f"{'yes' if better else 'no'}")
    lines += ["", "![held-out loss vs steps](scaling.png)", END]
    return "\n".join(lines)


def write_doc(path: str, block: str) -> None:
    """Replace the generated block of `path`, keeping what was written around it."""
    text = f"# Switch scaling at small scale\n\n{BEGIN}\n{END}\n"
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def plot(records: list[dict], path: str, steps: int) -> bool:
    """Held-out loss vs steps, one line per variant: the whole run, and its second half."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot", file=sys.stderr)
        return False
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.get_cmap("viridis")
    moe = sorted({r["experts"] for r in records if r["experts"]})
    for r in records:
        xs = sorted(r["eval"])
        style = ({"color": "black", "linestyle": "--"} if not r["experts"] else
                 {"color": colors(0.85 * moe.index(r["experts"]) / max(len(moe) - 1, 1))})
        for ax in axes:
            ax.plot(xs, [r["eval"][x] for x in xs], marker=".", label=r["variant"], **style)
    full, zoom = axes
    full.set_title("held-out loss (nats per token)")
    late = [r["eval"][x] for r in records for x in r["eval"] if x >= steps // 2]
    zoom.set_xlim(steps // 2 - steps // 40, steps + steps // 40)
    pad = 0.1 * (max(late) - min(late) + 1e-3)
    zoom.set_ylim(min(late) - pad, max(late) + pad)
    zoom.set_title("second half, zoomed")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    zoom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(variants, out: str, workdir: str, overrides: Sequence[str] = (), command: str = "",
        path: str = SWITCH) -> list[dict]:
    """Train (or reuse) every variant, then write OUT/scaling.md and OUT/scaling.png."""
    configs = [variant_config(v, overrides, path) for v in variants]  # all checked first
    records = []
    for v, config in zip(variants, configs, strict=True):
        records.append(run_variant(v, config, os.path.join(workdir, v.replace(",", "_"))))
    os.makedirs(out, exist_ok=True)
    plot(records, os.path.join(out, "scaling.png"), configs[0].train.steps)
    write_doc(os.path.join(out, "scaling.md"), results_markdown(records, configs[0], command))
    print(f"wrote {out}/scaling.md and {out}/scaling.png")
    return records


def overrides_of(argv: list[str]) -> list[str]:
    """The --config.KEY=VALUE arguments of argv (a value given as the next argument too)."""
    out = []
    for i, arg in enumerate(argv):
        if re.match(r"^--?(no)?config\.", arg):
            out.append(arg)
            if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                out.append(argv[i + 1])
    return out


def main(argv=None):
    from absl import flags
    from ml_collections import config_flags

    argv = sys.argv if argv is None else argv
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "configs/switch_scaling.py[:variant]; a "
                                    "variant, e.g. :smoke, goes after each of --variants (e4 "
                                    "-> e4,smoke)", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    flags.DEFINE_list("variants", list(VARIANTS), "the config's variants, one run each",
                      flag_values=fv)
    flags.DEFINE_string("out", None, "where scaling.md and scaling.png go (default: "
                        "--workdir; docs to update the checked-in docs/scaling.md)",
                        flag_values=fv)
    flags.DEFINE_string("workdir", "runs/scaling", "one subdirectory per variant",
                        flag_values=fv)
    flags.mark_flag_as_required("config", flag_values=fv)
    with cli.one_line_errors():
        cli.positional(cli.parse_flags(argv, __doc__, fv), {})
        if not fv.variants:
            raise config_lib.ConfigError("--variants is empty; allowed: comma-separated "
                                         f"variants of the config, e.g. {','.join(VARIANTS)}")
        path, _, suffix = fv["config"].config_filename.partition(":")
        variants = [f"{v},{suffix}" if suffix else v for v in fv.variants]
        overrides = overrides_of(argv[1:])
        for v in variants:  # a wrong name is found before any variant trains
            try:
                variant_config(v, overrides, path)
            except config_lib.ConfigError as e:  # --config and the overrides loaded: v's
                given, text = f"--config={path}:{v}: ", str(e)
                if text.startswith(given):
                    each = f" (each ,{suffix} from --config)" if suffix else ""
                    text = (f"--variants={','.join(fv.variants)}{each}: "
                            f"{text.removeprefix(given)}")
                raise config_lib.ConfigError(text) from None
        command = " ".join(["python -m moejax.scaling", *map(shlex.quote, argv[1:])])
        run(variants, fv.out or fv.workdir, fv.workdir, overrides, command, path)


if __name__ == "__main__":
    main()
