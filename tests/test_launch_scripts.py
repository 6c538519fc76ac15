"""launch/submit.py: the exact commands of each target's dry run, the JobSet it renders, the
config checks that stop a bad launch before it starts, and (with a fake gcloud) that a TPU slice
is deleted even when the run fails."""

import importlib.util
import os
import stat

import pytest
import yaml

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("submit", os.path.join(REPO, "launch", "submit.py"))
submit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(submit)

TINY = "configs/tiny.yaml"
ZONE = ["--zone", "us-east5-a"]


def _dry(*argv) -> list[str]:
  lines = []
  assert submit.main([*argv[:1], "--dry-run", *argv[1:]],
                     print_fn=lambda *a, **k: lines.append(" ".join(map(str, a)))) == 0
  return "".join(line if line.endswith("\n") else line + "\n" for line in lines).splitlines()


def test_tpu_single_slice_creates_runs_on_all_workers_and_deletes():
  lines = _dry("tpu", "--name", "sa", *ZONE, "--type", "v5p-8", TINY, "mesh.fsdp=4",
               "train.run_dir=/mnt/runs/my run")
  assert lines == [
      "gcloud compute tpus tpu-vm create sa --zone us-east5-a --accelerator-type v5p-8 "
      "--version v2-alpha-tpuv5",
      "gcloud compute tpus tpu-vm ssh sa --zone us-east5-a --worker=all --command "
      "'cd stepaudio_jax && STEPAUDIO_DISTRIBUTED=on .venv/bin/stepaudio train "
      "configs/tiny.yaml mesh.fsdp=4 '\"'\"'train.run_dir=/mnt/runs/my run'\"'\"''",
      "gcloud compute tpus tpu-vm delete sa --zone us-east5-a --quiet",
  ]


def test_tpu_multislice_is_a_queued_resource_run_on_every_slice():
  lines = _dry("tpu", "--name", "sa", *ZONE, "--type", "v5p-16", "--slices", "2",
               "--project", "p1", "--keep", TINY, "mesh.data=2", "mesh.dcn_data=2",
               "train.batch_size=32")
  assert lines[0] == ("gcloud compute tpus queued-resources create sa --zone us-east5-a "
                      "--project p1 --accelerator-type v5p-16 --runtime-version v2-alpha-tpuv5 "
                      "--node-count 2 --node-prefix sa")
  assert "until" in lines[1] and "== ACTIVE" in lines[1]
  assert [ln.split(" --zone")[0] for ln in lines[2:4]] == [
      "gcloud compute tpus tpu-vm ssh sa-0", "gcloud compute tpus tpu-vm ssh sa-1"]
  assert all(ln.endswith("train.batch_size=32' &") for ln in lines[2:4])
  assert lines[4:] == ["wait"]  # --keep: no delete


def test_slurm_submits_the_batch_script_with_the_job_shape():
  assert _dry("slurm", "--nodes", "4", "--partition", "gpu", TINY, "mesh.data=4",
              "mesh.fsdp=8", "train.batch_size=32") == [
      "sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --partition=gpu "
      "launch/slurm_gpu.sbatch configs/tiny.yaml mesh.data=4 mesh.fsdp=8 train.batch_size=32"]


def test_k8s_renders_a_jobset_per_slice_with_multislice_environment():
  lines = _dry("k8s", "--name", "sa", "--image", "img:1", "--type", "v5p-32", "--topology",
               "2x2x4", "--slices", "2", TINY, "mesh.data=2", "mesh.dcn_data=2",
               "train.batch_size=32")
  assert lines[0] == "# /tmp/sa-jobset.yaml" and lines[-1] == "kubectl apply -f /tmp/sa-jobset.yaml"
  manifest = yaml.safe_load("\n".join(lines[1:-1]))
  assert manifest["kind"] == "JobSet"
  job = manifest["spec"]["replicatedJobs"][0]
  assert job["replicas"] == 2
  assert job["template"]["spec"]["parallelism"] == 4  # 16 chips / 4 per host
  pod = job["template"]["spec"]["template"]["spec"]
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                 "cloud.google.com/gke-tpu-topology": "2x2x4"}
  container = pod["containers"][0]
  assert container["command"] == ["stepaudio", "train", TINY, "mesh.data=2", "mesh.dcn_data=2",
                                  "train.batch_size=32"]
  assert container["resources"]["limits"]["google.com/tpu"] == 4
  env = {e["name"]: e.get("value") for e in container["env"]}
  assert env["MEGASCALE_NUM_SLICES"] == "2" and env["STEPAUDIO_DISTRIBUTED"] == "on"
  assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "sa-slice-0-0.sa"


@pytest.mark.parametrize("argv,needle", [
    (["tpu", "--name", "a", *ZONE, "--type", "v5p-8", TINY, "train.stpes=3"], "stpes"),
    (["tpu", "--name", "a", *ZONE, "--type", "v5p-8", TINY, "mesh.data=3"],
     "cannot fill 4 devices"),
    (["tpu", "--name", "a", *ZONE, "--type", "v9-8", TINY], "--type 'v9-8'"),
    (["tpu", "--name", "a", *ZONE, "--type", "v5p-16", "--slices", "2", TINY, "mesh.data=2",
      "mesh.dcn_data=4", "train.batch_size=32"], "must be 1 or the number of slices"),
    (["k8s", "--name", "a", "--image", "i", "--type", "v5p-16", "--topology", "2x2x1", TINY],
     "has 4 chips, but v5p-16 has 8"),
    (["slurm", "--nodes", "2", TINY], "train.batch_size=8 does not divide"),
    # Refused here, not only when the job starts: Step1 cannot split 4 heads over 8 ways.
    (["tpu", "--name", "a", *ZONE, "--type", "v5p-16", TINY, "mesh.tensor=8"],
     "model.num_heads=4 does not split over mesh.tensor=8"),
])
def test_a_bad_launch_stops_before_running_anything(argv, needle, capsys):
  assert submit.main([*argv[:1], "--dry-run", *argv[1:]]) == 2
  err = capsys.readouterr()
  assert needle in err.err and not err.out


def test_the_slice_is_deleted_when_the_run_fails(tmp_path, monkeypatch):
  """A fake gcloud logs its calls and fails the ssh: create, ssh, delete, in that order, and
  the run's status comes back."""
  log = tmp_path / "calls"
  fake = tmp_path / "gcloud"
  fake.write_text(f'#!/bin/bash\necho "$*" >> {log}\n[[ "$*" != *" ssh "* ]] || exit 7\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
  assert submit.main(["tpu", "--name", "sa", *ZONE, "--type", "v5p-8", TINY]) == 7
  calls = [line.split(" sa ")[0] for line in log.read_text().splitlines()]
  assert calls == ["compute tpus tpu-vm create", "compute tpus tpu-vm ssh",
                   "compute tpus tpu-vm delete"]
