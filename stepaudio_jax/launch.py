"""Joining a multi-process JAX job (TPU pod slices, GPU clusters, N CPU processes on one host).

Every process of a multi-controller job runs the same command; before anything asks JAX for
devices, each one must call `jax.distributed.initialize` so that `jax.devices()` is the whole
job's devices. `initialize_distributed` decides whether and how, in this order:

1. explicit settings: flags (`--coordinator`, `--num-processes`, `--process-id`,
   `--local-device-ids`) or the variables `STEPAUDIO_COORDINATOR` (host:port of process 0),
   `STEPAUDIO_NUM_PROCESSES`, `STEPAUDIO_PROCESS_ID`, `STEPAUDIO_LOCAL_DEVICE_IDS`; a flag wins
   over its variable, and in a detected cluster they override what JAX detects;
2. a cluster JAX can read its settings from: a SLURM step with more than one task, an Open MPI
   job with more than one rank, a multi-host TPU slice announced by `TPU_WORKER_HOSTNAMES` /
   `TPU_PROCESS_ADDRESSES` or a multislice one by `MEGASCALE_COORDINATOR_ADDRESS`;
   `--distributed on` (`STEPAUDIO_DISTRIBUTED=on`) asks JAX to detect even without these, as on
   Cloud TPU VMs started by `gcloud ... ssh --worker=all`, which carry the slice in metadata;
3. otherwise one process: nothing is initialised. `--distributed off` forces that.

`--peer-timeout` (`STEPAUDIO_PEER_TIMEOUT`, seconds, default 100) bounds how long the job runs
on after a process dies: the coordination service then misses its heartbeats and every other
process exits non-zero instead of waiting in a collective forever.
"""

import argparse
import dataclasses
import glob
import os
from collections.abc import Callable, Mapping

ENV = {"coordinator": "STEPAUDIO_COORDINATOR", "num_processes": "STEPAUDIO_NUM_PROCESSES",
       "process_id": "STEPAUDIO_PROCESS_ID", "local_device_ids": "STEPAUDIO_LOCAL_DEVICE_IDS",
       "distributed": "STEPAUDIO_DISTRIBUTED", "peer_timeout": "STEPAUDIO_PEER_TIMEOUT"}
FLAGS = {"coordinator": "--coordinator", "num_processes": "--num-processes",
         "process_id": "--process-id", "local_device_ids": "--local-device-ids",
         "distributed": "--distributed", "peer_timeout": "--peer-timeout"}
PEER_TIMEOUT = 100  # seconds; JAX's default heartbeat timeout
MODES = ("auto", "on", "off")


# Device files of the accelerators JAX can use: TPU (v4+ and vfio-bound), NVIDIA GPUs.
ACCELERATOR_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")


def has_accelerator() -> bool:
  """Whether this host has a TPU or NVIDIA GPU device file (without asking JAX, which would
  initialise its backends)."""
  return any(glob.glob(p) for p in ACCELERATOR_DEVICES)


def prefer_cpu_without_accelerators(environ=os.environ) -> None:
  """With no accelerator on the host, keep JAX on the CPU backend (unless JAX_PLATFORMS says
  otherwise): the TPU runtime that the test extra installs (for AOT compiles) would otherwise
  initialise and print errors about missing TPU hosts. Call before importing jax."""
  if "JAX_PLATFORMS" not in environ and not has_accelerator():
    environ["JAX_PLATFORMS"] = "cpu"


