"""Fault injection on the training side: divergence, silent checkpoint corruption, unwritable
and full disks, refused runs, second signals, stuck shutdowns and multi-process preemption."""

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import portpicker
import pytest

from stepaudio_jax import cli
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training import loop, trainer
from stepaudio_jax.training.checkpoint import CheckpointError, Checkpointer
from stepaudio_jax.training.setup import setup
from tests.conftest import REPO

TINY = os.path.join(REPO, "configs", "tiny.yaml")
FAST = ["train.seq_len=64", "train.log_every=1", "train.peak_flops_per_device=1e12"]


def _cli(*args, devices: int = 2, timeout: float = 300) -> tuple[subprocess.CompletedProcess,
                                                                  float]:
  """The real `stepaudio` command in a subprocess; (result, seconds)."""
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu"}
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "stepaudio_jax.cli", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
  return proc, time.perf_counter() - start


def _one_error_line(proc: subprocess.CompletedProcess, command: str, *needles: str) -> str:
  """Exit 2, no traceback, exactly one `stepaudio CMD: error:` line containing the needles."""
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"stepaudio {command}: error:")]
  assert len(lines) == 1, proc.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


@contextlib.contextmanager
def _tmpfs(path, options: str):
  """A tmpfs mounted at `path` for the block (skips the test where mounting is not allowed)."""
  os.makedirs(path, exist_ok=True)
  try:
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True,
                   capture_output=True)
  except (OSError, subprocess.CalledProcessError):
    pytest.skip("cannot mount a tmpfs here (needs root)")
  try:
    yield
  finally:
    subprocess.run(["umount", str(path)], check=False)


def test_divergence_never_leaves_a_poisoned_newest_checkpoint(tmp_path):
  """learning_rate=1e6 with a checkpoint every step and keep=1: the run stops at the NaN and
  its newest checkpoint is the last finite step (saving the NaN states would leave no good one),
  so resuming does not go straight back to NaN."""
  run = ["train", TINY, f"train.run_dir={tmp_path}", *FAST, "train.steps=20",
         "optimizer.learning_rate=1e6", "optimizer.warmup_steps=0", "checkpoint.every=1",
         "checkpoint.keep=1"]
  proc, _ = _cli(*run)
  line = _one_error_line(proc, "train", "stopping without checkpointing it")
  bad_step = int(line.split(" at step ")[1].split(";")[0])
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps == [bad_step - 1], (steps, line)  # keep=1 kept the last finite one
  saved = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(steps[0]) / "state")
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved["params"]))
  proc, _ = _cli(*run)
  assert f"resumed from {tmp_path / 'checkpoints'} at step {bad_step - 1}" in proc.stdout


