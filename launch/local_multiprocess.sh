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
#
# Stopping (launch/README.md): SIGTERM or SIGINT to this script reaches every process as one
# SIGTERM, so they stop after the same step, save together and exit 0. A process that fails or
# is killed takes the others down with SIGKILL at once, and the script exits with its status.
set -euo pipefail
if (($# < 3)); then
  echo "usage: $0 N DEVICES_PER_PROCESS CONFIG [key=value ...]" >&2
  exit 2
fi
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 501)); then
  echo "$0: needs bash >= 5.1 (wait -n -p), this is $BASH_VERSION" >&2
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
declare -A rank
# A preemption of the whole job: every process gets SIGTERM, agrees on a step with the others,
# saves its part of the final checkpoint and exits 0. A second signal is forwarded too, and
# makes the processes give up the save (they exit 3; the newest complete checkpoint stays).
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < n; i++)); do
  STEPAUDIO_PROCESS_ID=$i "$python" -m stepaudio_jax.cli train "$config" "$@" &
  pids+=($!)
  rank[$!]=$i
done
# A failed process stops the others with SIGKILL, not SIGTERM: SIGTERM would start their final
# checkpoint save, a collective that cannot finish without the dead process and would block
# until JAX's heartbeat gives up (80 s). The newest complete checkpoint is unaffected.
status=0
left=$n
while ((left)); do
  unset done_pid
  rc=0
  wait -n -p done_pid || rc=$?
  [[ -n ${done_pid:-} ]] || continue  # a signal interrupted the wait (and was forwarded)
  left=$((left - 1))
  if ((rc && !status)); then
    status=$rc
    how="exited with status $rc"
    ((rc <= 128)) || how="was killed by signal $((rc - 128))"
    echo "$0: process ${rank[$done_pid]} (pid $done_pid) $how; killing the other processes" >&2
    kill -KILL "${pids[@]}" 2>/dev/null || true
  fi
done
exit "$status"
