#!/usr/bin/env bash
# Train on an existing Cloud TPU pod slice (one JAX process per TPU VM host): the same command
# on every worker (--worker=all), each joining the job from the TPU VM metadata
# (STEPAUDIO_DISTRIBUTED=on). A shorthand for `launch/submit.py tpu --no-create`, which also
# creates and deletes slices and runs multislice jobs (launch/README.md); the config and its
# overrides are checked against the slice here first.
#
# Usage (on your workstation, from the repository root):
#   launch/tpu_pod.sh TPU_NAME ZONE TYPE CONFIG [key=value ...]
#   launch/tpu_pod.sh my-v5p-128 us-east5-a v5p-128 configs/model/step1-130b.yaml \
#     train.run_dir=/mnt/shared/runs/step1
# Environment: REPO_DIR (the checkout on every worker, default stepaudio_jax in the home
# directory, with .venv installed: pip install -e '.[tpu]'), PROJECT (gcloud project, optional),
# PYTHON (default .venv/bin/python), DRY_RUN=1 (print the command, run nothing).
set -euo pipefail
if (($# < 4)); then
  echo "usage: $0 TPU_NAME ZONE TYPE CONFIG [key=value ...]" >&2
  exit 2
fi
name=$1 zone=$2 type=$3
shift 3
dry=()
[[ -z "${DRY_RUN:-}" ]] || dry=(--dry-run)
exec "${PYTHON:-.venv/bin/python}" "$(dirname "$0")/submit.py" tpu "${dry[@]}" --no-create \
  --name "$name" --zone "$zone" --type "$type" --repo-dir "${REPO_DIR:-stepaudio_jax}" "$@"
