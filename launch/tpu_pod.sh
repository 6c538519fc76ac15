#!/usr/bin/env bash
# Train on a Cloud TPU pod slice (one JAX process per TPU VM host). The same command runs on
# every worker (--worker=all); each joins the job with `jax.distributed.initialize()`, which
# reads the slice (worker list, this worker's index) from the TPU VM metadata:
# STEPAUDIO_DISTRIBUTED=on asks for that, since a plain ssh session has no cluster variables.
# Multislice (queued resources with MEGASCALE_* set) is detected the same way.
#
# Usage (on your workstation):
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG [key=value ...]
#   launch/tpu_pod.sh my-v5p-128 us-east5-a configs/model/step1-130b.yaml \
#     train.run_dir=/mnt/shared/runs/step1 mesh.fsdp=-1
# Environment: REPO_DIR (the checkout on every worker, default stepaudio_jax in the home
# directory, with .venv installed: pip install -e '.[tpu]'), PROJECT (gcloud project, optional).
# train.run_dir must be a filesystem every worker mounts at the same path (Filestore, GCS FUSE):
# each process writes its own checkpoint shards and process 0 writes events and config.
set -euo pipefail
if (($# < 3)); then
  echo "usage: $0 TPU_NAME ZONE CONFIG [key=value ...]" >&2
  exit 2
fi
name=$1 zone=$2
shift 2
repo_dir=${REPO_DIR:-stepaudio_jax}
train_args=$(printf '%q ' "$@")
project=()
if [[ -n "${PROJECT:-}" ]]; then
  project=(--project "$PROJECT")
fi
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${project[@]}" --worker=all \
  --command "cd $(printf '%q' "$repo_dir") && STEPAUDIO_DISTRIBUTED=on .venv/bin/stepaudio train $train_args"
