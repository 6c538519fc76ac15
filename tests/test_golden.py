"""The per-step metrics of 50 steps of configs/tiny.yaml (8 devices) and configs/corpus.yaml
equal the goldens in tests/golden/ (written by tests/golden/record.py).

They agree to float32 rounding: the worst relative difference over the 50 steps is 6.5e-7
(grad_norm), tested at ROUNDING. A changed batch, loss or optimizer moves them by orders of
magnitude more than the tolerance. corpus_50_steps.json follows the committed corpus: it was
recorded again when the corpus was rebuilt (character-level Chinese text pieces, unseen-voice
eval splits, ASR pairs from every transcribed utterance); tiny_50_steps.json reads no corpus
and did not change."""

import json
import os

import pytest

from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training.trainer import train
from tests.conftest import REPO

GOLDEN = os.path.join(REPO, "tests", "golden")


ROUNDING = 1e-5  # relative; see the module docstring


@pytest.mark.parametrize("name", ["tiny_50_steps.json", "corpus_50_steps.json"])
def test_metrics_equal_the_recorded_run(name, tmp_path):
  with open(os.path.join(GOLDEN, name)) as f:
    golden = json.load(f)
  cfg = load_config(os.path.join(REPO, golden["config"]),
                    [f"train.run_dir={tmp_path}", *golden["overrides"],
                     "train.peak_flops_per_device=1e12"])
  history = train(cfg, print_fn=lambda *a, **k: None)
  assert len(history) == len(golden["steps"])
  for got, want in zip(history, golden["steps"]):
    for key, value in want.items():
      assert got[key] == pytest.approx(value, rel=ROUNDING), (name, want["step"], key, got[key],
                                                             value)
