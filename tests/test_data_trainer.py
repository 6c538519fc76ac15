"""The trainer on the Grain loader: it trains, logs the data counters, and a run resumed across
a stage change goes on with exactly the losses of an uninterrupted one; eval reads the held-out
shards, through one loader built once."""

import jax
import numpy as np
import pytest
from test_resume import FAST, TINY

from stepaudio_jax.config.data import DataConfig, StageConfig
from stepaudio_jax.config.model import TokenLayout, VisionConfig
from stepaudio_jax.data.fake import write_fake_shards
from stepaudio_jax.data.loader import GrainLoader
from stepaudio_jax.data.records import Example, write_shard
from stepaudio_jax.tasks import pretrain
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training.checkpoint import CheckpointError
from stepaudio_jax.training.trainer import train

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


def _text_shard(path, token: int, count: int = 8):
  """Text records whose every id is `token` (a marker for where a row came from)."""
  write_shard(str(path), (Example("text", [np.full(12, token, np.int32)], [np.zeros(0, np.int32)],
                                  [np.zeros(0, np.int32)], None, {}) for _ in range(count)))
  return str(path)


def test_eval_reads_only_the_held_out_shards_and_the_same_batches_each_time(tmp_path):
  data = DataConfig(source="grain", shards={"text": [_text_shard(tmp_path / "train", 100)]},
                    eval_shards={"text": [_text_shard(tmp_path / "eval", 200)]},
                    stages=[StageConfig(audio=0, text=1, image=0)])
  layout, vision = TokenLayout(320, 64, 96), VisionConfig()
  train_rows = GrainLoader(data, layout, vision, 64, 4, seed=0).next_local()
  held_out = GrainLoader(data, layout, vision, 64, 4, seed=0, held_out=True)
  first = [held_out.next_local() for _ in range(2)]
  body = lambda row: set(np.unique(row["tokens"][row["segment_ids"] > 0])) - {1, 3}  # noqa: E731
  assert body(train_rows) == {100} and body(first[0]) == {200}
  held_out.restart(at_step=5)
  again = [held_out.next_local() for _ in range(2)]
  for a, b in zip(first, again):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_eval_loader_is_built_once(tmp_path, shard_overrides, monkeypatch):
  built = []
  real = pretrain.GrainLoader

  def counting(*args, **kwargs):
    built.append(kwargs.get("held_out", False))
    return real(*args, **kwargs)

  monkeypatch.setattr(pretrain, "GrainLoader", counting)
  evals = [k.replace("data.shards.", "data.eval_shards.", 1) for k in shard_overrides
           if k.startswith("data.shards.")]
  _, out = _train(tmp_path, shard_overrides, *evals, "train.steps=3", "train.eval_every=1")
  assert out.count("eval step") == 3
  assert sorted(built) == [False, True]
