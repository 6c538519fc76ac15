"""`stepaudio sweep`: specs expand to named variants, bad specs fail before anything runs, and
an interrupted sweep resumes (finished variants skipped, the killed one from its checkpoint)."""

import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from stepaudio_jax.config import ConfigError
from stepaudio_jax.experiments.sweep import command, load_spec
from stepaudio_jax.tasks.registry import load_config
from tests.conftest import REPO

TINY = os.path.join(REPO, "configs", "tiny.yaml")


def _spec(tmp_path, text: str) -> str:
  path = tmp_path / "spec.sweep.yaml"
  path.write_text(text.replace("TINY", TINY))
  return str(path)


def test_product_and_variants_expand_in_order(tmp_path):
  spec = _spec(tmp_path, f"""
base: TINY
runs_dir: {tmp_path}/runs
overrides: {{train.steps: 3}}
product:
  train.seed: [0, 1]
  data.codebooks: [dual, semantic]
variants:
  - {{name: mixture, overrides: {{data.stages: [{{tokens: 0, audio: 1, text: 1}}]}}}}
""")
  variants = load_spec(spec)
  assert [v.name for v in variants] == ["seed-0_codebooks-dual", "seed-0_codebooks-semantic",
                                        "seed-1_codebooks-dual", "seed-1_codebooks-semantic",
                                        "mixture"]
  assert variants[3].overrides == ("train.steps=3", "train.seed=1", "data.codebooks=semantic",
                                   f"train.run_dir={tmp_path}/runs/seed-1_codebooks-semantic")
  assert variants[4].overrides[1] == 'data.stages=[{"tokens": 0, "audio": 1, "text": 1}]'
  cmd = command(variants[0], ["sbatch", "launch/slurm_gpu.sbatch"])
  assert cmd[:3] == ["sbatch", "launch/slurm_gpu.sbatch", os.path.relpath(TINY)]


@pytest.mark.parametrize("body, message", [
    ("base: TINY\nruns_dir: r\nproduct: {train.seed: [0]}\nrepeat: 2\n", "unknown keys ['repeat']"),
    ("base: TINY\nproduct: {train.seed: [0]}\n", "needs runs_dir"),
    ("base: TINY\nruns_dir: r\n", "has no variants"),
    ("base: nope.yaml\nruns_dir: r\nproduct: {train.seed: [0]}\n", "nope.yaml"),
    ("base: TINY\nruns_dir: r\nproduct: {train.seed: [0], train.run_dir: [x]}\n",
     "sets train.run_dir"),
    ("base: TINY\nruns_dir: r\nproduct: {model.num_heads: [4, 3]}\n",
     "sweep variant num_heads-3: invalid model config: num_heads=3 is not divisible"),
    ("base: TINY\nruns_dir: r\nvariants: [{name: a}, {name: a}]\n", "names repeat"),
])
def test_bad_specs_fail_before_any_run(tmp_path, body, message):
  with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
    load_spec(_spec(tmp_path, body))
  assert not os.path.exists(tmp_path / "r")


