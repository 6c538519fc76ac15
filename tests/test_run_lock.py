"""One run per run directory: a second trainer is refused naming the first, a killed run's lock
is taken over and the run resumes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from stepaudio_jax import cli
from stepaudio_jax.training import run_lock
from stepaudio_jax.training.run_lock import RunDirLocked, RunLock
from tests.conftest import REPO

TINY = os.path.join(REPO, "configs", "tiny.yaml")
FAST = ["train.seq_len=64", "train.log_every=1", "train.peak_flops_per_device=1e12"]


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _owner(tmp_path, **record) -> None:
  (tmp_path / run_lock.OWNER_FILE).write_text(json.dumps(
      {"pid": os.getpid(), "host": socket.gethostname(), "start": time.time(),
       "heartbeat": time.time(), "job": ""} | record))


def test_a_held_directory_is_refused_naming_its_owner(tmp_path):
  said = []
  first = RunLock(str(tmp_path), said.append)
  first.acquire()
  try:
    with pytest.raises(RunDirLocked, match=rf"is in use by pid {os.getpid()} on host "
                                           rf"{socket.gethostname()} \(started .*choose another "
                                           "train.run_dir"):
      RunLock(str(tmp_path)).acquire()
  finally:
    first.release()
  assert not (tmp_path / run_lock.OWNER_FILE).exists()  # a clean exit leaves no record
  again = RunLock(str(tmp_path), said.append)
  again.acquire()
  again.release()
  assert said == []  # nothing to take over after a clean exit


@pytest.mark.parametrize("record,why", [
    ({"pid": "dead"}, "its pid is no longer alive on this host"),
    ({"host": "elsewhere", "heartbeat": time.time() - 2 * run_lock.STALE},
     "its last heartbeat was"),
])
def test_a_dead_runs_record_is_taken_over_with_a_message(tmp_path, record, why):
  if record.get("pid") == "dead":
    record["pid"] = _dead_pid()
  _owner(tmp_path, **record)
  said = []
  lock = RunLock(str(tmp_path), said.append)
  lock.acquire()
  try:
    owner = json.loads((tmp_path / run_lock.OWNER_FILE).read_text())
    assert owner["pid"] == os.getpid()
  finally:
    lock.release()
  assert len(said) == 1 and "taking over the lock of pid" in said[0] and why in said[0], said


def test_a_live_record_from_another_host_is_refused(tmp_path):
  """Where flock is not shared between hosts the heartbeat still guards the directory."""
  _owner(tmp_path, pid=4242, host="node-7")
  with pytest.raises(RunDirLocked, match=r"pid 4242 on host node-7"):
    RunLock(str(tmp_path)).acquire()


def _line(proc: subprocess.Popen, prefix: str, seconds: float) -> str:
  deadline = time.monotonic() + seconds
  for line in proc.stdout:
    if line.startswith(prefix):
      return line
    assert time.monotonic() < deadline, f"no {prefix!r} line within {seconds} s"
  raise AssertionError(f"the trainer ended without a {prefix!r} line")


@pytest.mark.slow
def test_two_trainers_on_one_directory_then_kill_9_and_take_over(tmp_path):
  """Two runs of one config 1 s apart: the second exits 2 naming the first's pid (unlocked,
  both would interleave metrics.jsonl and delete each other's checkpoints); after kill -9 of
  the first a new run takes the lock over and resumes."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  args = [sys.executable, "-m", "stepaudio_jax.cli", "train", TINY, f"train.run_dir={tmp_path}",
          *FAST, "checkpoint.every=2"]
  first = subprocess.Popen([*args, "train.steps=100000"], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    _line(first, "step 4/", 600)
    second = subprocess.run([*args, "train.steps=100000"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 2, second.stderr[-3000:]
    (line,) = [ln for ln in second.stderr.splitlines() if ln.startswith("stepaudio train: error:")]
    assert f"is in use by pid {first.pid} on host {socket.gethostname()}" in line, line
    assert "Traceback" not in second.stderr
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait(60)
  saved = max(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  third = subprocess.run([*args, f"train.steps={saved + 2}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
  assert third.returncode == 0, third.stderr[-3000:]
  assert f"taking over the lock of pid {first.pid}" in third.stdout, third.stdout[-3000:]
  assert "its pid is no longer alive on this host" in third.stdout
  assert f"at step {saved}" in third.stdout, third.stdout[-3000:]
  assert not (tmp_path / run_lock.OWNER_FILE).exists()


def test_the_cli_refuses_a_held_directory_in_one_line(tmp_path, capsys):
  lock = RunLock(str(tmp_path))
  lock.acquire()
  try:
    code = cli.main(["train", TINY, f"train.run_dir={tmp_path}", *FAST, "train.steps=1"])
  finally:
    lock.release()
  err = capsys.readouterr().err
  assert code == 2 and f"is in use by pid {os.getpid()}" in err, err
  assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "config.yaml").exists()
