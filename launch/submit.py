#!/usr/bin/env python3
"""Start `stepaudio train CONFIG [key=value ...]` on a cluster; --dry-run prints what it would run.

  python launch/submit.py tpu  --name NAME --zone ZONE --type v5p-128 [--slices 2] CONFIG ...
  python launch/submit.py slurm --nodes 4 --gpus-per-node 8 CONFIG ...
  python launch/submit.py k8s  --name NAME --image IMAGE --type v5p-128 --topology 4x4x4 CONFIG ...

Every target first loads the config with its overrides on this machine and checks the mesh
against the chips it asks for (a typo or a mesh that does not fit stops here, exit 2, not on a
pod an hour later). Then:

  tpu    Cloud TPU VMs: create the slice (a TPU VM; with --slices > 1 a queued resource of that
         many slices, whose metadata carries the multislice MEGASCALE_* settings JAX reads),
         run the command on every worker of every slice (ssh --worker=all,
         STEPAUDIO_DISTRIBUTED=on), then delete it whatever the run's outcome (--keep: don't;
         --no-create: use an existing one). The checkout (REPO_DIR) with its .venv must exist
         on the workers: --setup CMD runs CMD on all of them first.
  slurm  sbatch launch/slurm_gpu.sbatch with the node and GPU counts (one task per GPU; srun
         inside the script starts them).
  k8s    a JobSet (GKE TPU node pools) rendered from the config: one replicated job per slice,
         one pod per TPU host, the multislice settings in each pod's environment; applied with
         kubectl (--output FILE keeps the manifest).

Exit status: that of the first command that fails (the TPU slice is still deleted), 0 if all
succeed; 2 for a bad config or arguments.
"""

import argparse
import math
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# TPU generation (the accelerator-type prefix) -> (TensorCores per chip in the type's number,
# chips per host, GKE accelerator label, default TPU VM runtime).
TPUS = {
    "v4": (2, 4, "tpu-v4-podslice", "tpu-ubuntu2204-base"),
    "v5p": (2, 4, "tpu-v5p-slice", "v2-alpha-tpuv5"),
    "v5litepod": (1, 4, "tpu-v5-lite-podslice", "v2-alpha-tpuv5-lite"),
    "v6e": (1, 4, "tpu-v6e-slice", "v2-alpha-tpuv6e"),
}
MEGASCALE_PORT = 8080
JAX_COORDINATOR_PORT = 8476


class LaunchConfigError(ValueError):
  """The config, its overrides or the requested hardware do not fit together."""


