#!/usr/bin/env bash
# Set up, start and stop moejax on every worker VM of a Cloud TPU pod slice.
#
# Usage:  launch/tpu_pod.sh NAME ZONE setup|train|stop [train args...]
#   launch/tpu_pod.sh my-v4-32 us-central2-b setup
#   launch/tpu_pod.sh my-v4-32 us-central2-b train \
#     --config configs/moe_1b.py --workdir /mnt/shared/run1
#   launch/tpu_pod.sh my-v4-32 us-central2-b stop
#
# Environment:
#   REPO_URL  git URL to clone on the workers. The default is a placeholder
#             (https://github.com/OWNER/moejax): set it to your fork or mirror.
#   PYTHON    Python on the workers (default python3; needs Python >= 3.11).
#
# --workdir must be one directory every worker sees (an NFS or gcsfuse mount), because all
# workers write their parts of each checkpoint into it.
#
# Every worker runs the same command. MOEJAX_DISTRIBUTED=1 makes moejax.train call
# jax.distributed.initialize() with no arguments, which finds the peers from the TPU
# metadata, so no --coordinator flags are passed. Training output: ~/moejax.log.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 NAME ZONE setup|train|stop [train args...]" >&2
  exit 2
fi
name=$1 zone=$2 action=$3
shift 3
repo=${REPO_URL:-https://github.com/OWNER/moejax}
py=${PYTHON:-python3}

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"
}

case $action in
  setup)
    # Clone only once, so setup can be re-run after a failed install.
    on_all_workers "set -e
      [ -d ~/moejax ] || git clone $(printf %q "$repo") ~/moejax
      cd ~/moejax
      $py -m pip install -e .
      $py -m pip install 'jax[tpu]'"
    ;;
  train)
    # %q quotes each argument once more, since the remote shell parses the command again.
    # nohup + </dev/null: the job outlives the ssh session, and ssh does not wait for it.
    args=""
    if [[ $# -gt 0 ]]; then args=$(printf ' %q' "$@"); fi
    on_all_workers "cd ~/moejax && MOEJAX_DISTRIBUTED=1 nohup $py -m moejax.train$args > ~/moejax.log 2>&1 < /dev/null &"
    ;;
  stop)
    # [m] keeps pkill from matching (and killing) the remote shell running this very command;
    # || true: a worker with nothing running is not an error.
    on_all_workers "pkill -f '[m]oejax[.]train' || true"
    ;;
  *)
    echo "unknown action '$action': use setup, train or stop" >&2
    exit 2
    ;;
esac
