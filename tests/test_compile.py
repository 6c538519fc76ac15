"""`stepaudio compile`: the train step of any task compiles for a TPU slice on this CPU (libtpu,
no chips), with memory per chip, XLA's time estimate extrapolated from unrolled depths, and the
130B config's parameter shardings pinned by a golden table."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("libtpu", reason="libtpu is not installed: pip install 'jax[tpu]' (extra: tpu)")

from conftest import REPO
from test_step1 import TINY as STEP1_TINY
from test_step1 import _loss_and_grads

from stepaudio_jax import cli
from stepaudio_jax.launch import has_accelerator
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training import aot

GOLDEN = os.path.join(REPO, "tests", "golden", "step_omni_130b_v5p_shardings.json")
TINY = ["mesh.fsdp=2", "mesh.tensor=2", "model.num_layers=4"]


def test_estimate_extrapolates_unrolled_depths_and_multiplies_microbatches():
  """Linear in depth: the extrapolated figures equal an unrolled compile at the real depth; two
  microbatches of half the rows cost what one of all the rows does."""
  cfg = load_config("configs/tiny.yaml", TINY)
  est = aot.estimate_step_time(cfg, "v5p:2x2x1", depths=(1, 2))
  unrolled = load_config("configs/tiny.yaml", [*TINY, "model.scan_layers=false"])
  direct = aot.estimate_step_time(unrolled, "v5p:2x2x1")
  assert est.depths == (1, 2) and direct.depths is None
  assert est.xla_flops == pytest.approx(direct.xla_flops, rel=0.02)
  assert est.seconds == pytest.approx(direct.seconds, rel=0.1)
  assert 0 < est.mfu < 1 and est.tokens_per_second > 0
  accum = load_config("configs/tiny.yaml", [*TINY, "train.grad_accum_steps=2"])
  two = aot.estimate_step_time(accum, "v5p:2x2x1", depths=(1, 2))
  assert two.microbatches == 2 and two.step_flops == direct.step_flops
  assert two.xla_flops == pytest.approx(direct.xla_flops, rel=0.05)


def test_cli_prints_memory_time_and_mfu(capsys):
  assert cli.main(["compile", "configs/tiny.yaml", "--topology", "v5p:2x2x1", "--depths", "1",
                   "2", *TINY]) == 0
  out = capsys.readouterr().out
  assert "GiB of 95 GiB: fits" in out and "MFU at 459 TFLOP/s" in out
  assert "extrapolated linearly" in out and "(analytic estimate " in out


def test_a_task_without_an_lm_gets_no_lm_arithmetic(capsys):
  """The flow model's compile prints no LM arithmetic (the base config's analytic estimate, an
  extrapolation to 88 layers) for a model it does not have: the memory line has no analytic
  figure and the step is costed as configured."""
  assert cli.main(["compile", "configs/speech/flow_tiny.yaml", "--topology", "v5p:2x2x1"]) == 0
  out = capsys.readouterr().out
  assert "GiB of 95 GiB: fits" in out and "XLA step time" in out, out
  assert "analytic" not in out and "extrapolated" not in out and "layers" not in out, out


def test_libtpu_logs_no_errors_on_a_host_without_a_tpu():
  """libtpu asks a metadata server for the TPU hosts unless told there are none; a fresh
  process (libtpu initialises once) that describes a topology must print no E-level lines."""
  if has_accelerator():
    pytest.skip("this host has an accelerator")
  env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
  done = subprocess.run(
      [sys.executable, "-c", "from stepaudio_jax.training.aot import tpu_devices; "
       "print(len(tpu_devices('v5p:2x2x1')))"], env=env, capture_output=True, text=True,
      timeout=300, check=True)
  assert done.stdout.split() == ["4"]
  assert not re.search(r"^E\d{4}|ERROR|could not determine", done.stderr, re.M), done.stderr


def test_cli_fails_clearly_when_the_step_does_not_fit(capsys):
  """v5e has 16 GiB per chip: the fp32 logits of 4,096 rows x a 262,144-token vocabulary on 4
  chips alone are 128 GiB each (the `aot` alias still works)."""
  code = cli.main(["aot", "configs/tiny.yaml", "--topology", "v5e:2x2", "--no-estimate",
                   "train.batch_size=4096", "model.vocab_size=262144", *TINY])
  err = capsys.readouterr().err
  assert code in (1, 2) and "HBM" in err and "train.batch_size" in err


def test_unknown_generation_is_named():
  with pytest.raises(aot.ConfigError, match="unknown TPU generation 'v9'"):
    aot.tpu_devices("v9:2x2x1")


def test_130b_parameter_shardings_match_the_golden_table():
  """Shapes and specs of every parameter of configs/step_omni_130b_v5p.yaml on v5p:8x8x8, from
  abstract shapes only. Regenerate after a deliberate change: python tests/test_compile.py"""
  with open(GOLDEN) as f:
    golden = json.load(f)
  got = shardings_130b()
  assert sorted(got) == sorted(golden["parameters"])
  assert {k: v for k, v in got.items() if golden["parameters"][k] != v} == {}


def shardings_130b() -> dict[str, str]:
  cfg = load_config(os.path.join(REPO, "configs", "step_omni_130b_v5p.yaml"))
  return aot.parameter_shardings(cfg, aot.tpu_devices("v5p:8x8x8"))


def test_save_mlp_remat_does_not_change_numbers():
  """The remat policy the 130B config ships (models/scan.py) recomputes to the same gradients."""
  l0, g0 = _loss_and_grads(STEP1_TINY)
  l1, g1 = _loss_and_grads(dataclasses.replace(STEP1_TINY, remat="save_mlp"))
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


if __name__ == "__main__":
  with open(GOLDEN, "w") as f:
    json.dump({"config": "configs/step_omni_130b_v5p.yaml", "topology": "v5p:8x8x8",
               "parameters": shardings_130b()}, f, indent=1, sort_keys=True)
    f.write("\n")


@pytest.mark.slow
def test_costed_programs_have_no_collective_matmul_loops():
  """At 8 rows per chip on 8 chips XLA makes FSDP matmuls of width 1,024 collective matmuls:
  while loops whose bodies the cost model counts once (the 3B saw 0.71x its FLOPs per layer,
  docs/scale.md). The costed programs turn them off: no loops left, and more FLOPs counted (measured
  3.86e11 against 2.67e11 per chip at depth 1)."""
  cfg = aot._at_depth(load_config("configs/tiny.yaml", [
      "train.batch_size=64", "train.seq_len=512", "vision.enabled=false",
      "model.hidden_size=1024", "model.num_heads=16", "model.num_kv_heads=4",
      "model.head_dim=64", "model.intermediate_size=2816"]), 1)
  devices = aot.tpu_devices("v5p:2x2x2")
  windowed = aot._cost(aot._compile(cfg, devices)[1])
  costed = aot._cost(aot._compile(cfg, devices, aot.COSTED_OPTIONS)[1])
  assert windowed[2] > 0 and costed[2] == 0
  assert costed[0] > 1.2 * windowed[0]