def tpu_chips(accelerator_type: str) -> tuple[str, int]:
  """('v5p', 64) for 'v5p-128': the generation and the chips of one slice."""
  generation, _, number = accelerator_type.rpartition("-")
  if generation not in TPUS or not number.isdigit():
    raise LaunchConfigError(f"--type {accelerator_type!r}: expected GENERATION-N with a "
                            f"generation of {sorted(TPUS)}, e.g. v5p-128")
  return generation, max(int(number) // TPUS[generation][0], 1)


def check_config(config: str, overrides: Sequence[str], devices: int, granules: int):
  """Load the run config and check its mesh and batch fit `devices` in `granules` slices (or
  nodes); returns the config."""
  from stepaudio_jax.tasks.registry import load_config

  try:
    cfg = load_config(config, list(overrides))
    sizes = cfg.mesh.shape(devices)
    if cfg.mesh.dcn_ways not in (1, granules):
      raise LaunchConfigError(
          f"mesh.dcn_data x mesh.dcn_fsdp = {cfg.mesh.dcn_ways} must be 1 or the number of "
          f"slices (TPU) or processes (GPU), {granules}")
    if cfg.mesh.dcn_ways > 1:
      cfg.mesh.split(devices)
  except ValueError as e:  # ConfigError, a MeshConfig error
    raise LaunchConfigError(f"{config} {' '.join(overrides)}: {e}") from e
  rows = sizes["data"] * sizes["fsdp"]
  if cfg.train.batch_size % rows:
    raise LaunchConfigError(f"train.batch_size={cfg.train.batch_size} does not divide by "
                            f"mesh.data x mesh.fsdp = {rows} on {devices} devices")
  return cfg


def train_command(config: str, overrides: Sequence[str], stepaudio: str) -> list[str]:
  return [stepaudio, "train", config, *overrides]


def _gcloud(args, *words: str) -> list[str]:
  project = ["--project", args.project] if args.project else []
  return ["gcloud", "compute", "tpus", *words, "--zone", args.zone, *project]


def tpu_plan(args) -> tuple[list[list[str]], list[list[str]], list[list[str]]]:
  """(commands before, commands run together (one per slice), commands after) for `tpu`."""
  generation, chips = tpu_chips(args.type)
  check_config(args.config, args.overrides, chips * args.slices, args.slices)
  runtime = args.runtime or TPUS[generation][3]
  multislice = args.slices > 1
  nodes = [f"{args.name}-{i}" for i in range(args.slices)] if multislice else [args.name]
  before, after = [], []
  if args.create:
    if multislice:
      before.append(_gcloud(args, "queued-resources", "create", args.name)
                    + ["--accelerator-type", args.type, "--runtime-version", runtime,
                       "--node-count", str(args.slices), "--node-prefix", args.name])
      # `create` returns once queued; this waits until every slice is up.
      before.append(["bash", "-c", "until [[ $(" + shlex.join(
          _gcloud(args, "queued-resources", "describe", args.name)
          + ["--format=value(state.state)"]) + ") == ACTIVE ]]; do sleep 30; done"])
    else:
      before.append(_gcloud(args, "tpu-vm", "create", args.name)
                    + ["--accelerator-type", args.type, "--version", runtime])
    if not args.keep:
      after.append(_gcloud(args, "queued-resources", "delete", args.name)
                   + ["--force", "--quiet"] if multislice else
                   _gcloud(args, "tpu-vm", "delete", args.name) + ["--quiet"])
  ssh = lambda node, command: (_gcloud(args, "tpu-vm", "ssh", node)  # noqa: E731
                               + ["--worker=all", "--command", command])
  if args.setup:
    before += [ssh(node, args.setup) for node in nodes]
  train = shlex.join(train_command(args.config, args.overrides, ".venv/bin/stepaudio"))
  remote = f"cd {shlex.quote(args.repo_dir)} && STEPAUDIO_DISTRIBUTED=on {train}"
  return before, [ssh(node, remote) for node in nodes], after


def slurm_plan(args) -> list[str]:
  tasks = args.gpus_per_node if args.tasks_per_node is None else args.tasks_per_node
  check_config(args.config, args.overrides, args.nodes * args.gpus_per_node,
               args.nodes * tasks)
  opts = [f"--nodes={args.nodes}", f"--ntasks-per-node={tasks}",
          f"--gpus-per-node={args.gpus_per_node}"]
  opts += [f"--{k}={v}" for k, v in (("partition", args.partition), ("time", args.time),
                                     ("job-name", args.job_name)) if v]
  return ["sbatch", *opts, os.path.join("launch", "slurm_gpu.sbatch"), args.config,
          *args.overrides]


def jobset(args) -> dict:
  """The JobSet manifest for `k8s` (GKE TPU node pools, JobSet controller installed)."""
  generation, chips = tpu_chips(args.type)
  dims = [int(d) for d in args.topology.split("x")]
  if math.prod(dims) != chips:
    raise LaunchConfigError(f"--topology {args.topology} has {math.prod(dims)} chips, but "
                            f"{args.type} has {chips}")
  check_config(args.config, args.overrides, chips * args.slices, args.slices)
  chips_per_host = min(TPUS[generation][1], chips)
  hosts = chips // chips_per_host
  env = [{"name": "STEPAUDIO_DISTRIBUTED", "value": "on"}]
  if args.slices > 1:  # what JAX's TPU cluster reads to join the slices over DCN
    env += [
        {"name": "MEGASCALE_COORDINATOR_ADDRESS",
         "value": f"{args.name}-slice-0-0.{args.name}"},
        {"name": "MEGASCALE_NUM_SLICES", "value": str(args.slices)},
        {"name": "MEGASCALE_PORT", "value": str(MEGASCALE_PORT)},
        {"name": "MEGASCALE_SLICE_ID", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}}},
    ]
  container = {
      "name": "stepaudio",
      "image": args.image,
      "workingDir": args.workdir,
      "command": train_command(args.config, args.overrides, "stepaudio"),
      "env": env,
      "ports": [{"containerPort": p} for p in (JAX_COORDINATOR_PORT, MEGASCALE_PORT)],
      "securityContext": {"privileged": True},
      "resources": {"limits": {"google.com/tpu": chips_per_host}},
  }
  pod = {
      "hostNetwork": True,
      "dnsPolicy": "ClusterFirstWithHostNet",
      "restartPolicy": "Never",
      "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": TPUS[generation][2],
                       "cloud.google.com/gke-tpu-topology": args.topology},
      "containers": [container],
  }
  return {
      "apiVersion": "jobset.x-k8s.io/v1alpha2",
      "kind": "JobSet",
      "metadata": {"name": args.name, "annotations": {
          "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
      "spec": {
          "failurePolicy": {"maxRestarts": args.max_restarts},
          "replicatedJobs": [{
              "name": "slice",
              "replicas": args.slices,
              "template": {"spec": {"parallelism": hosts, "completions": hosts,
                                    "backoffLimit": 0, "template": {"spec": pod}}},
          }],
      },
  }


def _print_commands(commands: Sequence[Sequence[str]], print_fn: Callable, together=False):
  for c in commands:
    print_fn(shlex.join(c) + (" &" if together and len(commands) > 1 else ""))
  if together and len(commands) > 1:
    print_fn("wait")


def _run_all(commands: Sequence[Sequence[str]], together: bool = False) -> int:
  """Run commands (all at once when `together`, else in order until one fails); the first
  non-zero status, or 0."""
  if together:
    statuses = [p.wait() for p in [subprocess.Popen(c) for c in commands]]
    return next((rc for rc in statuses if rc), 0)
  for c in commands:
    rc = subprocess.call(c)
    if rc:
      return rc
  return 0


def main(argv: Sequence[str] | None = None, print_fn: Callable = print) -> int:
  parser = argparse.ArgumentParser(prog="launch/submit.py", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="target", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  common.add_argument("config")
  common.add_argument("overrides", nargs="*", metavar="key=value")

  tpu = sub.add_parser("tpu", parents=[common], help="Cloud TPU VMs: create, run, delete")
  tpu.add_argument("--name", required=True)
  tpu.add_argument("--zone", required=True)
  tpu.add_argument("--type", required=True, help="accelerator type of one slice, e.g. v5p-128")
  tpu.add_argument("--slices", type=int, default=1)
  tpu.add_argument("--runtime", help="TPU VM runtime version (default per generation)")
  tpu.add_argument("--project", default=os.environ.get("PROJECT"))
  tpu.add_argument("--repo-dir", default="stepaudio_jax", help="the checkout on every worker")
  tpu.add_argument("--setup", help="a command to run on every worker first")
  tpu.add_argument("--no-create", dest="create", action="store_false",
                   help="use an existing slice (and do not delete it)")
  tpu.add_argument("--keep", action="store_true", help="do not delete the slice afterwards")

  slurm = sub.add_parser("slurm", parents=[common], help="sbatch launch/slurm_gpu.sbatch")
  slurm.add_argument("--nodes", type=int, required=True)
  slurm.add_argument("--gpus-per-node", type=int, default=8)
  slurm.add_argument("--tasks-per-node", type=int,
                     help="default one per GPU; 1: one process drives all of a node's GPUs")
  slurm.add_argument("--partition")
  slurm.add_argument("--time")
  slurm.add_argument("--job-name")

  k8s = sub.add_parser("k8s", parents=[common], help="a JobSet on GKE TPU node pools")
  k8s.add_argument("--name", required=True)
  k8s.add_argument("--image", required=True, help="a container with this repo installed")
  k8s.add_argument("--type", required=True, help="accelerator type of one slice, e.g. v5p-128")
  k8s.add_argument("--topology", required=True, help="the slice's chip topology, e.g. 4x4x4")
  k8s.add_argument("--slices", type=int, default=1)
  k8s.add_argument("--workdir", default="/app", help="the repository inside the image")
  k8s.add_argument("--max-restarts", type=int, default=0)
  k8s.add_argument("--output", help="write the manifest here (default: a temporary file)")

  args = parser.parse_args(argv)
  if getattr(args, "slices", 1) < 1:
    parser.error("--slices must be >= 1")
  try:
    if args.target == "tpu":
      before, together, after = tpu_plan(args)
    elif args.target == "slurm":
      before, together, after = [slurm_plan(args)], [], []
    else:
      import yaml

      manifest = yaml.safe_dump(jobset(args), sort_keys=False)
      path = args.output or f"/tmp/{args.name}-jobset.yaml"
      if args.dry_run:
        print_fn(f"# {path}\n{manifest}", end="")
      else:
        with open(path, "w") as f:
          f.write(manifest)
      before, together, after = [["kubectl", "apply", "-f", path]], [], []
  except LaunchConfigError as e:
    print(f"launch/submit.py {args.target}: error: {e}", file=sys.stderr)
    return 2
  if args.dry_run:
    _print_commands(before, print_fn)
    _print_commands(together, print_fn, together=True)
    _print_commands(after, print_fn)
    return 0
  try:
    status = _run_all(before) or _run_all(together, together=True)
  finally:
    cleanup = _run_all(after)
  return status or cleanup


if __name__ == "__main__":
  sys.exit(main())
