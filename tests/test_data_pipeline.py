"""Records, templates, interleave, packing, token-share mixing, malformed records and exact
resume of the Grain loader (in-process, tiny shards written with records.write_shard)."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
from array_record.python import array_record_module

from stepaudio_jax.config.data import DataConfig, StageConfig
from stepaudio_jax.config.model import TokenLayout, VisionConfig
from stepaudio_jax.data import records
from stepaudio_jax.data.fake import random_example, write_fake_shards
from stepaudio_jax.data.interleave import interleave
from stepaudio_jax.data.loader import GrainLoader
from stepaudio_jax.data.packing import pack_row
from stepaudio_jax.data.source import LoaderStateError
from stepaudio_jax.data.templates import TemplateContext, render
from stepaudio_jax.data.tokenizer import ByteTokenizer
from stepaudio_jax.models.tokens import TokenType as T

LAYOUT = TokenLayout(text_vocab_size=320, linguistic_codes=64, semantic_codes=96)
# 30% image tokens in 128-token rows need up to 2 images (16 placeholders + caption) per row.
VISION = VisionConfig(enabled=True, image_size=16, patch_size=4, hidden_size=32, num_layers=2,
                      num_heads=2, intermediate_size=64, max_images_per_sequence=2)
CTX = TemplateContext(LAYOUT, VISION, ByteTokenizer(LAYOUT))
I32 = lambda *a: np.array(a, np.int32)  # noqa: E731
EMPTY = np.zeros(0, np.int32)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  return write_fake_shards(str(tmp_path_factory.mktemp("shards")), LAYOUT, per_task=24)


def _loader(shards, stages, batch=4, seq_len=128, vision=VISION, **kw):
  cfg = DataConfig(source="grain", shards=shards, stages=stages, **kw)
  return GrainLoader(cfg, LAYOUT, vision, seq_len, batch, seed=0)


def _hash(batch):
  h = hashlib.sha256()
  for k in sorted(batch):
    h.update(k.encode() + np.ascontiguousarray(batch[k]).tobytes())
  return h.hexdigest()


def test_record_round_trip_and_validation():
  ex = random_example("tts", np.random.default_rng(0), LAYOUT)
  back = records.decode(records.encode(ex))
  assert back.task == "tts" and back.metadata == ex.metadata
  for a, b in zip(ex.text + ex.linguistic + ex.semantic, back.text + back.linguistic + back.semantic):
    np.testing.assert_array_equal(a, b)
    assert b.dtype == np.int32
  img = random_example("image_text", np.random.default_rng(1), LAYOUT)
  np.testing.assert_array_equal(records.decode(records.encode(img)).image, img.image)
  bad = records.Example("asr", [I32(1)], [I32(64)], [I32(0)])  # linguistic code out of range
  with pytest.raises(records.RecordError, match="linguistic"):
    records.validate(bad, LAYOUT)
  with pytest.raises(records.RecordError, match="unknown task"):
    records.validate(records.Example("video", [EMPTY], [EMPTY], [EMPTY]))
  with pytest.raises(records.RecordError, match="int32"):
    records.validate(records.Example("text", [np.zeros(3, np.int64)], [EMPTY], [EMPTY]))
  with pytest.raises(records.RecordError, match="not a msgpack record|record must be"):
    records.decode(b"\xc1garbage")


def test_interleave_is_exactly_two_linguistic_then_three_semantic():
  ling, sem = np.arange(7, dtype=np.int32), np.arange(10, dtype=np.int32)  # 3 groups; 1 + 1 left
  ids, types = interleave(ling, sem, LAYOUT)
  lo, so = LAYOUT.linguistic_offset, LAYOUT.semantic_offset
  want = [lo + 0, lo + 1, so + 0, so + 1, so + 2, lo + 2, lo + 3, so + 3, so + 4, so + 5,
          lo + 4, lo + 5, so + 6, so + 7, so + 8]
  assert ids.tolist() == want
  assert types.tolist() == [T.AUDIO_LINGUISTIC] * 2 * 1 + [T.AUDIO_SEMANTIC] * 3 + (
      [T.AUDIO_LINGUISTIC] * 2 + [T.AUDIO_SEMANTIC] * 3) * 2
  assert interleave(ling[:1], sem, LAYOUT)[0].size == 0  # fewer than 2 linguistic: no group
  assert interleave(ling, sem, LAYOUT, "semantic")[0].tolist() == (so + sem).tolist()
  assert interleave(ling, sem, LAYOUT, "linguistic")[1].tolist() == [T.AUDIO_LINGUISTIC] * 7


def _learned(seg):
  """Target ids with loss, and their types."""
  keep = seg.types != T.PAD
  return seg.targets[keep].tolist(), seg.types[keep].tolist()


def test_templates_put_the_loss_where_each_task_needs_it():
  tok, lay = CTX.tokenizer, LAYOUT
  text, ling, sem = I32(20, 21, 22), I32(0, 1, 2, 3), I32(0, 1, 2, 3, 4, 5)
  audio, audio_types = interleave(ling, sem, lay)
  asr = render(records.Example("asr", [text], [ling], [sem]), CTX)
  assert _learned(asr) == (text.tolist() + [lay.eos_id], [T.TEXT] * 4)
  full = [lay.bos_id] + asr.targets.tolist()
  bot_human = [lay.bot_id] + tok.encode("human\n")
  i = full.index(lay.bot_id, 1)  # second turn
  i = full.index(lay.bot_id, i + 1) if full[i:i + len(bot_human)] != bot_human else i
  assert full[:2 + len(tok.encode("system\n"))] == [lay.bos_id, lay.bot_id] + tok.encode("system\n")
  assert audio.tolist() == full[i + len(bot_human): i + len(bot_human) + len(audio)]
  tts = render(records.Example("tts", [text], [ling], [sem], None,
                               {"emotion": "happy 1", "speed": "fast 2", "speaker": "a"}), CTX)
  assert _learned(tts) == (audio.tolist() + [lay.eos_id], audio_types.tolist() + [T.TEXT])
  tags = tok.encode("(happy 1)(fast 2)")
  prompt = tts.tokens.tolist()
  start = [j for j in range(len(prompt)) if prompt[j:j + len(tags)] == tags]
  assert start and prompt[start[0] + len(tags): start[0] + len(tags) + 3] == text.tolist()
  img = render(records.Example("image_text", [text], [EMPTY], [EMPTY],
                               np.zeros((4, 4, 3), np.uint8)), CTX)
  assert (img.tokens == lay.image_placeholder_id).sum() == VISION.tokens_per_image
  assert _learned(img) == (text.tolist() + [lay.eos_id], [T.IMAGE_CAPTION] * 3 + [T.TEXT])
  assert img.image.shape == (16, 16, 3) and img.image.min() == -1.0
  cont = render(records.Example("audio_continuation", [EMPTY], [ling], [sem]), CTX)
  assert _learned(cont)[0] == audio.tolist() + [lay.eos_id] and cont.tokens[0] == lay.bos_id
  inter = render(records.Example("audio_text_interleaved", [text, text], [ling, ling], [sem, sem]),
                 CTX)
  assert (inter.types != T.PAD).all()
  assert inter.targets.tolist() == (text.tolist() + audio.tolist()) * 2 + [lay.eos_id]
  plain = render(records.Example("text", [text], [EMPTY], [EMPTY]), CTX)
  assert _learned(plain) == (text.tolist() + [lay.eos_id], [T.TEXT] * 4)


def test_packing_keeps_segments_apart_and_restarts_positions():
  rng = np.random.default_rng(0)
  segs = [render(random_example(t, rng, LAYOUT), CTX) for t in ("text", "asr", "image_text")]
  n = sum(map(len, segs))
  row = pack_row(segs, n + 7, LAYOUT, VISION)
  seg_ids, pos = row["segment_ids"], row["positions"]
  assert seg_ids.tolist() == sum(([i + 1] * len(s) for i, s in enumerate(segs)), []) + [0] * 7
  starts = np.flatnonzero(np.diff(seg_ids, prepend=-1))
  for a, b in zip(starts, list(starts[1:]) + [len(seg_ids)]):
    if seg_ids[a]:
      assert pos[a:b].tolist() == list(range(b - a))
  # The attention mask the model builds from segment ids is block-diagonal and causal.
  mask = (seg_ids[:, None] == seg_ids[None, :]) & (seg_ids[:, None] > 0)
  mask &= np.tril(np.ones_like(mask))
  for i, s in enumerate(segs, start=1):
    rows = np.flatnonzero(seg_ids == i)
    assert mask[rows][:, seg_ids != i].sum() == 0
  assert row["loss_mask"][seg_ids == 0].sum() == 0
  np.testing.assert_array_equal(row["images"][0], segs[2].image)


STAGE3 = StageConfig(audio=4, text=3, image=3, continuation=1, interleaved=1, asr=1, tts=1)


def test_token_shares_converge_to_the_configured_ones(shards):
  # 30% image tokens in 512-token rows need ~4 images (16 placeholders + caption) per row.
  vision = dataclasses.replace(VISION, max_images_per_sequence=8)
  loader = _loader(shards, [STAGE3], batch=2, seq_len=512, vision=vision)
  pad = 0
  for _ in range(100):
    pad += (loader.next_local()["segment_ids"] == 0).mean() / 100
  stats = loader.stats()
  packed = {t: stats[f"tokens/{t}"] for t in records.TASKS}
  total = sum(packed.values())
  want = STAGE3.task_weights()
  errors = {t: packed[t] / total / want[t] - 1 for t in records.TASKS if want[t]}
  assert max(abs(e) for e in errors.values()) < 0.02, errors  # relative error of every share
  assert stats["truncated"] == 0 and stats["malformed"] == 0
  assert pad < 0.05  # first-fit packing leaves under 5% padding


STAGES = [StageConfig(tokens=4 * 128 * 3, audio=2, text=1, image=1),  # steps 0-2: stage 0
          STAGE3]


def test_resume_sees_the_same_batches_across_a_stage_change(shards):
  full = _loader(shards, STAGES)
  hashes, stages = [], []
  for _ in range(7):
    hashes.append(_hash(full.next_local()))
    stages.append(full.stats()["stage"])
  assert stages == [0, 0, 0, 1, 1, 1, 1]
  first = _loader(shards, STAGES)
  cut = [_hash(first.next_local()) for _ in range(2)]
  state = json.loads(json.dumps(first.get_state()))  # what the checkpoint's JsonSave stores
  resumed = _loader(shards, STAGES)
  resumed.set_state(state)
  cut += [_hash(resumed.next_local()) for _ in range(5)]
  assert cut == hashes


def test_state_from_another_topology_fails_with_a_fix(shards):
  state = _loader(shards, STAGES).get_state()
  with pytest.raises(LoaderStateError, match="global_batch=4.*same train.batch_size"):
    _loader(shards, STAGES, batch=8).set_state(state)
  mp_state = {**state, "workers": 2, "process_count": 4, "processes": [{}] * 4}
  with pytest.raises(LoaderStateError, match=r"saved by 4 processes.*Resume on 4 processes"):
    _loader(shards, STAGES, workers=2).set_state(mp_state)


def _bad_shard(path, good):
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  writer.write(records.encode(good))
  writer.write(b"\x93not a record")
  writer.write(records.encode(records.Example("text", [I32(400)], [EMPTY], [EMPTY])))  # id >= 320
  writer.write(records.encode(good))
  writer.close()


def test_malformed_records_are_named_or_skipped_and_counted(tmp_path):
  good = random_example("text", np.random.default_rng(0), LAYOUT)
  path = str(tmp_path / "text-bad.arrayrecord")
  _bad_shard(path, good)
  stages = [StageConfig(audio=0, image=0)]
  strict = GrainLoader(DataConfig(source="grain", shards={"text": [path]}, stages=stages),
                       LAYOUT, VISION, 64, 1, seed=0)
  with pytest.raises(records.RecordError, match=rf"shard {path} record [12]: "):
    for _ in range(20):
      strict.next_local()
  lenient = GrainLoader(DataConfig(source="grain", shards={"text": [path]}, stages=stages,
                                   skip_malformed=True), LAYOUT, VISION, 64, 1, seed=0)
  for _ in range(20):
    lenient.next_local()
  stats = lenient.stats()
  assert stats["malformed"] > 0 and stats["tokens/text"] > 0


def test_a_shard_of_another_task_is_refused_by_name(tmp_path):
  """The first record of every shard must be of the task it is listed for (TTS records under
  data.shards.aqta would train as TTS; preference pairs would stop with a traceback naming no
  shard); a later record of another task is malformed (named, or skipped and counted)."""
  rng = np.random.default_rng(0)
  tts = str(tmp_path / "tts.arrayrecord")
  records.write_shard(tts, [random_example("tts", rng, LAYOUT) for _ in range(4)])
  stages = [StageConfig(audio=1, text=0, image=0, continuation=0, aqta=1)]
  with pytest.raises(records.ShardError, match=rf"data.shards.aqta: shard {tts} holds tts "
                                               r"records, not aqta records"):
    _loader({"aqta": [tts]}, stages)
  pref = str(tmp_path / "pref.arrayrecord")
  empty = [EMPTY] * 3
  records.write_shard(pref, [records.Example(records.PREFERENCE, [I32(17, 18), I32(19), I32(20)],
                                             empty, empty)])
  with pytest.raises(records.ShardError, match=rf"data.eval_shards.text: shard {pref} holds "
                                               r"preference records.*task=reward.*ppo.prompts"):
    GrainLoader(DataConfig(source="grain", shards={"text": [pref]}, eval_shards={"text": [pref]},
                           stages=[StageConfig(audio=0, image=0)]),
                LAYOUT, VISION, 64, 1, seed=0, held_out=True)
  mixed = str(tmp_path / "mixed.arrayrecord")
  text = random_example("text", rng, LAYOUT)
  records.write_shard(mixed, [text, random_example("tts", rng, LAYOUT), text])
  text_only = [StageConfig(audio=0, image=0)]
  strict = _loader({"text": [mixed]}, text_only, batch=1, seq_len=64)
  with pytest.raises(records.RecordError, match=rf"shard {mixed} record 1: a tts record among "
                                                r"the text records"):
    for _ in range(10):
      strict.next_local()
  lenient = _loader({"text": [mixed]}, text_only, batch=1, seq_len=64, skip_malformed=True)
  for _ in range(10):
    lenient.next_local()
  assert lenient.stats()["malformed"] == 1
