"""Two JAX processes each load only their rows; together they make the 1-process global batch,
and their saved iterator state (per row stream) resumes on one process."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
from test_data_pipeline import LAYOUT, STAGES, VISION

from stepaudio_jax.config.data import DataConfig
from stepaudio_jax.data.fake import write_fake_shards
from stepaudio_jax.data.loader import GrainLoader

SCRIPT = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
import numpy as np
port, pid, cfg_json, out = sys.argv[1:5]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
from stepaudio_jax.config.data import DataConfig, StageConfig
from stepaudio_jax.data.loader import GrainLoader
from stepaudio_jax.data.packing import empty_row
from stepaudio_jax.data.source import next_global_batch
sys.path.insert(0, "tests")
from test_data_pipeline import LAYOUT, VISION
raw = json.loads(cfg_json)
cfg = DataConfig(**{**raw, "stages": [StageConfig(**s) for s in raw["stages"]]})
loader = GrainLoader(cfg, LAYOUT, VISION, 128, 4, seed=0)
mesh = jax.make_mesh((4,), ("data",))
sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
local = {}
fields = {k: jax.ShapeDtypeStruct((4,) + v.shape, v.dtype, sharding=sharding)
          for k, v in empty_row(128, LAYOUT, VISION).items()}
for step in range(2):
  batch = next_global_batch(loader, fields)
  assert batch["tokens"].shape == (4, 128), batch["tokens"].shape
  for k, v in batch.items():
    rows = sorted(v.addressable_shards, key=lambda s: s.index[0].start)
    local[f"{k}/{step}"] = np.concatenate([np.asarray(s.data) for s in rows])
state = loader.get_state()
np.savez(f"{out}/rows{pid}.npz", **local)
if int(pid) == 0:
  with open(f"{out}/state.json", "w") as f:
    json.dump(state, f)
"""


def _free_port() -> str:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return str(s.getsockname()[1])


def test_two_processes_load_their_rows_of_the_one_process_batch(tmp_path):
  shards = write_fake_shards(str(tmp_path), LAYOUT, per_task=16)
  cfg = DataConfig(source="grain", shards=shards, stages=list(STAGES))
  cfg_json = json.dumps({"source": "grain", "shards": shards,
                         "stages": [s.__dict__ for s in STAGES]})
  script, port = tmp_path / "load.py", _free_port()
  script.write_text(SCRIPT)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = [subprocess.Popen([sys.executable, str(script), port, str(i), cfg_json, str(tmp_path)],
                            cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=280)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  parts = [np.load(tmp_path / f"rows{i}.npz") for i in range(2)]
  assert jax.process_count() == 1
  single = GrainLoader(cfg, LAYOUT, VISION, 128, 4, seed=0)
  for step in range(2):
    want = single.next_local()
    for k, v in want.items():
      got = np.concatenate([parts[0][f"{k}/{step}"], parts[1][f"{k}/{step}"]])
      np.testing.assert_array_equal(got, v, err_msg=f"{k} step {step}")
  # The 2-process state (every row stream) continues on one process exactly.
  resumed = GrainLoader(cfg, LAYOUT, VISION, 128, 4, seed=0)
  resumed.set_state(json.loads((tmp_path / "state.json").read_text()))
  want, got = single.next_local(), resumed.next_local()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
