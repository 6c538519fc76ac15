"""A checkpoint written before the training core became tasks (tests/golden/legacy_run, made by
tests/golden/record_legacy.py on the old trainer) resumes with the losses the old trainer went
on to, resumes onto another mesh, exports, and starts another run through init_from."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from stepaudio_jax.config import load_config
from stepaudio_jax.models.step1 import Step1
from stepaudio_jax.training import trainer
from tests.conftest import REPO, step0_params
from tests.test_golden import ROUNDING

LEGACY = os.path.join(REPO, "tests", "golden", "legacy_run")
TINY = os.path.join(REPO, "configs", "tiny.yaml")
with open(os.path.join(LEGACY, "uninterrupted.json")) as f:
  RECORD = json.load(f)
TOKENS = [1, 5, 9, 200, 7, 3, 400, 12]


@pytest.fixture
def run_copy(tmp_path):
  shutil.copytree(LEGACY, tmp_path / "run")
  return tmp_path / "run"


def _train(run_dir, *overrides):
  lines = []
  cfg = load_config(TINY, [f"train.run_dir={run_dir}", *RECORD["overrides"], *overrides])
  history = trainer.train(cfg, print_fn=lambda *a, **_: lines.append(" ".join(map(str, a))))
  return history, "\n".join(lines)


def test_resumes_with_the_losses_of_the_old_trainer(run_copy):
  history, out = _train(run_copy, "train.steps=4")
  assert "at step 2" in out, out
  assert [h["step"] for h in history] == [3, 4]
  for got, want in zip(history, RECORD["steps"][2:]):
    for key in ("loss", "grad_norm", "update_norm", "param_norm", "learning_rate"):
      assert got[key] == pytest.approx(want[key], rel=ROUNDING), (want["step"], key, got[key],
                                                                 want[key])
  # The next save is in today's layout and resumes as usual.
  data = json.load(open(run_copy / "checkpoints" / "4" / "data" / "metadata"))
  assert data["layout"] == 2
  more, _ = _train(run_copy, "train.steps=5")
  assert [h["step"] for h in more] == [5]


def test_resumes_onto_another_mesh(run_copy):
  """Saved on data=2 fsdp=2 tensor=2 (8 devices); resumed on 4 devices as fsdp=4."""
  script = ("import json, sys\n"
            "from stepaudio_jax.config import load_config\n"
            "from stepaudio_jax.training.trainer import train\n"
            f"print(json.dumps(train(load_config({TINY!r}, sys.argv[1:]))))\n")
  proc = subprocess.run(
      [sys.executable, "-c", script, f"train.run_dir={run_copy}", *RECORD["overrides"],
       "train.steps=4", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=1"],
      env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, cwd=REPO,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  resumed = json.loads(proc.stdout.strip().splitlines()[-1])
  # As in test_resume: only the reduction order of the sharded ops changes with the mesh.
  np.testing.assert_allclose([h["loss"] for h in resumed],
                             [h["loss"] for h in RECORD["steps"][2:]], rtol=1e-4)


def _legacy_lm_logits() -> np.ndarray:
  """Logits of the legacy LM read with plain Orbax (its old tree), not through our reader."""
  saved = ocp.StandardCheckpointer().restore(os.path.join(LEGACY, "checkpoints", "2", "state"))
  cfg = load_config(os.path.join(LEGACY, "config.yaml")).model
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Step1(cfg, rngs=nnx.Rngs(0))))
  model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, saved["params"]["lm"]))
  return np.asarray(model(jnp.asarray([TOKENS]))[0])


def test_exports_to_pytorch(run_copy, tmp_path):
  torch = pytest.importorskip("torch")
  from stepaudio_jax.export.exporter import export_checkpoint
  from stepaudio_jax.export.torch_step1 import Step1ForCausalLM

  export_checkpoint(str(run_copy), str(tmp_path / "hf"), dtype="float32")
  with torch.no_grad():
    theirs = Step1ForCausalLM.from_pretrained(str(tmp_path / "hf"))(
        torch.tensor([TOKENS]))[0].numpy()
  ours = _legacy_lm_logits()
  assert ours.std() > 0.01
  np.testing.assert_allclose(theirs, ours, atol=1e-4)


def test_starts_another_run_through_init_from(run_copy, tmp_path):
  started = step0_params(TINY, f"train.run_dir={tmp_path / 'new'}", *RECORD["overrides"],
                         f"checkpoint.init_from={run_copy}")["model"]["lm"]
  saved = ocp.StandardCheckpointer().restore(os.path.join(LEGACY, "checkpoints", "2", "state"))
  jax.tree.map(np.testing.assert_array_equal, started, saved["params"]["lm"])
