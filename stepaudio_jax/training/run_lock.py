"""One run per run directory: a lock in RUN_DIR held for the life of a training run.

Two trainers on one train.run_dir would interleave metrics.jsonl and delete each other's
checkpoints. Process 0 of a run takes RUN_DIR/run.lock with flock (the kernel releases it when
the process dies, kill -9 included) and writes who holds it to RUN_DIR/run.lock.json: pid,
host, start time, the job (process count and coordinator), and a heartbeat it rewrites every
HEARTBEAT seconds. In a multi-process run only process 0 takes the lock and tells the others
the outcome (a collective), so the processes of one job share it and every process of a
refused job stops with the same message, before any of them writes.

A second run is refused (RunDirLocked, one line: the owner's pid, host and start). An owner
record left by a run that no longer holds the lock (killed) is taken over with a message when
its pid is not alive on this host or its heartbeat is older than STALE seconds; a record from
another host with a fresh heartbeat is refused even when flock succeeds (a filesystem that
does not share flocks between hosts). A clean exit removes the record.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np

LOCK_FILE = "run.lock"
OWNER_FILE = "run.lock.json"
HEARTBEAT = 10.0  # seconds between the owner record's rewrites
STALE = 120.0  # seconds without a heartbeat after which an owner record is a dead run's
_MESSAGE_BYTES = 2048  # the outcome process 0 broadcasts to the others


class RunDirLocked(RuntimeError):
  """Another run holds the run directory; the message names it and the fix."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  return True


def _describe(owner: dict) -> str:
  start = datetime.datetime.fromtimestamp(owner.get("start", 0)).isoformat(timespec="seconds")
  job = owner.get("job")
  return (f"pid {owner.get('pid')} on host {owner.get('host')} (started {start}"
          + (f", {job}" if job else "") + ")")


def _job() -> str:
  if jax.process_count() == 1:
    return ""
  from jax._src import distributed

  coordinator = getattr(distributed.global_state, "coordinator_address", None)
  return f"{jax.process_count()} processes, coordinator {coordinator}"


class RunLock:
  """The lock of one run directory, for process 0 (see the module docstring)."""

  def __init__(self, run_dir: str, say: Callable[[str], None] = print,
               clock: Callable[[], float] = time.time):
    self.run_dir, self.say, self.clock = run_dir, say, clock
    self.lock_path = os.path.join(run_dir, LOCK_FILE)
    self.owner_path = os.path.join(run_dir, OWNER_FILE)
    self._fd: int | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._record: dict = {}

  def _read_owner(self) -> dict | None:
    try:
      with open(self.owner_path) as f:
        owner = json.load(f)
      return owner if isinstance(owner, dict) else {}
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # unreadable: a record cut short

  def _write_owner(self) -> None:
    self._record["heartbeat"] = self.clock()
    tmp = f"{self.owner_path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      json.dump(self._record, f)
    os.replace(tmp, self.owner_path)

  def _refusal(self, owner: dict | None) -> str:
    who = _describe(owner) if owner else "another process (its owner record is not written yet)"
    return (f"train.run_dir={self.run_dir!r} is in use by {who}: one run per directory (two "
            "would interleave metrics.jsonl and delete each other's checkpoints); wait for it "
            f"to end, stop it, or choose another train.run_dir")

  def acquire(self) -> None:
    """Take the lock, or raise RunDirLocked naming its owner."""
    os.makedirs(self.run_dir, exist_ok=True)
    fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        os.close(fd)
        raise RunDirLocked(self._refusal(self._read_owner())) from None
      # flock unsupported here (ENOLCK, EOPNOTSUPP): the owner record alone decides
      self.say(f"WARNING: {self.lock_path} cannot be flocked ({os.strerror(e.errno)}): only "
               "the owner record's heartbeat guards this run directory")
    owner = self._read_owner()
    if owner is not None:  # left by a run that no longer holds the flock, or on another host
      try:
        age = self.clock() - float(owner.get("heartbeat", 0))
      except (TypeError, ValueError):
        age = float("inf")
      pid, same_host = owner.get("pid"), owner.get("host") == socket.gethostname()
      gone = same_host and (not isinstance(pid, int) or pid == os.getpid() or not _alive(pid))
      if owner and not gone and age < STALE:
        os.close(fd)
        raise RunDirLocked(self._refusal(owner))
      why = ("its pid is no longer alive on this host" if gone else
             f"its last heartbeat was {age:.0f} s ago" if owner else
             "its owner record cannot be read")
      self.say(f"run directory {self.run_dir}: taking over the lock of "
               f"{_describe(owner) if owner else 'an earlier run'}, which no longer runs "
               f"({why})")
    self._fd = fd
    self._record = {"pid": os.getpid(), "host": socket.gethostname(), "start": self.clock(),
                    "job": _job()}
    self._write_owner()
    self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT):
      try:
        self._write_owner()
      except OSError:
        pass  # a full or failing disk: the run's own writes will say so

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self._fd is not None:
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.owner_path)
      with contextlib.suppress(OSError):
        fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def _agree(refusal: str) -> str:
  """Process 0's outcome ("" = locked; else the refusal) on every process (a collective)."""
  if jax.process_count() == 1:
    return refusal
  from jax.experimental import multihost_utils

  raw = refusal.encode()[:_MESSAGE_BYTES]
  buf = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
  buf[0], buf[1:1 + len(raw)] = bool(raw), np.frombuffer(raw, np.uint8)
  got = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return bytes(got[1:]).rstrip(b"\0").decode(errors="replace") if got[0] else ""


@contextlib.contextmanager
def hold_run_dir(run_dir: str, say: Callable[[str], None] = print) -> Iterator[None]:
  """Hold RUN_DIR's lock for the block on behalf of the whole job (process 0 takes it, the
  others learn the outcome); raises RunDirLocked on every process of a refused job."""
  lock = RunLock(run_dir, say) if jax.process_index() == 0 else None
  refusal = ""
  if lock is not None:
    try:
      lock.acquire()
    except RunDirLocked as e:
      refusal = str(e)
  refusal = _agree(refusal)
  if refusal:
    raise RunDirLocked(refusal)
  try:
    yield
  finally:
    if lock is not None:
      lock.release()