def _flip_one_bit_silently(step_dir) -> str:
  """Flip one bit of the stored array data such that plain Orbax still restores the step
  (the compressed chunk decodes) but a value changed; returns the file."""
  files = sorted(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True),
                 key=os.path.getsize, reverse=True)
  clean = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
  for path in files:
    data = bytearray(open(path, "rb").read())
    for offset in range(len(data) // 2, len(data) - 64, 97):
      data[offset] ^= 0x10
      with open(path, "wb") as f:
        f.write(data)
      try:
        dirty = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
        changed = any(not np.array_equal(a, b) for a, b in
                      zip(jax.tree.leaves(clean), jax.tree.leaves(dirty)))
      except Exception:  # noqa: BLE001  (a chunk that no longer decodes fails loudly: not this)
        changed = False
      if changed:
        return path
      data[offset] ^= 0x10
      with open(path, "wb") as f:
        f.write(data)
  raise AssertionError("no silently corrupting bit found")


def test_a_flipped_bit_in_checkpoint_data_is_refused(tmp_path):
  """One bit flipped in a data file would restore without error and the run would diverge
  silently; every array carries a checksum, compared after every restore."""
  cfg = load_config(TINY, [f"train.run_dir={tmp_path}", *FAST, "train.steps=2",
                           "checkpoint.every=2"])
  trainer.train(cfg, print_fn=lambda *a, **k: None)
  _flip_one_bit_silently(tmp_path / "checkpoints" / "2")
  run = setup(cfg)
  ckpt = Checkpointer(str(tmp_path), cfg.checkpoint)
  with pytest.raises(CheckpointError, match=r"checkpoint step 2 .*do not match the checksums"):
    ckpt.restore(2, run.abstract_state)
  ckpt.close()


def test_a_refused_run_leaves_the_run_config_alone(tmp_path):
  """RUN_DIR/config.yaml stays the run's: overwritten with the refused config, it would make
  export fail on shapes."""
  base = ["train", TINY, f"train.run_dir={tmp_path}", *FAST, "train.steps=1"]
  assert cli.main(base) == 0
  before = open(tmp_path / "config.yaml").read()
  assert cli.main(base + ["checkpoint.resume=false", "model.hidden_size=32",
                          "model.intermediate_size=64"]) == 2
  assert open(tmp_path / "config.yaml").read() == before


def test_unwritable_checkpoint_directory_fails_at_once(tmp_path):
  """Refused at once, not by a save failing in a background thread while the process stays
  up."""
  with _tmpfs(tmp_path / "checkpoints", "size=1m,ro"):
    proc, seconds = _cli("train", TINY, f"train.run_dir={tmp_path}", *FAST, "train.steps=4",
                         "checkpoint.every=2")
  _one_error_line(proc, "train", "cannot write checkpoints to", "Read-only file system",
                  "train.run_dir")
  assert seconds < 60


def test_disk_full_during_a_save_is_one_error_line(tmp_path):
  """One error line naming the cause, not hundreds of stderr lines of tracebacks."""
  with _tmpfs(tmp_path / "full", "size=600k"):
    proc, _ = _cli("train", TINY, f"train.run_dir={tmp_path / 'full'}", *FAST, "train.steps=6",
                   "checkpoint.every=2")
  _one_error_line(proc, "train", "No space left on device", "the newest complete step is")
  assert len(proc.stderr.splitlines()) <= 5, proc.stderr[-3000:]


@pytest.mark.parametrize("override,needle", [
    ("train.batch_size=6", "do not divide"),  # 6 rows over data x fsdp = 2 x 2
    ("data.source=grain", "matches no file"),
])
def test_bad_input_is_one_error_line(tmp_path, override, needle):
  """One error line and exit status 2, not a raw traceback."""
  more = []
  if override == "data.source=grain":
    more = ["data.shards.text=[/nonexistent/*.array_record]",
            "data.stages=[{audio: 0, text: 1, image: 0}]"]
  proc, _ = _cli("train", TINY, f"train.run_dir={tmp_path}", *FAST, "train.steps=1",
                 "mesh.data=2", "mesh.fsdp=2", override, *more, devices=4)
  _one_error_line(proc, "train", needle)


def test_a_second_sigterm_cuts_the_shutdown_short():
  exits = []
  with loop.StopFlag(exit_fn=exits.append) as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.should_stop(1) and not exits
    os.kill(os.getpid(), signal.SIGTERM)
  assert exits == ["a second SIGTERM during shutdown"]


def test_a_stuck_shutdown_ends_in_bounded_time():
  exits = []
  with loop.Watchdog(0.2, "the final save", exit_fn=exits.append):
    time.sleep(0.6)
  with loop.Watchdog(5, "the final save", exit_fn=exits.append):
    pass
  assert exits == ["the final save did not finish within train.shutdown_timeout=0.2 s"]


# Multi-process tests under load (other jobs on the host's cores): no bound is a fixed guess.
# Each waits for a ready signal (a progress line) within READY_LIMIT, measures how long its job
# took to get there (start-up and compile, the work that slows most on a loaded host), and
# bounds what follows by a multiple of that, never less than the quiet-host figure: a hung job
# still fails in bounded time, a slow host no longer fails a healthy one.
READY_LIMIT = 900.0  # seconds for a 2-process job to reach its third step, however loaded


def _bound(quiet: float, startup: float, times: float = 3.0) -> float:
  """`quiet` (the quiet-host bound, seconds) or `times` x the measured start-up if longer."""
  return max(quiet, times * startup)


class _Output:
  """A process's merged output, read by a thread, so that waiting for a line is bounded."""

  def __init__(self, proc: subprocess.Popen):
    self.proc, self.lines, self._cond = proc, [], threading.Condition()
    self._done = False
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self) -> None:
    for line in self.proc.stdout:
      with self._cond:
        self.lines.append(line)
        self._cond.notify_all()
    with self._cond:
      self._done = True
      self._cond.notify_all()

  def wait_for(self, prefix: str, seconds: float) -> None:
    """Until a line starting with `prefix`; fails after `seconds` or if the process ended."""
    deadline = time.monotonic() + seconds
    with self._cond:
      while not any(line.startswith(prefix) for line in self.lines):
        left = deadline - time.monotonic()
        assert left > 0 and not self._done, (
            f"no {prefix!r} line within {seconds:.0f} s (ended: {self._done}):\n"
            + "".join(self.lines)[-3000:])
        self._cond.wait(min(left, 1.0))

  def finish(self, seconds: float) -> str:
    """The whole output once the process exited (within `seconds`, else TimeoutExpired)."""
    self.proc.wait(timeout=seconds)
    with self._cond:
      self._cond.wait_for(lambda: self._done, timeout=30)
      return "".join(self.lines)


