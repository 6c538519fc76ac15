"""Goodput (the loop's time by phase) and the hang watchdog: a blocked step ends the process
with every thread's stack instead of idling the job."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import portpicker
import pytest

from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training import goodput, loop, trainer
from tests.conftest import REPO

TINY = os.path.join(REPO, "configs", "tiny.yaml")


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_step_times_split_wall_time_and_move_compiling_out_of_the_phase():
  clock = _Clock()
  with goodput.StepTimes(clock) as times:
    with times.phase("data"):
      clock.now += 1.0
    with times.phase("step"):  # a first step: 5 s, of which 4 s compiling
      jax.monitoring.record_event_duration_secs(goodput.COMPILE_EVENTS[2], 3.0)
      jax.monitoring.record_event_duration_secs(goodput.COMPILE_EVENTS[0], 1.0)
      clock.now += 5.0
    with times.phase("checkpoint"):
      clock.now += 2.0
    clock.now += 2.0  # outside any phase: other
    first = times.interval()
    with times.phase("step"):
      clock.now += 10.0
    second = times.interval()
  jax.monitoring.record_event_duration_secs(goodput.COMPILE_EVENTS[2], 9.0)  # closed: ignored
  assert first == {"time/data_seconds": 1.0, "time/compile_seconds": 4.0,
                   "time/step_seconds": 1.0, "time/checkpoint_seconds": 2.0,
                   "time/eval_seconds": 0.0, "time/other_seconds": 2.0, "goodput": 0.1,
                   "goodput_total": 0.1}
  assert second["goodput"] == 1.0 and second["time/compile_seconds"] == 0.0
  assert second["goodput_total"] == 11.0 / 20.0


def test_an_interval_that_ends_inside_a_phase_splits_it():
  """The metrics hook logs (ends an interval) from within its own phase: the phase's time
  before that counts in the interval that ends, the rest in the next."""
  clock = _Clock()
  with goodput.StepTimes(clock) as times:
    with times.phase("step"):
      clock.now += 3.0  # waiting for the device
      first = times.interval()
      clock.now += 1.0
    clock.now += 1.0
    second = times.interval()
  assert first["time/step_seconds"] == 3.0 and first["goodput"] == 1.0
  assert second["time/step_seconds"] == 1.0 and second["goodput"] == 0.5
  assert second["goodput_total"] == 4.0 / 5.0


class _DeviceValue:
  """A metric that, like a value still on the device, takes `seconds` to fetch."""

  def __init__(self, seconds: float):
    self.seconds = seconds

  def __float__(self):
    time.sleep(self.seconds)
    return 0.5


def test_goodput_stays_within_0_and_1_on_a_toy_run(tmp_path):
  """The metrics hook's wait for the device (before it logs) counts once: counted where it
  happened and again after the log line, a long step followed by short ones would show goodput
  up to 300%."""
  from stepaudio_jax.training.hooks import MetricsHook
  from stepaudio_jax.training.progress import Progress

  waits = [0.01, 0.3] * 4

  def train_step(state, batch):
    return state, {"loss": _DeviceValue(waits[batch])}

  times = goodput.StepTimes()
  progress = Progress(str(tmp_path), len(waits), 0, "tokens", 0, 0, ("loss",), True,
                      lambda *a, **k: None, times)
  metrics = MetricsHook(progress, 1, len(waits), lambda: None, lambda *a, **k: None)
  with loop.StopFlag() as stop, times:
    loop.run(None, train_step, ((i, {}) for i in range(len(waits))), 0, len(waits), [metrics],
             stop, times=times)
  lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  assert len(lines) == len(waits)
  for x in lines:
    assert 0 <= x["goodput"] <= 1 and 0 <= x["goodput_total"] <= 1, x


def test_a_blocked_step_dumps_every_stack_and_exits(tmp_path):
  """The step blocks (a hung collective, say): within the timeout the watchdog writes all
  threads' stacks, the blocked frame among them, and calls the exit."""
  release, exits = threading.Event(), []

  def blocking_train_step(state, batch):
    if batch == 5:
      release.wait(30)
    return state, {}

  def exit_fn(why):
    exits.append(why)
    release.set()

  stacks = tmp_path / "stacks.txt"
  watchdog = goodput.HangWatchdog(0.4, str(stacks), exit_fn=exit_fn)
  batches = ((i, {}) for i in range(1, 100))
  start = time.monotonic()
  with watchdog, loop.StopFlag() as stop:
    loop.run(None, blocking_train_step, batches, 0, 8, [watchdog], stop)
  assert exits == ["hang after step 4"]
  assert time.monotonic() - start < 10
  assert "blocking_train_step" in stacks.read_text()
  assert "hang-watchdog" in stacks.read_text() or "Thread" in stacks.read_text()


