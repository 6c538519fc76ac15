"""benchmarks/train_step.py runs end to end on the tiny config and its JSON line is consistent."""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO

from stepaudio_jax.models.flops import train_step_flops
from stepaudio_jax.tasks.registry import load_config

NUMBERS = ("tokens_per_s", "achieved_flops", "matmul_peak_flops", "mfu_vs_measured_peak",
           "compiled_peak_bytes", "analytic_bytes", "step_seconds", "step_flops")


def run_benchmark(*args: str) -> dict:
  # One real CPU device, not the 8 emulated ones conftest gives in-process tests.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "train_step.py"), *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tiny_benchmark_reports_consistent_numbers():
  overrides = ("train.batch_size=2", "train.seq_len=64")
  r = run_benchmark("configs/tiny.yaml", *overrides, "--steps", "2", "--warmup", "1",
                    "--no-torch", "--against", "model.remat=none")
  assert r["config"] == "tiny"
  for key in NUMBERS:
    assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
  flops = train_step_flops(load_config(os.path.join(REPO, "configs/tiny.yaml"), overrides), 2)
  assert r["step_flops"] == pytest.approx(flops)
  assert r["achieved_flops"] == pytest.approx(flops / r["step_seconds"])
  assert r["tokens_per_s"] == pytest.approx(2 * 64 / r["step_seconds"])
  assert r["mfu_vs_measured_peak"] == pytest.approx(r["achieved_flops"] / r["matmul_peak_flops"])
  assert r["torch_tokens_per_s"] is None and r["speedup_vs_torch"] is None
  assert r["jax_version"] and r["device_kind"]
  assert r["against"] == ["model.remat=none"] and r["rounds"] == 2
  assert r["against_over_base"] == pytest.approx(r["against_step_seconds"] / r["step_seconds"])
