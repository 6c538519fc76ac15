"""Export from a checkpoint written by 2 processes, run by 2 processes, equals the 1-process one."""

import os
import socket
import subprocess
import sys

from stepaudio_jax.export.exporter import export_checkpoint
from stepaudio_jax.export.safetensors_io import SafetensorsDir
from tests.conftest import REPO

# Each process: join the job, save a sharded train state of the tiny model on the 4-device
# mesh (each process writes its own shards), then run `stepaudio export` on it.
WORKER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
port, pid, run_dir, out_dir, config = sys.argv[1:6]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
from stepaudio_jax import cli
from stepaudio_jax.config import dump_config
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training.checkpoint import Checkpointer
from stepaudio_jax.training.setup import setup

cfg = load_config(config, [f"train.run_dir={run_dir}", "train.seq_len=32", "mesh.fsdp=2",
                           "mesh.tensor=2", "train.seed=3"], num_devices=jax.device_count())
run = setup(cfg)
with jax.set_mesh(run.mesh):
  state = run.init()
assert not state.params["model"]["lm"]["embed"].is_fully_addressable
os.makedirs(run_dir, exist_ok=True)
if jax.process_index() == 0:
  dump_config(cfg, os.path.join(run_dir, "config.yaml"))
ckpt = Checkpointer(run_dir, cfg.checkpoint)
ckpt.save(7, state, {"step": 7}, force=True)
ckpt.wait()
ckpt.close()
sys.exit(cli.main(["export", run_dir, out_dir, "--max-shard-size", "60KB"]))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_process_export_equals_single_process(tmp_path):
  run, multi, single = (str(tmp_path / n) for n in ("run", "multi", "single"))
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  port = str(_free_port())
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, str(script), port, str(i), run, multi,
                             os.path.join(REPO, "configs", "tiny.yaml")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=280)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  state_dir = os.path.join(run, "checkpoints", "7", "state")
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))
  summary = export_checkpoint(run, single, max_shard_size="60KB")
  assert len(summary.files) > 2
  assert sorted(os.listdir(multi)) == sorted(os.listdir(single))
  for name in os.listdir(single):
    with open(os.path.join(multi, name), "rb") as a, open(os.path.join(single, name), "rb") as b:
      assert a.read() == b.read(), name
  assert len(list(SafetensorsDir(multi).keys())) == summary.num_tensors
