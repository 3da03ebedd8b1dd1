#!/usr/bin/env bash
# The GPU check, from the repo root, in under 9 minutes on one H100 or H200:
#   bash bench/gpu.sh        (logs go to $OUT, default /tmp/moejax-gpu)
# It checks cuDNN attention against XLA's, and times what only a GPU runs: the bf16 MoE
# layer through batched matmuls (capacity) and lax.ragged_dot (dropless), and whole configs/moe_1b.py train steps with cuDNN attention,
# capacity and dropless against the dense twin, with MFU. Numbers go in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/moejax-gpu}"
mkdir -p "$out"

# Wheels shipped beside the repo, for a machine without internet (e.g. ml_collections).
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# This tree's moejax (and configs/), not an installed copy.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c 'import jax; assert jax.default_backend() == "gpu"' 2>/dev/null; then
    python3 -m pip install -U "jax[cuda13]"  # CUDA 12 drivers: "jax[cuda12]" works as well
    python3 -c 'import jax; assert jax.default_backend() == "gpu", jax.devices()'
fi
# jax takes 75% of GPU memory by default; the train bench holds three AdamW states at once.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"

{ nvidia-smi -L || echo "nvidia-smi: not found"; } | tee "$out/devices.txt"
python3 -c 'import jax; print("jax", jax.__version__, jax.devices())' | tee -a "$out/devices.txt"

# One MoE FFN of configs/moe_1b.py (d_model 1024, d_ff 2304, 8 experts, top-2) vs the dense
# FFN of equal active FLOPs, fwd+bwd, on 16384 tokens (a batch of 8 x 2048).
python3 -m moejax.bench layer --dtype bfloat16 --dispatch=capacity,dropless --experts=8 \
    --top_k 2 --d_model 1024 --d_ff 2304 --tokens 16384 --repeats 50 2>&1 | tee "$out/layer.txt"

# cuDNN's attention paths (plain, windowed, the packed layout for documents either side of
# kernels.PACKED_RUNS) against XLA's attention in float32, values and gradients.
python3 bench/attention_gpu.py 2>&1 | tee "$out/attention.txt"

# Whole train steps, round-robin, so all three states (two MoE, one dense: 28.5 GiB of params
# and AdamW moments) stay on the GPU beside one step's activations. `python -m moejax.plan
# --config configs/moe_1b.py --config.model.vocab_size=50257 --mesh data=1
# --config.data.batch_size=4` puts those at 60 GiB (XLA:CPU's figure, attention scores
# included, which cuDNN never stores) and at 110 GiB for batch 8: batch 4 x 2048 where jax
# may use 96 GiB or more (H200), else 2 (H100 80 GB).
gib=$(python3 -c 'import jax; print((jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0) >> 30)')
batch=$(( gib >= 96 ? 4 : 2 ))
python3 -m moejax.bench train --config configs/moe_1b.py --vocab_size 50257 \
    --dispatch=capacity,dropless --batch_size "$batch" --seq_len 2048 --repeats 10 2>&1 \
    | tee "$out/train.txt"

# The planner's prediction of the same three steps (plan --target, compiled on the CPUs beside
# the GPU; balanced routing, so it stands beside the balanced rows), then measured vs predicted.
case "$(nvidia-smi -L 2>/dev/null | head -1)" in
    *H200*) target=h200 ;; *H100*) target=h100 ;; *B200*) target=b200 ;; *) target="" ;;
esac
if [ -z "$target" ]; then echo "no plan target for this GPU: prediction skipped"; exit 0; fi
for row in capacity dropless dense; do
    experts=$([ "$row" = dense ] && echo 0 || echo 8)
    dispatch=$([ "$row" = dense ] && echo capacity || echo "$row")
    python3 -m moejax.plan --config configs/moe_1b.py --mesh data=1 --target "$target" \
        --config.model.vocab_size=50257 --config.data.batch_size="$batch" \
        --config.data.seq_len=2048 --config.model.num_experts="$experts" \
        --config.model.dispatch="$dispatch" > "$out/plan_$row.txt" 2>&1 &
done
wait
python3 - "$out" "$target" <<'PY' | tee "$out/measured_vs_predicted.txt"
import re, sys
out, target = sys.argv[1:]
measured = {}  # "capacity balanced" -> step ms, from bench train's table
for line in open(f"{out}/train.txt"):
    cols = line.split()
    if len(cols) == 8 and cols[0] in ("moe:capacity", "moe:dropless", "dense"):
        measured[(cols[0].removeprefix("moe:"), cols[1])] = float(cols[3])
print(f"moe_1b train step on {open(f'{out}/devices.txt').readline().strip()}, "
      f"plan --target {target}")
# error as docs/performance.md gives it: predicted over measured tokens/s, less 1
print(f"{'path':>9} {'routing':>9} {'measured ms':>12} {'predicted ms':>13} {'error':>7}")
for row in ("capacity", "dropless", "dense"):
    text = open(f"{out}/plan_{row}.txt").read()
    predicted = float(re.search(r"predicted step on [^:]+: ([\d,.]+) ms", text)[1].replace(",", ""))
    for routing in ("balanced", "natural") if row != "dense" else ("-",):
        got = measured.get((row, routing))
        error = f"{got / predicted - 1:+.0%}" if got else "n/a"
        print(f"{row:>9} {routing:>9} {got or float('nan'):>12.1f} {predicted:>13.1f} {error:>7}")
PY
