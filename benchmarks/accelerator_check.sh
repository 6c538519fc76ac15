#!/usr/bin/env bash
# Everything that needs a lent GPU (or a TPU VM), as one run of under 10 minutes: the Pallas
# kernels compiled for the device (not interpreted) against the XLA reference, forward,
# backward and decode; then the attention and decode benchmarks.
#
#   bash benchmarks/accelerator_check.sh [OUT_DIR]        # default runs/accelerator_check
#
# On a machine without this package's dependencies but with jax, flax, optax and pytest (the
# lent H200 image), put the missing wheels in .whl/ first (here: omegaconf for Python 3.12,
# `pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl omegaconf==2.4.0`);
# they are installed to a scratch folder, never into the system.
# Each stage has its own time limit, so one that hangs cannot eat the others' time; the
# logs, the device description and the benchmarks' JSON lines land in OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/accelerator_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${JAX_PLATFORMS:-}" ]; then
  if command -v nvidia-smi >/dev/null; then export JAX_PLATFORMS=cuda; else export JAX_PLATFORMS=tpu; fi
fi
py=${PYTHON:-python3}
if ! "$py" -c "import omegaconf" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/stepaudio_site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/stepaudio_site"
fi

status=0
stage() {  # stage NAME SECONDS COMMAND...: run, log to OUT_DIR/NAME.log, remember a failure
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc"
  [ "$rc" = 0 ] || status=1
}

stage device 60 "$py" -c "import jax; print(jax.__version__, jax.devices())"
command -v nvidia-smi >/dev/null && nvidia-smi > "$out/nvidia-smi.txt" 2>&1
stage kernels 240 "$py" -m pytest -q -p no:cacheprovider -rs \
  tests/test_pallas_attention.py tests/test_decode_attention.py -k accelerator
stage attention 200 "$py" benchmarks/attention.py --iters 10
stage decode 120 "$py" benchmarks/decode_attention.py --iters 20
exit $status