def test_dry_run_prints_commands_and_runs_nothing(tmp_path):
  spec = _spec(tmp_path, f"base: TINY\nruns_dir: {tmp_path}/runs\nproduct: {{train.seed: [0, 1]}}\n")
  out = subprocess.run([sys.executable, "-m", "stepaudio_jax.cli", "sweep", spec, "--dry-run",
                        "--launcher", "sbatch launch/slurm_gpu.sbatch"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip().startswith("sbatch")]
  assert lines == [f"sbatch launch/slurm_gpu.sbatch configs/tiny.yaml train.seed={s} "
                   f"train.run_dir={tmp_path}/runs/seed-{s}" for s in (0, 1)]
  assert not os.path.exists(tmp_path / "runs")


def _newest_checkpoint(run_dir: str) -> int:
  path = os.path.join(run_dir, "checkpoints")
  steps = [int(d) for d in os.listdir(path) if d.isdigit()] if os.path.isdir(path) else []
  return max(steps, default=0)


@pytest.mark.slow
def test_killed_sweep_resumes_where_it_stopped(tmp_path):
  """Variant a finishes; the sweep (and its child) is SIGKILLed during variant b after b's
  first checkpoint; the rerun skips a and resumes b from that checkpoint to the end."""
  runs = tmp_path / "runs"
  spec = _spec(tmp_path, f"""
base: TINY
runs_dir: {runs}
overrides: {{train.log_every: 10, train.eval_every: 0, checkpoint.every: 10}}
variants:
  - {{name: a, overrides: {{train.steps: 4}}}}
  - {{name: b, overrides: {{train.steps: 120}}}}
""")
  cmd = [sys.executable, "-m", "stepaudio_jax.cli", "sweep", spec]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  sweep = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
  deadline = time.time() + 300
  while _newest_checkpoint(str(runs / "b")) == 0:
    assert sweep.poll() is None and time.time() < deadline, sweep.stdout.read()
    time.sleep(0.05)
  os.killpg(sweep.pid, signal.SIGKILL)
  sweep.wait()
  killed_at = _newest_checkpoint(str(runs / "b"))
  assert os.path.exists(runs / "a" / "done.json") and not os.path.exists(runs / "b" / "done.json")
  a_metrics = (runs / "a" / "metrics.jsonl").read_text()

  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "[1/2] a: finished" in out.stdout and "[2/2] b: resumes" in out.stdout
  assert f"resumed from {runs / 'b' / 'checkpoints'} at step" in out.stdout
  assert (runs / "a" / "metrics.jsonl").read_text() == a_metrics  # a was not run again
  assert json.loads((runs / "b" / "done.json").read_text())["step"] == 120
  logged = [json.loads(ln)["step"] for ln in (runs / "b" / "metrics.jsonl").read_text().split("\n")
            if ln and json.loads(ln)["kind"] == "train"]
  assert logged[-1] == 120 and killed_at in range(10, 120)


@pytest.mark.slow
def test_sigterm_to_a_sweep_stops_it_saved_and_it_resumes_where_it_stopped(tmp_path):
  """Variant a finishes; SIGTERM to the sweep alone during variant b reaches b, which saves
  the step it is at and exits; the sweep stops within a bound (a multiple of b's measured
  start-up) with 128 + SIGTERM, starting nothing after b. The rerun skips a (its metrics
  untouched) and resumes b from that step with exactly the metrics of an uninterrupted b."""
  from tests.test_faults_phases import _measured

  runs = tmp_path / "runs"
  spec = _spec(tmp_path, f"""
base: TINY
runs_dir: {runs}
overrides: {{train.seq_len: 64, train.log_every: 1, train.eval_every: 0, checkpoint.every: 1000,
            train.peak_flops_per_device: 1.0e+12}}
variants:
  - {{name: a, overrides: {{train.steps: 3}}}}
  - {{name: b, overrides: {{train.steps: 60}}}}
  - {{name: c, overrides: {{train.steps: 3}}}}
""")
  cmd = [sys.executable, "-m", "stepaudio_jax.cli", "sweep", spec]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  log = tmp_path / "sweep.log"
  with open(log, "w") as out:
    sweep = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
  b_metrics = runs / "b" / "metrics.jsonl"
  try:
    start = time.monotonic()
    while not os.path.exists(runs / "a" / "done.json"):
      assert sweep.poll() is None and time.monotonic() < start + 300, log.read_text()[-3000:]
      time.sleep(0.05)
    start = time.monotonic()
    while not (b_metrics.exists() and len(_measured(runs / "b")) >= 2):
      assert sweep.poll() is None and time.monotonic() < start + 300, log.read_text()[-3000:]
      time.sleep(0.02)
    startup = time.monotonic() - start
    sweep.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    sweep.wait(timeout=max(120, 4 * startup))
    seconds = time.monotonic() - stopped
  finally:
    if sweep.poll() is None:
      os.killpg(sweep.pid, signal.SIGKILL)
      sweep.wait()
  text = log.read_text()
  assert sweep.returncode == 128 + signal.SIGTERM, text[-3000:]
  assert seconds < max(60, 2 * startup), (seconds, startup)
  assert "sweep stopped by a signal during b; run it again to resume" in text, text[-3000:]
  assert "preempted (SIGTERM): saved step " in text, text[-3000:]
  saved = int(text.split("preempted (SIGTERM): saved step ")[1].split()[0])
  assert _newest_checkpoint(str(runs / "b")) == saved and 2 <= saved < 60, (saved, text[-2000:])
  assert not os.path.exists(runs / "b" / "done.json") and not os.path.exists(runs / "c")
  a_metrics = (runs / "a" / "metrics.jsonl").read_text()
  logged = os.path.getsize(b_metrics)

  again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  assert "[1/3] a: finished" in again.stdout and "[2/3] b: resumes" in again.stdout
  assert f"resumed from {runs / 'b' / 'checkpoints'} at step {saved}" in again.stdout
  assert (runs / "a" / "metrics.jsonl").read_text() == a_metrics
  b = load_spec(spec)[1]
  full = subprocess.run([*command(b)[:-1], f"train.run_dir={tmp_path / 'full'}"], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)
  assert full.returncode == 0, full.stderr[-3000:]
  want, got = _measured(tmp_path / "full"), _measured(runs / "b", logged)
  assert sorted(got) == list(range(saved + 1, 61)), sorted(got)
  for step, metrics in got.items():  # one machine, one program: equal to the bit
    assert metrics == want[step], step
  assert os.path.exists(runs / "c" / "done.json")


@pytest.mark.parametrize("spec", sorted(glob.glob(os.path.join(REPO, "configs", "ablations",
                                                                "*.sweep.yaml"))))
def test_shipped_specs_load(spec):
  variants = load_spec(spec)
  assert len(variants) >= 2


def test_codebook_variants_differ_only_in_codebooks_and_seed():
  """Same model, token budget, mixture and schedule: only data.codebooks and the seed vary."""
  variants = load_spec(os.path.join(REPO, "configs", "ablations", "codebooks.sweep.yaml"))
  assert len(variants) == 9
  configs = [load_config(v.base, v.overrides) for v in variants]
  plain = [dataclasses.replace(c, data=dataclasses.replace(c.data, codebooks="dual"),
                               train=dataclasses.replace(c.train, seed=0, run_dir=""))
           for c in configs]
  assert all(p == plain[0] for p in plain)
  assert {(c.data.codebooks.value, c.train.seed) for c in configs} == {
      (b, s) for b in ("dual", "semantic", "linguistic") for s in (0, 1, 2)}