class LaunchError(ValueError):
  """Inconsistent or incomplete launch settings; the message names the setting and the fix."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """The arguments for `jax.distributed.initialize` (None = let JAX detect) and how they came."""
  coordinator: str | None
  num_processes: int | None
  process_id: int | None
  local_device_ids: list[int] | None
  cluster_detection_method: str | None
  how: str
  peer_timeout: int = PEER_TIMEOUT


def add_flags(parser: argparse.ArgumentParser) -> None:
  """The launch flags of the commands that may run as one process of a job."""
  g = parser.add_argument_group("multi-process launch (default: the STEPAUDIO_* variables)")
  g.add_argument(FLAGS["coordinator"], help="HOST:PORT of process 0, the same on every process")
  g.add_argument(FLAGS["num_processes"], help="number of processes in the job")
  g.add_argument(FLAGS["process_id"], help="this process's index, 0 .. num-processes - 1")
  g.add_argument(FLAGS["local_device_ids"], help="comma-separated local devices this process uses")
  g.add_argument(FLAGS["peer_timeout"],
                 help=f"seconds the job outlives a dead process (default {PEER_TIMEOUT})")
  g.add_argument(FLAGS["distributed"], choices=MODES,
                 help="auto: join a detected cluster job (default); on: let JAX detect the "
                      "cluster (Cloud TPU VM metadata); off: always one process")


def _int(value: str | None) -> int:
  try:
    return int(value or 0)
  except ValueError:
    return 0


def detect_cluster(environ: Mapping[str, str]) -> tuple[str | None, str] | None:
  """(JAX's cluster_detection_method, a description) of the multi-process job this process is
  part of, or None. The same conditions JAX checks, plus more than one process, so a one-task
  allocation or a single-host TPU VM stays a plain single process."""
  if _int(environ.get("SLURM_NTASKS")) > 1 and all(
      k in environ for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID",
                             "SLURM_LOCALID")):
    return "slurm", f"SLURM job {environ['SLURM_JOB_ID']}"
  if _int(environ.get("OMPI_COMM_WORLD_SIZE")) > 1:
    if "OMPI_MCA_orte_hnp_uri" not in environ:
      raise LaunchError(
          "Open MPI job without OMPI_MCA_orte_hnp_uri (Open MPI 5 / PMIx): JAX cannot find the "
          f"coordinator; set {ENV['coordinator']}=HOST:PORT (a free port on rank 0's host), "
          f"{ENV['num_processes']}=$OMPI_COMM_WORLD_SIZE and "
          f"{ENV['process_id']}=$OMPI_COMM_WORLD_RANK")
    return "ompi", "Open MPI"
  hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
  if len(hosts.split(",")) > 1 or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return None, "TPU slice"
  return None


def _settings(flags: Mapping[str, str | None],
              environ: Mapping[str, str]) -> dict[str, tuple[str | None, str]]:
  """name -> (raw value or None, what to call it in an error); a flag wins over its variable."""
  out = {}
  for name in ENV:
    if flags.get(name) is not None:
      out[name] = (str(flags[name]), FLAGS[name])
    else:
      out[name] = (environ.get(ENV[name]) or None, ENV[name])
  return out


def _parse_int(value: str | None, label: str, low: int) -> int | None:
  if value is None:
    return None
  try:
    n = int(value)
  except ValueError:
    n = low - 1
  if n < low:
    raise LaunchError(f"{label}={value!r} must be an integer >= {low}")
  return n


def plan(flags: Mapping[str, str | None], environ: Mapping[str, str]) -> Plan | None:
  """What `initialize_distributed` will do, without doing it; None = one process."""
  s = _settings(flags, environ)
  mode, mode_label = s["distributed"]
  mode = mode or "auto"
  if mode not in MODES:
    raise LaunchError(f"{mode_label}={mode!r}: use one of {', '.join(MODES)}")
  coordinator, coord_label = s["coordinator"]
  num = _parse_int(*s["num_processes"], low=1)
  pid = _parse_int(*s["process_id"], low=0)
  num_label, pid_label = s["num_processes"][1], s["process_id"][1]
  ids_raw, ids_label = s["local_device_ids"]
  try:
    ids = None if ids_raw is None else [int(i) for i in ids_raw.split(",")]
  except ValueError:
    raise LaunchError(
        f"{ids_label}={ids_raw!r} must be comma-separated device ids, e.g. 0,1,2,3") from None
  given = [label for (value, label) in (s["coordinator"], s["num_processes"], s["process_id"])
           if value is not None]
  if mode == "off":
    if given:
      raise LaunchError(f"{mode_label}=off runs one process, but {', '.join(given)} "
                        f"{'is' if len(given) == 1 else 'are'} set; unset them or drop "
                        f"{mode_label}")
    return None
  if coordinator is not None:
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise LaunchError(f"{coord_label}={coordinator!r} must be HOST:PORT of process 0, "
                        "e.g. 10.0.0.2:8476")
  if num is not None and pid is not None and pid >= num:
    raise LaunchError(f"{pid_label}={pid} is not below {num_label}={num}: process ids run "
                      f"0 .. {num - 1}, a different one on each process")
  peer_timeout = _parse_int(*s["peer_timeout"], low=1) or PEER_TIMEOUT
  cluster = detect_cluster(environ) if mode == "auto" else (None, f"{mode_label}=on")
  if cluster is not None:
    method, how = cluster
    return Plan(coordinator, num, pid, ids, method, how, peer_timeout)
  if not given:
    return None
  if num is None:
    raise LaunchError(f"{' and '.join(given)} set but {num_label} is not: set it to the number "
                      "of processes in the job, the same on every process")
  if num == 1:
    return None
  if coordinator is None:
    raise LaunchError(f"{num_label}={num} needs {coord_label}: set it to HOST:PORT of process "
                      "0 (a free port there), the same on every process")
  if pid is None:
    raise LaunchError(f"{num_label}={num} needs {pid_label}: set it to this process's index, "
                      f"0 .. {num - 1}, a different one on each process")
  return Plan(coordinator, num, pid, ids, None, f"coordinator {coordinator}", peer_timeout)


def initialize_distributed(flags: Mapping[str, str | None] | None = None,
                           environ: Mapping[str, str] | None = None,
                           print_fn: Callable[..., None] = print) -> bool:
  """Join the multi-process job per `plan` (before any device query); True if one was joined.

  Process 0 prints one line: the process count and the local and global devices.
  """
  p = plan(flags or {}, os.environ if environ is None else environ)
  if p is None:
    return False
  import jax

  if not jax.distributed.is_initialized():  # a caller (a test worker) may have joined already
    try:
      jax.distributed.initialize(p.coordinator, p.num_processes, p.process_id,
                                 p.local_device_ids,
                                 cluster_detection_method=p.cluster_detection_method,
                                 heartbeat_timeout_seconds=p.peer_timeout)
    except ValueError as e:  # JAX found no cluster to read the missing settings from
      raise LaunchError(f"cannot join the multi-process job ({p.how}): JAX found no cluster "
                        f"settings ({str(e).rstrip('.')}); set "
                        f"{ENV['coordinator']}, {ENV['num_processes']} and "
                        f"{ENV['process_id']} (or their flags)") from e
  if jax.process_index() == 0:
    print_fn(f"distributed: {jax.process_count()} processes ({p.how}), "
             f"{jax.local_device_count()} local / {jax.device_count()} global "
             f"{jax.devices()[0].platform} devices", flush=True)
  return True
