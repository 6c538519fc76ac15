"""No change in behaviour: the per-step metrics recorded before the training core became tasks
over a generic step (tests/golden/record.py, run on the old code) come out bit for bit."""

import json
import os

import pytest

from stepaudio_jax.config import load_config
from stepaudio_jax.training.trainer import train
from tests.conftest import REPO

GOLDEN = os.path.join(REPO, "tests", "golden")


@pytest.mark.parametrize("name", ["tiny_50_steps.json", "corpus_50_steps.json"])
def test_losses_equal_the_pre_refactor_run_bit_for_bit(name, tmp_path):
  with open(os.path.join(GOLDEN, name)) as f:
    golden = json.load(f)
  cfg = load_config(os.path.join(REPO, golden["config"]),
                    [f"train.run_dir={tmp_path}", *golden["overrides"],
                     "train.peak_flops_per_device=1e12"])
  history = train(cfg, print_fn=lambda *a, **k: None)
  assert len(history) == len(golden["steps"])
  for got, want in zip(history, golden["steps"]):
    for key, value in want.items():
      assert got[key] == value, (name, want["step"], key, got[key], value)