def _worker(run_dir, port: int, pid: int, steps: int) -> subprocess.Popen:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu", "STEPAUDIO_COORDINATOR": f"127.0.0.1:{port}",
         "STEPAUDIO_NUM_PROCESSES": "2", "STEPAUDIO_PROCESS_ID": str(pid)}
  # shutdown_timeout bounds the final save (a dead peer, a hung filesystem), not its speed: 300 s
  # lets a loaded host finish it; the tests bound the whole shutdown themselves.
  return subprocess.Popen(
      [sys.executable, "-m", "stepaudio_jax.cli", "train", TINY, f"train.run_dir={run_dir}",
       *FAST, f"train.steps={steps}", "checkpoint.every=1000", "mesh.data=2", "mesh.fsdp=2",
       "train.shutdown_timeout=300"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _job(run_dir, steps: int) -> tuple[list[subprocess.Popen], list[_Output]]:
  port = portpicker.pick_unused_port()
  procs = [_worker(run_dir, port, pid, steps) for pid in (0, 1)]
  return procs, [_Output(p) for p in procs]


@pytest.mark.slow
@pytest.mark.parametrize("signalled", [(0, 1), (1,)], ids=["both", "one"])
def test_multi_process_preemption_saves_one_agreed_step(tmp_path, signalled):
  """SIGTERM to one or both processes of a 2-process job: if each process stopped at its own
  step, one would wait in the final collective save for the other; the step comes from JAX's
  preemption sync, whichever processes got the signal. The shutdown and the resumed job
  (start-up, compile, restore, a step and a save) are bounded by a multiple of the first job's
  measured start-up (_bound), so a loaded host slows them without failing them."""
  start = time.monotonic()
  procs, outputs = _job(tmp_path, 1000)
  try:
    outputs[0].wait_for("step 3/1000", READY_LIMIT)
    startup = time.monotonic() - start
    for pid in signalled:
      procs[pid].send_signal(signal.SIGTERM)
    outs = [o.finish(_bound(120, startup)) for o in outputs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
  steps = os.listdir(tmp_path / "checkpoints")
  assert len(steps) == 1 and 3 <= int(steps[0]) < 1000, steps
  assert f"saved step {steps[0]}" in outs[0]
  data = json.load(open(tmp_path / "checkpoints" / steps[0] / "data" / "metadata"))
  assert data["step"] == int(steps[0])
  shutil.rmtree(tmp_path / "tensorboard")
  procs, outputs = _job(tmp_path, int(steps[0]) + 1)
  try:
    outs = [o.finish(_bound(120, startup, 4.0)) for o in outputs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:]
  assert f"at step {steps[0]}" in outs[0]


@pytest.mark.slow
def test_a_dead_peer_ends_the_job_in_bounded_time(tmp_path):
  """A process killed outright: the survivor must not wait in a collective forever, but exit
  non-zero once the peer's heartbeats are missing for STEPAUDIO_PEER_TIMEOUT seconds."""
  os.environ["STEPAUDIO_PEER_TIMEOUT"] = "10"
  start = time.monotonic()
  try:
    procs, outputs = _job(tmp_path, 1000)
  finally:
    del os.environ["STEPAUDIO_PEER_TIMEOUT"]
  try:
    outputs[0].wait_for("step 3/1000", READY_LIMIT)
    # 10 s of missed heartbeats and the survivor's way out: 60 s on a quiet host, the job's
    # measured start-up if longer (a loaded host)
    limit = _bound(60, time.monotonic() - start, 1.0)
    procs[1].kill()
    start = time.perf_counter()
    outputs[0].finish(2 * limit)
    seconds = time.perf_counter() - start
  finally:
    for p in procs:
      p.kill()
  assert procs[0].returncode != 0
  assert seconds < limit, (seconds, limit)


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_gives_the_uninterrupted_losses(tmp_path):
  """SIGKILL during a run that checkpoints every step (so likely mid-save), then a resume, ends
  with the per-step losses of an uninterrupted run."""
  args = ["train", TINY, *FAST, "train.steps=12", "checkpoint.every=1", "checkpoint.keep=2",
          "optimizer.decay_steps=8"]
  full, _ = _cli(*args, f"train.run_dir={tmp_path / 'full'}")
  assert full.returncode == 0, full.stderr[-2000:]
  cut = tmp_path / "cut"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen([sys.executable, "-m", "stepaudio_jax.cli", *args,
                           f"train.run_dir={cut}"], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    _Output(proc).wait_for("step 6/12", READY_LIMIT)
    time.sleep(0.05)
  finally:
    proc.kill()
  proc.wait(timeout=60)
  last, _ = _cli(*args, f"train.run_dir={cut}")
  assert last.returncode == 0, last.stderr[-2000:]
  resumed_at = int(last.stdout.split(" at step ")[1].split()[0])
  assert 1 <= resumed_at <= 6, last.stdout

  def losses(files):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = {}
    for path in files:
      acc = EventAccumulator(path)
      acc.Reload()
      out |= {e.step: e.value for e in acc.Scalars("train/loss")}
    return out

  want = losses(glob.glob(str(tmp_path / "full" / "tensorboard" / "events.*")))
  newest = max(glob.glob(str(cut / "tensorboard" / "events.*")), key=os.path.getmtime)
  got = losses([newest])
  assert sorted(got) == list(range(resumed_at + 1, 13)), (sorted(got), resumed_at)
  for step in got:
    assert got[step] == want[step], (step, got[step], want[step])


def test_no_accelerator_runtime_noise_on_a_cpu_only_host(tmp_path):
  """With libtpu installed (the test extra), a command on a CPU-only host prints no
  `E0000 ... INVALID_ARGUMENT ... TPU_WORKER_HOSTNAMES` errors, JAX_PLATFORMS set or not."""
  if any(glob.glob(p) for p in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")):
    pytest.skip("this host has an accelerator")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  proc = subprocess.run([sys.executable, "-m", "stepaudio_jax.cli", "train", TINY,
                         f"train.run_dir={tmp_path}", *FAST, "train.steps=1"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "E0000" not in proc.stderr and "TPU" not in proc.stderr, proc.stderr[-2000:]
