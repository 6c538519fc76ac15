"""The configured token shares are what the model sees: counted from the packed batches (every
segment classified by its token ids, data/shares.py), not from the loader's counters, for each
shipped data config; an unreachable share stops the run before training, naming the fix."""

import collections
import dataclasses
import logging
import os

import jax
import numpy as np
import pytest

from stepaudio_jax.config import ConfigError
from stepaudio_jax.config.data import TASKS
from stepaudio_jax.data import shares
from stepaudio_jax.data.loader import GrainLoader, RecordSource, resolve_shards
from stepaudio_jax.data.records import decode_checked
from stepaudio_jax.data.templates import TemplateContext, render
from stepaudio_jax.data.tokenizer import make_tokenizer
from stepaudio_jax.tasks.registry import load_config
from tests.conftest import REPO

CORPUS = os.path.join(REPO, "data_pipelines", "corpus")
SHARDS = {t: [os.path.join(CORPUS, t, "train-*.array_record")]
          for t in ("text", "image_text", "audio_continuation", "audio_text_interleaved", "asr",
                    "tts", "aqta")}


def _loader(cfg) -> GrainLoader:
  tc = cfg.train
  return GrainLoader(cfg.data, cfg.tokens, cfg.vision, tc.seq_len, tc.batch_size, tc.seed)


def _assert_delivered(stages: list[dict], first_steps: list[int]) -> None:
  """Every configured share within 3% (relative) in every stage, in the independent count and
  in the loader's own `share/<task>` stats, which must agree with it. 3% because segments are
  whole records: an interleaved record (~280 tokens) is 2% of corpus stage 1's interleaved
  tokens."""
  assert [s["first_step"] for s in stages] == first_steps
  for s in stages:
    got = shares.share_of(s["counts"])
    want = s["target"]
    assert {t for t in TASKS if got[t]} == {t for t in TASKS if want[t]}, (s["stage"], got)
    errors = {t: got[t] / want[t] - 1 for t in TASKS if want[t]}
    assert max(map(abs, errors.values())) < 0.03, (s["stage"], errors)
    np.testing.assert_allclose([s["loader"][t] for t in TASKS], [got[t] for t in TASKS],
                               atol=1e-12)


def test_corpus_run_delivers_its_configured_shares_in_every_stage():
  """configs/corpus.yaml as shipped, its 200 steps (409,600 positions): stage 1 steps 0-39,
  stage 2 steps 40-79 (81,920 positions each), stage 3 steps 80-199 (245,760)."""
  cfg = load_config(os.path.join(REPO, "configs", "corpus.yaml"))
  _assert_delivered(shares.measure(cfg, cfg.train.steps), [0, 40, 80])


def _recipe_130b(*overrides: str):
  """The 130B recipe (model/step1-130b.yaml + data/pretrain_stages.yaml: 4,096-token rows, 256
  patches per image) on the committed corpus, 4 rows a step and stages of 20 steps (327,680
  positions) instead of 1.2T and 800B tokens; the stage weights are the shipped ones."""
  cfg = load_config(os.path.join(REPO, "configs", "model", "step1-130b.yaml"), [
      "train.batch_size=4", f"data.tokenizer_model={CORPUS}/spm_unigram.model", *overrides])
  stages = load_config(os.path.join(REPO, "configs", "data", "pretrain_stages.yaml"),
                       ["vision.enabled=true"]).data.stages
  data = dataclasses.replace(
      cfg.data, source="grain", shards={t: g for t, g in SHARDS.items() if t != "aqta"},
      stages=[dataclasses.replace(s, tokens=20 * 4 * 4096 if s.tokens else 0) for s in stages])
  return dataclasses.replace(cfg, data=data)


def test_130b_recipe_delivers_the_reports_shares():
  _assert_delivered(shares.measure(_recipe_130b(), 60), [0, 20, 40])


def test_one_image_per_row_caps_the_130b_image_share_and_says_so():
  with pytest.raises(ConfigError, match=r"max_images_per_sequence=1 per train.seq_len=4096 row "
                                        r"\(image segments average 287 tokens\) images get only "
                                        r"stage 1 \(data.stages\[0\]\) 0.070 of its 0.250.* set "
                                        r"vision.max_images_per_sequence=4 "):
    _loader(_recipe_130b("vision.max_images_per_sequence=1"))


