#!/usr/bin/env bash
# N JAX processes on this host, joined through the explicit STEPAUDIO_* variables: the way to
# try a multi-process run (per-process data loading, multi-process checkpoints) on one CPU
# machine, and what tests/test_launch.py runs.
#
# Usage (from the repository root):
#   launch/local_multiprocess.sh N DEVICES_PER_PROCESS CONFIG [key=value ...]
#   launch/local_multiprocess.sh 2 4 configs/tiny.yaml mesh.data=2 mesh.fsdp=2 mesh.tensor=2
# Environment: PYTHON (default .venv/bin/python), PORT (default: a free one),
# JAX_PLATFORMS (default cpu; DEVICES_PER_PROCESS emulated CPU devices each).
set -euo pipefail
if (($# < 3)); then
  echo "usage: $0 N DEVICES_PER_PROCESS CONFIG [key=value ...]" >&2
  exit 2
fi
n=$1 devices=$2 config=$3
shift 3
python=${PYTHON:-.venv/bin/python}
free_port='import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
port=${PORT:-$("$python" -c "$free_port")}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export XLA_FLAGS="--xla_force_host_platform_device_count=$devices"
export STEPAUDIO_COORDINATOR=127.0.0.1:$port STEPAUDIO_NUM_PROCESSES=$n

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < n; i++)); do
  STEPAUDIO_PROCESS_ID=$i "$python" -m stepaudio_jax.cli train "$config" "$@" &
  pids+=($!)
done
# The first failure stops the others at once (they would otherwise wait for the dead peer).
status=0
for _ in "${pids[@]}"; do
  rc=0
  wait -n || rc=$?
  if ((rc && !status)); then
    status=$rc
    kill "${pids[@]}" 2>/dev/null || true
  fi
done
exit "$status"
