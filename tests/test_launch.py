"""Multi-process launch: 2 CPU processes x 4 devices train through the real CLI with the
STEPAUDIO_* variables, match 1 process x 8 devices step for step, and their checkpoint resumes
in one process; bad settings fail early naming the variable."""

import glob
import os
import subprocess
import sys

import numpy as np
import portpicker
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stepaudio_jax.launch import LaunchError, plan
from tests.conftest import REPO

K = 3  # steps of the 2-process run; the 1-process runs go on to 2K
# decay_steps pins the schedule so the K-step and 2K-step runs share every step's learning rate;
# a given peak FLOP/s skips measuring the host's matmul rate in every process.
ARGS = ["configs/tiny.yaml", "train.seq_len=64", "train.log_every=1",
        "train.peak_flops_per_device=1e12", "optimizer.warmup_steps=2", "optimizer.decay_steps=8",
        "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", f"checkpoint.every={K}"]


def _start(run_dir, steps: int, devices: int, **launch: str) -> subprocess.Popen:
  """`python -m stepaudio_jax.cli train` in one process with `devices` CPU devices."""
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu", **launch}
  return subprocess.Popen(
      [sys.executable, "-m", "stepaudio_jax.cli", "train", *ARGS, f"train.run_dir={run_dir}",
       f"train.steps={steps}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _start_local(run_dir, steps: int, processes: int, devices: int) -> subprocess.Popen:
  """The same through launch/local_multiprocess.sh: `processes` x `devices`, joined by the
  STEPAUDIO_* variables."""
  env = {**os.environ, "PYTHON": sys.executable, "PORT": str(portpicker.pick_unused_port())}
  return subprocess.Popen(
      ["bash", "launch/local_multiprocess.sh", str(processes), str(devices), *ARGS,
       f"train.run_dir={run_dir}", f"train.steps={steps}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen]) -> list[str]:
  outs = [p.communicate(timeout=280) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, (out + err)[-3000:]
  return [out for out, _ in outs]


def _losses(run_dir) -> dict[int, float]:
  """train/loss by step from process 0's TensorBoard events (float32; the printed line has 4
  decimals)."""
  losses = {}
  for path in glob.glob(os.path.join(run_dir, "tensorboard", "events.*")):
    acc = EventAccumulator(path)
    acc.Reload()
    losses |= {e.step: e.value for e in acc.Scalars("train/loss")}
  return losses


@pytest.mark.slow
def test_two_processes_match_one_and_resume_in_one(tmp_path):
  multi, single = tmp_path / "multi", tmp_path / "single"
  (out,) = _finish([_start_local(multi, K, 2, 4)])
  assert "distributed: 2 processes" in out and "4 local / 8 global cpu devices" in out, out
  for line in ("distributed:", *(f"step {s}/{K} loss" for s in range(1, K + 1))):
    assert out.count(line) == 1, out  # only process 0 prints
  state_dir = multi / "checkpoints" / str(K) / "state"
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))

  (out,) = _finish([_start(single, 2 * K, 8)])
  assert "distributed:" not in out  # one process: nothing initialised
  full = _losses(single)
  assert sorted(full) == list(range(1, 2 * K + 1))
  # Same global batch (each process builds its rows of it), same mesh and sharded program; only
  # the cross-process collectives (gloo) may sum in another order: float32 rounding (measured:
  # 7.6e-8 relative at step 1, bitwise equal after), far below rtol 1e-5, while a wrong or
  # missing shard or lost optimizer state moves the loss by >1e-3.
  got = _losses(multi)
  np.testing.assert_allclose([got[s] for s in range(1, K + 1)],
                             [full[s] for s in range(1, K + 1)], rtol=1e-5)

  (out,) = _finish([_start(multi, 2 * K, 8)])  # the 2-process checkpoint, in 1 process
  assert f"resumed from {multi / 'checkpoints'} at step {K}" in out, out
  got = _losses(multi)
  np.testing.assert_allclose([got[s] for s in range(K + 1, 2 * K + 1)],
                             [full[s] for s in range(K + 1, 2 * K + 1)], rtol=1e-5)


def test_bad_process_id_fails_naming_the_variable(tmp_path):
  proc = _start(tmp_path / "bad", 1, 4, STEPAUDIO_COORDINATOR="127.0.0.1:1234",
                STEPAUDIO_NUM_PROCESSES="2", STEPAUDIO_PROCESS_ID="2")
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 2, out + err
  assert "STEPAUDIO_PROCESS_ID=2 is not below STEPAUDIO_NUM_PROCESSES=2" in err, err


@pytest.mark.parametrize("environ, flags, message", [
    ({"STEPAUDIO_NUM_PROCESSES": "2", "STEPAUDIO_PROCESS_ID": "0"}, {},
     "needs STEPAUDIO_COORDINATOR"),
    ({"STEPAUDIO_COORDINATOR": "h:1", "STEPAUDIO_NUM_PROCESSES": "2"}, {},
     "needs STEPAUDIO_PROCESS_ID"),
    ({"STEPAUDIO_COORDINATOR": "h:1", "STEPAUDIO_PROCESS_ID": "0"}, {},
     "STEPAUDIO_NUM_PROCESSES is not"),
    ({"STEPAUDIO_COORDINATOR": "h", "STEPAUDIO_NUM_PROCESSES": "2"}, {}, "must be HOST:PORT"),
    ({"STEPAUDIO_NUM_PROCESSES": "two"}, {}, "STEPAUDIO_NUM_PROCESSES='two' must be an integer"),
    ({"STEPAUDIO_NUM_PROCESSES": "2"}, {"process_id": "5", "coordinator": "h:1"},
     "--process-id=5 is not below STEPAUDIO_NUM_PROCESSES=2"),
    ({"STEPAUDIO_NUM_PROCESSES": "2"}, {"distributed": "off"}, "--distributed=off runs one"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, {}, "OMPI_MCA_orte_hnp_uri"),
])
def test_inconsistent_settings_name_the_setting_and_the_fix(environ, flags, message):
  with pytest.raises(LaunchError, match=message):
    plan(flags, environ)


SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu[01-04]", "SLURM_PROCID": "3",
         "SLURM_LOCALID": "3"}


def test_plan_detects_clusters_and_stays_single_otherwise():
  assert plan({}, {}) is None
  assert plan({}, {**SLURM, "SLURM_NTASKS": "1"}) is None  # a one-task allocation
  assert plan({}, {"TPU_WORKER_HOSTNAMES": "t0"}) is None  # a single-host TPU VM
  assert plan({}, {"STEPAUDIO_NUM_PROCESSES": "1"}) is None
  assert plan({"distributed": "off"}, {**SLURM, "SLURM_NTASKS": "32"}) is None
  p = plan({}, {**SLURM, "SLURM_NTASKS": "32", "STEPAUDIO_COORDINATOR": "gpu01:9999"})
  assert (p.cluster_detection_method, p.coordinator, p.num_processes) == ("slurm", "gpu01:9999",
                                                                         None)
  p = plan({}, {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"})
  assert (p.cluster_detection_method, p.coordinator) == (None, None)  # JAX reads the slice
  assert plan({"distributed": "on"}, {}).how.startswith("--distributed=on")
  p = plan({"num_processes": "4", "process_id": "1"},
           {"STEPAUDIO_COORDINATOR": "10.0.0.2:8476", "STEPAUDIO_LOCAL_DEVICE_IDS": "0,1"})
  assert (p.coordinator, p.num_processes, p.process_id, p.local_device_ids) == (
      "10.0.0.2:8476", 4, 1, [0, 1])
