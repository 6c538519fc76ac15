"""Resume: a run stopped at step k and resumed goes on exactly as an uninterrupted one would,
on the same mesh, on another mesh, and after SIGTERM."""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np

from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training.trainer import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
# The cosine length is pinned (decay_steps) so the schedule does not depend on train.steps:
# the k-step run and the 2k-step run then share the learning rate of every step. A given peak
# FLOP/s skips measuring the host's matmul peak in every run.
FAST = ["train.seq_len=64", "train.log_every=1", "train.peak_flops_per_device=1e12",
        "optimizer.warmup_steps=2", "optimizer.decay_steps=8"]
K = 3


def _train(run_dir, *overrides):
  lines = []
  history = train(load_config(TINY, [f"train.run_dir={run_dir}", *FAST, *overrides]),
                  print_fn=lambda *a, **_: lines.append(" ".join(map(str, a))))
  return history, "\n".join(lines)


def _env(devices: int) -> dict:
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
          "JAX_PLATFORMS": "cpu"}


def _losses(history, first_step):
  assert [h["step"] for h in history][0] == first_step, history
  return np.array([h["loss"] for h in history])


def test_resume_continues_with_the_same_losses(tmp_path):
  full, _ = _train(tmp_path / "full", f"train.steps={2 * K}", f"checkpoint.every={K}")
  _, out = _train(tmp_path / "cut", f"train.steps={K}", f"checkpoint.every={K}")
  assert "starting at step 0" in out
  resumed, out = _train(tmp_path / "cut", f"train.steps={2 * K}", f"checkpoint.every={K}")
  assert f"at step {K}" in out and "starting at step 0" not in out, out
  assert "WARNING" not in out  # decay_steps is pinned: the schedule does not move
  assert [h["step"] for h in resumed] == list(range(K + 1, 2 * K + 1))
  # Same mesh, same compiled step, restored bit-exact state: every metric matches to float32
  # rounding (measured: bitwise equal).
  for a, b in zip(full[K:], resumed):
    for name in ("loss", "grad_norm", "update_norm", "param_norm", "learning_rate"):
      np.testing.assert_allclose(b[name], a[name], rtol=1e-6, err_msg=f"{name} step {a['step']}")


def test_resume_with_a_run_length_that_moves_the_schedule_warns(tmp_path):
  unpinned = ["optimizer.decay_steps=0", f"checkpoint.every={K}"]
  _train(tmp_path, f"train.steps={K}", *unpinned)
  _, out = _train(tmp_path, f"train.steps={K + 1}", *unpinned)
  assert f"saved with train.steps={K} and resumes with {K + 1}" in out, out


def test_resume_onto_another_mesh(tmp_path):
  """Saved on 8 devices as data=2 fsdp=2 tensor=2, resumed on 4 devices as fsdp=4."""
  mesh8 = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
  full, _ = _train(tmp_path / "full", f"train.steps={2 * K}", *mesh8)
  _train(tmp_path / "cut", f"train.steps={K}", *mesh8)
  script = ("import json, sys\n"
            "from stepaudio_jax.tasks.registry import load_config\n"
            "from stepaudio_jax.training.trainer import train\n"
            f"print(json.dumps(train(load_config({TINY!r}, sys.argv[1:]))))\n")
  proc = subprocess.run(
      [sys.executable, "-c", script, f"train.run_dir={tmp_path / 'cut'}", *FAST,
       f"train.steps={2 * K}", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=1"],
      env=_env(4), cwd=REPO, capture_output=True, text=True, timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"at step {K}" in proc.stdout, proc.stdout
  resumed = json.loads(proc.stdout.strip().splitlines()[-1])
  # The restored state is the same numbers; only the reduction order of the sharded matmuls and
  # norms changes with the mesh (float32, ~1e-7 relative per op, a few steps of Adam amplify it).
  # rtol 1e-4 is far above that drift and far below a real error (a wrong shard or a step of
  # lost optimizer state moves the loss by >1e-3).
  np.testing.assert_allclose(_losses(resumed, K + 1), _losses(full[K:], K + 1), rtol=1e-4)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  run_dir = tmp_path / "run"
  proc = subprocess.Popen(
      [sys.executable, "-m", "stepaudio_jax.cli", "train", TINY, f"train.run_dir={run_dir}",
       *FAST, "train.steps=1000", "checkpoint.every=1000"],
      env=_env(2), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
  )
  lines = []
  try:
    for line in proc.stdout:
      lines.append(line)
      if line.startswith("step 3/1000"):
        proc.send_signal(signal.SIGTERM)
        break
    rest, _ = proc.communicate(timeout=120)
  finally:
    proc.kill()
  out = "".join(lines) + rest
  assert proc.returncode == 0, out[-3000:]
  saved = re.search(r"preempted \(SIGTERM\): saved step (\d+)", out)
  assert saved, out[-3000:]
  step = int(saved.group(1))
  assert 3 <= step < 1000
  assert os.listdir(run_dir / "checkpoints") == [str(step)]
  history, out = _train(run_dir, f"train.steps={step + 1}")
  assert f"at step {step}" in out, out
  assert [h["step"] for h in history] == [step + 1]