def test_xla_compiling_is_not_a_hang():
  """Between the lowering event and the backend-compile event the clock is stopped."""
  exits, clock = [], _Clock()
  with goodput.StepTimes() as times:
    watchdog = goodput.HangWatchdog(0.2, None, times, exit_fn=exits.append, clock=clock)
    with watchdog:
      watchdog.start(0)
      watchdog.after_step(goodput.ARM_AT_STEP, None, {}, {})
      jax.monitoring.record_event_duration_secs(goodput.COMPILE_EVENTS[1], 0.1)
      clock.now += 10
      time.sleep(0.3)
      assert exits == []
      jax.monitoring.record_event_duration_secs(goodput.COMPILE_EVENTS[2], 10.0)
      clock.now += 10
      time.sleep(0.3)
  assert exits == [f"hang after step {goodput.ARM_AT_STEP}"]


def test_a_watchdog_stays_quiet_while_steps_complete_and_after_the_loop():
  """Also in the first steps, however long they take (a peer may still be compiling)."""
  exits = []
  watchdog = goodput.HangWatchdog(0.3, None, exit_fn=exits.append)

  def slow_step(state, batch):
    time.sleep(0.6 if batch < goodput.ARM_AT_STEP else 0.05)
    return state, {}

  with watchdog, loop.StopFlag() as stop:
    loop.run(None, slow_step, ((i, {}) for i in range(100)), 0, 20, [watchdog], stop)
  time.sleep(0.6)  # disarmed: the final checkpoint is train.shutdown_timeout's business
  assert exits == []


def test_training_writes_the_breakdown(tmp_path, capsys):
  cfg = load_config(TINY, [f"train.run_dir={tmp_path}", "train.steps=4", "train.log_every=2",
                           "train.seq_len=64", "train.peak_flops_per_device=1e12",
                           "checkpoint.every=2", "train.hang_timeout=120"])
  trainer.train(cfg)
  lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  train = [x for x in lines if x["kind"] == "train"]
  assert [x["step"] for x in train] == [2, 4]
  for x in train:
    phases = [x[f"time/{p}_seconds"] for p in (*goodput.PHASES, "other")]
    assert min(phases) >= 0 and 0 <= x["goodput"] <= 1
  assert train[0]["time/compile_seconds"] > 0  # the first steps compile the train step
  assert train[1]["time/checkpoint_seconds"] > 0
  out = capsys.readouterr().out
  assert "goodput" in out and "compile" in out
  assert not list(tmp_path.glob("hang_stacks_*.txt"))
  events = list((tmp_path / "tensorboard").iterdir())
  assert events and any(b"train/goodput" in open(e, "rb").read() for e in events)


def _worker(run_dir, port: int, pid: int) -> subprocess.Popen:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu", "STEPAUDIO_COORDINATOR": f"127.0.0.1:{port}",
         "STEPAUDIO_NUM_PROCESSES": "2", "STEPAUDIO_PROCESS_ID": str(pid),
         "STEPAUDIO_PEER_TIMEOUT": "300"}
  return subprocess.Popen(
      [sys.executable, "-m", "stepaudio_jax.cli", "train", TINY, f"train.run_dir={run_dir}",
       "train.seq_len=64", "train.log_every=1", "train.peak_flops_per_device=1e12",
       "train.steps=1000", "checkpoint.every=1000", "mesh.data=2", "mesh.fsdp=2",
       "train.hang_timeout=15", "train.shutdown_timeout=10"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_frozen_peer_is_a_hang_with_stacks_and_exit_4(tmp_path):
  """Process 1 is stopped (SIGSTOP: alive, heartbeating never again, but long before the peer
  timeout): process 0 blocks in the step's collectives; the watchdog ends it with status 4 and
  the stacks, well before STEPAUDIO_PEER_TIMEOUT=300 would."""
  port = portpicker.pick_unused_port()
  procs = [_worker(tmp_path, port, pid) for pid in (0, 1)]
  try:
    for line in procs[0].stdout:
      if line.startswith("step 3/1000"):
        break
    procs[1].send_signal(signal.SIGSTOP)
    start = time.perf_counter()
    out = procs[0].communicate(timeout=180)[0]
    seconds = time.perf_counter() - start
  finally:
    for p in procs:
      p.kill()
  assert procs[0].returncode == goodput.EXIT_HUNG, out[-3000:]
  assert "no step completed for" in out and "Thread 0x" in out, out[-3000:]
  assert (tmp_path / "hang_stacks_0.txt").read_text().count("Thread 0x") >= 2
  assert seconds < 60, seconds