def test_an_unreachable_share_stops_before_training_or_is_accepted_and_reported(caplog):
  cfg = load_config(os.path.join(REPO, "configs", "corpus.yaml"),
                    ["vision.max_images_per_sequence=1"])
  with pytest.raises(ConfigError, match=r"images get only stage 1 \(data.stages\[0\]\) 0.101 of "
                                        r"its 0.250, .*stage 3 \(data.stages\[2\]\) 0.129 of its "
                                        r"0.300 share of the tokens \(predicted shares, .*\)\. "
                                        r"To deliver them, set "
                                        r"vision.max_images_per_sequence=3 or lower the image "
                                        r"weights; to train with the predicted shares, set "
                                        r"data.accept_share_shortfall=true"):
    _loader(cfg)
  accepted = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                               accept_share_shortfall=True))
  with caplog.at_level(logging.WARNING, "stepaudio_jax.data.loader"):
    loader = _loader(accepted)
    assert "training anyway (data.accept_share_shortfall=true): token shares" in caplog.text
    caplog.clear()
    classify = shares.SegmentClassifier(cfg.data, cfg.tokens)
    counts = {}
    for step in range(40):  # stage 1
      for t, n in shares.count_tokens(loader.next_local(), classify).items():
        counts[t] = counts.get(t, 0) + n
      if step == 30:  # under 4 x pack_lookahead rows into the stage: not reported yet
        assert not caplog.text
  stats = loader.stats()
  # What the check predicted (0.101) is what the batches hold; the stats and the log say so.
  assert abs(shares.share_of(counts)["image_text"] - 0.101) < 0.005
  assert stats["target/image_text"] == 0.25 and stats["share_drift"] > 0.14
  assert caplog.text.count("data: stage 1 delivers") == 1
  assert "image_text 0.1" in caplog.text and "(target 0.250)" in caplog.text


@pytest.mark.parametrize("lookahead", [2, 8])
def test_a_new_stage_carries_at_most_pack_lookahead_old_segments_per_row(lookahead):
  """Stage 1 mixes long audio (continuation, interleaved: up to 256 tokens, cut to 128) with
  text; stage 2 is text only, so every audio segment after the change was drawn in stage 1."""
  stages = ("data.stages=[{tokens: 20480, audio: 2, text: 1, image: 0, continuation: 1, "
            "interleaved: 1}, {tokens: 0, audio: 0, text: 1, image: 0}]")
  cfg = load_config(os.path.join(REPO, "configs", "corpus.yaml"),
                    ["train.seq_len=128", f"data.pack_lookahead={lookahead}", stages])
  loader, classify = _loader(cfg), shares.SegmentClassifier(cfg.data, cfg.tokens)
  boundary, rows = 20480 // (8 * 128), 8
  old = np.zeros((3 * lookahead, rows), int)  # old-stage segments by step after the change, row
  for step in range(boundary + len(old)):
    batch = loader.next_local()
    if step < boundary:
      continue
    for r in range(rows):
      seg_ids = batch["segment_ids"][r]
      old[step - boundary, r] = sum(
          classify(batch["tokens"][r][seg_ids == s]) != "text"
          for s in np.unique(seg_ids[seg_ids > 0]))
  assert old.sum() > 0  # the look-ahead did carry some
  assert old.sum(0).max() <= lookahead  # per row stream
  assert old[lookahead:].sum() == 0  # all within the first pack_lookahead steps


@pytest.mark.parametrize("workers,epoch", [(0, 59), (2, 60)])
def test_steps_for_epochs_is_when_every_sft_record_has_been_trained_on(workers, epoch,
                                                                       monkeypatch):
  """An AQTA-only SFT stage on the committed corpus (468 dialogues, 74,951 tokens rendered):
  1 epoch is the first step whose batches (searched segment by segment) hold every dialogue,
  with Grain workers too (each reads its own slice of the records)."""
  cfg = load_config(os.path.join(REPO, "configs", "corpus.yaml"), [
      "train.eval_every=0", f"data.shards.aqta=[{SHARDS['aqta'][0]}]", f"data.workers={workers}",
      "data.stages=[{audio: 1, text: 0, image: 0, continuation: 0, aqta: 1}]"])
  ctx = TemplateContext(cfg.tokens, cfg.vision, make_tokenizer(cfg.data.tokenizer_model,
                                                               cfg.tokens))
  source = RecordSource(resolve_shards(SHARDS["aqta"]))
  segs = [render(decode_checked(source[i][1], cfg.tokens, ""), ctx) for i in range(len(source))]
  assert len(segs) == 468 and sum(map(len, segs)) == 74951
  # 442 distinct dialogues; the one longer than a row (263 tokens) is packed cut to the row.
  copies = collections.Counter(s.tokens[:cfg.train.seq_len].tobytes() for s in segs)
  loader = _loader(cfg)
  epochs = [loader.steps_for_epochs(e) for e in (0.5, 1, 2)]
  # Tokens alone would say ceil(74,951 / 2,048) = 37 steps, which hold about 300 of them: a
  # dialogue of ~160 tokens leaves no room for a second in a 256-token row (36% padding).
  assert epochs[1] == epoch
  seen = collections.Counter()
  fewest = []  # the fewest passes over any dialogue (packed / copies), after each step
  for _ in range(epochs[2]):
    batch = loader.next_local()
    for tokens, seg_ids in zip(batch["tokens"], batch["segment_ids"]):
      seen.update(tokens[seg_ids == s].tobytes() for s in np.unique(seg_ids[seg_ids > 0]))
    fewest.append(min(seen[d] // n for d, n in copies.items()))
  assert fewest.index(1) + 1 == epoch and fewest.index(2) + 1 == epochs[2]
  assert epochs[0] < epoch
  # Process 1 of 2 loads other rows but counts the same.
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert _loader(cfg).steps_for_epochs(1) == epoch
