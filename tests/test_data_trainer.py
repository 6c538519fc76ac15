"""The trainer on the Grain loader: it trains, logs the data counters, and a run resumed across
a stage change goes on with exactly the losses of an uninterrupted one."""

import numpy as np
import pytest

from stepaudio_jax.config import load_config
from stepaudio_jax.data.fake import write_fake_shards
from stepaudio_jax.models.tokens import TokenLayout
from stepaudio_jax.training.checkpoint import CheckpointError
from stepaudio_jax.training.trainer import train
from test_resume import FAST, TINY

# tiny.yaml: batch 8; FAST: seq_len 64 -> 512 tokens per step; stage 0 is steps 0-1.
STAGES = ("data.stages=[{tokens: 1024, audio: 2, text: 1, image: 1},"
          "{audio: 4, text: 3, image: 3, interleaved: 1, asr: 1, tts: 1}]")


@pytest.fixture(scope="module")
def shard_overrides(tmp_path_factory):
  shards = write_fake_shards(str(tmp_path_factory.mktemp("shards")), TokenLayout(320, 64, 96),
                             per_task=16, max_len=24)
  return ["data.source=grain", STAGES, "vision.max_images_per_sequence=2"] + [
      f"data.shards.{task}=[{globs[0]}]" for task, globs in shards.items()]


def _train(run_dir, overrides, *more):
  lines = []
  history = train(load_config(TINY, [f"train.run_dir={run_dir}", *FAST, *overrides, *more]),
                  print_fn=lambda *a, **_: lines.append(" ".join(map(str, a))))
  return history, "\n".join(lines)


def test_grain_training_resumes_exactly_across_a_stage_change(tmp_path, shard_overrides):
  full, _ = _train(tmp_path / "full", shard_overrides, "train.steps=4", "checkpoint.every=2")
  assert [h["data/stage"] for h in full] == [0, 0, 1, 1]
  assert full[-1]["data/tokens_text"] > full[0]["data/tokens_text"] > 0
  _train(tmp_path / "cut", shard_overrides, "train.steps=2", "checkpoint.every=2")
  resumed, out = _train(tmp_path / "cut", shard_overrides, "train.steps=4", "checkpoint.every=2")
  assert "at step 2" in out
  np.testing.assert_allclose([h["loss"] for h in resumed], [h["loss"] for h in full[2:]],
                             rtol=1e-6)
  with pytest.raises(CheckpointError, match="global_batch=8, this run has 16"):
    _train(tmp_path / "cut", shard_overrides, "train.steps=6", "train.batch_size=16")
