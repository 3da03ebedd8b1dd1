#!/usr/bin/env bash
# Run N moejax.train processes on this machine, talking over loopback, to exercise the
# multi-host code paths (distributed init, per-host data, cross-process mesh) on CPU.
#
# Usage (from the repo root):  launch/local.sh N [train args...]
#   launch/local.sh 2 --config configs/tiny.py:smoke --workdir runs/local
#
# Environment:
#   PORT                 coordinator port on 127.0.0.1 (default 12355)
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 4)
#   WORKDIR_LOGS         folder for the logs of processes 1..N-1 (default /tmp);
#                        process i writes $WORKDIR_LOGS/moejax-local-<i>.log.
#                        Process 0 prints to this terminal.
set -euo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N [train args...]" >&2
  exit 2
fi
n=$1
shift
logs=${WORKDIR_LOGS:-/tmp}
mkdir -p "$logs"

# Whatever ends this script (a failed process, Ctrl-C, normal exit), stop the others:
# a process whose peer died would otherwise wait in a collective until a timeout.
# `jobs -p` lists only processes still running, so no stale pid is ever signalled.
cleanup() {
  local running
  running=$(jobs -p)
  if [[ -n $running ]]; then
    # shellcheck disable=SC2086  # one pid per word
    kill $running 2>/dev/null || true
    wait 2>/dev/null || true  # so the port is free when we return
  fi
}
trap cleanup EXIT
# Background jobs of a non-interactive shell ignore SIGINT, so Ctrl-C reaches only us.
trap 'exit 130' INT
trap 'exit 143' TERM

for ((i = 0; i < n; i++)); do
  # Several fake devices per process so the mesh spans processes, as it does across hosts.
  cmd=(env JAX_PLATFORMS=cpu
       XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4}"
       python -m moejax.train "$@"
       --coordinator "127.0.0.1:${PORT:-12355}" --num_processes "$n" --process_id "$i")
  if [[ $i -eq 0 ]]; then
    "${cmd[@]}" &
  else
    "${cmd[@]}" >"$logs/moejax-local-$i.log" 2>&1 &
  fi
done

# The first failure decides the exit code; the EXIT trap then stops the rest.
for ((left = n; left > 0; left--)); do
  wait -n || exit $?
done
