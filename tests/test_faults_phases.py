"""Fault injection on the post-training and speech phases: a PPO run and a vocoder run killed
outright (SIGKILL, while they checkpoint every step, so often mid-save) resume from their newest
complete checkpoint and go on with the metrics of an uninterrupted run. The sweep's SIGTERM and
SIGKILL are in test_sweep.py, divergence in test_speech_flow.py and test_speech_vocoder.py."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.test_speech_vocoder import SMALL, VOCODER

ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
       "JAX_PLATFORMS": "cpu"}
# ToyPPO (test_post_training.py: PPO on the tiny LM with a counted-token reward, no reward-model
# or SFT run needed) through the real trainer in its own process, so that it can be SIGKILLed.
PPO = [sys.executable, "-c", "import sys; from tests.test_post_training import ToyPPO, _toy; "
       "from stepaudio_jax.training.trainer import train; "
       "train(_toy(sys.argv[1], *sys.argv[2:]), task=ToyPPO)"]
# What a metrics line holds besides the step's measurements: wall-clock times and rates.
TIMING = ("seconds", "step_seconds", "mfu", "goodput", "goodput_total")


def _complete_steps(run_dir) -> list[int]:
  """The step directories Orbax finished (a save in flight lives in a *.orbax-checkpoint-tmp*
  directory until it is renamed)."""
  path = os.path.join(run_dir, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def _measured(run_dir, after: int = 0) -> dict[int, dict]:
  """Per step, the train metrics logged in RUN_DIR/metrics.jsonl from byte `after` on, without
  the timings."""
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    f.seek(after)
    lines = [json.loads(ln) for ln in f if ln.strip()]
  return {ln["step"]: {k: v for k, v in ln.items() if k not in TIMING and not k.startswith("time/")
                       and not k.endswith("_per_second")}
          for ln in lines if ln["kind"] == "train"}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
  proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return proc


def _kill_9_then_resume(tmp_path, command, total: int, kill_after: int) -> int:
  """Runs `command(run_dir)` (checkpointing every step, logging every step) to the end in
  `full`; in `cut` SIGKILLs it once step `kill_after` is saved, and runs it again. Checks that
  the newest step left is complete and the rerun resumes from it (not step 0, not an earlier
  one), and that from there on it logs exactly the uninterrupted run's metrics. Returns the
  step it resumed from."""
  full, cut = tmp_path / "full", tmp_path / "cut"
  _run(command(full))
  want = _measured(full)
  assert sorted(want) == list(range(1, total + 1)), sorted(want)

  proc = subprocess.Popen(command(cut), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
  deadline = time.monotonic() + 240
  try:
    while not _complete_steps(cut) or _complete_steps(cut)[-1] < kill_after:
      assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the kill"
      assert time.monotonic() < deadline, f"no checkpoint of step {kill_after} within 240 s"
      time.sleep(0.02)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  left = _complete_steps(cut)
  assert kill_after <= left[-1] < total and not (cut / "done.json").exists(), left

  logged = os.path.getsize(cut / "metrics.jsonl")
  again = _run(command(cut))
  assert f"resumed from {cut / 'checkpoints'} at step {left[-1]}" in again.stdout, (
      again.stdout[-2000:])
  got = _measured(cut, logged)
  assert sorted(got) == list(range(left[-1] + 1, total + 1)), (sorted(got), left)
  for step, metrics in got.items():
    # One machine, one program (the compilation cache), the same restored state and data
    # position: equal to the bit, no tolerance.
    assert metrics == want[step], (step, {k: (v, want[step].get(k)) for k, v in metrics.items()
                                          if v != want[step].get(k)})
  assert json.loads((cut / "done.json").read_text())["step"] == total
  return left[-1]


@pytest.mark.slow
def test_kill_9_mid_ppo_resumes_from_the_newest_checkpoint_with_the_same_metrics(tmp_path):
  """PPO's state is two trained models with their optimizers (policy, critic), two frozen ones
  (reference, reward model) and the prompt position; killed after step 4 (past the critic
  warm-up, so the policy has moved), the rerun continues from the newest complete step with
  the uninterrupted run's rollout, policy and critic metrics."""
  total = 12

  def command(run_dir):
    return [*PPO, str(run_dir), f"train.steps={total}", "checkpoint.every=1", "train.log_every=1",
            "mesh.fsdp=1"]

  _kill_9_then_resume(tmp_path, command, total, kill_after=4)


@pytest.mark.slow
def test_kill_9_mid_vocoder_resumes_from_the_newest_checkpoint_with_the_same_metrics(tmp_path):
  """The vocoder's state is a generator and a discriminator with their optimizers and the
  segment sampler's position; killed after step 3 (`stepaudio train
  configs/speech/vocoder_tiny.yaml` at a smaller size), the rerun continues from the newest
  complete step with the uninterrupted run's generator and discriminator metrics."""
  total = 12

  def command(run_dir):
    return [sys.executable, "-m", "stepaudio_jax.cli", "train", VOCODER, *SMALL,
            f"train.run_dir={run_dir}", f"train.steps={total}", "checkpoint.every=1",
            "train.log_every=1"]

  _kill_9_then_resume(tmp_path, command, total, kill_after=3)
