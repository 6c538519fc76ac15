"""The committed corpus: shards exist, decode, validate and hold the documented tasks and tags."""

import collections
import json
import os

import numpy as np
import pytest

from data_pipelines import features, grammar
from stepaudio_jax.config.model import TokenLayout
from stepaudio_jax.data import records

CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "data_pipelines", "corpus")
TASK_DIRS = {"text": "text", "audio_continuation": "audio_continuation", "asr": "asr",
             "tts": "tts", "image_text": "image_text",
             "audio_text_interleaved": "audio_text_interleaved", "aqta": "audio_text_interleaved"}


@pytest.fixture(scope="module")
def manifest() -> dict:
  with open(os.path.join(CORPUS, "manifest.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def corpus(manifest) -> dict[str, list[records.Example]]:
  """Every record, by task directory, decoded and validated against the documented layout."""
  from array_record.python import array_record_module
  layout = TokenLayout(text_vocab_size=manifest["text_tokenizer"]["ids_below"],
                       linguistic_codes=manifest["audio_tokenizer"]["linguistic"]["codes"],
                       semantic_codes=manifest["audio_tokenizer"]["semantic"]["codes"])
  out = collections.defaultdict(list)
  for name, count in manifest["files"].items():
    reader = array_record_module.ArrayRecordReader(os.path.join(CORPUS, name))
    exs = [records.decode_checked(b, layout, name) for b in reader.read_all()]
    reader.close()
    assert len(exs) == count, name
    out[name.split("/")[0]] += exs
  return out


def test_size_and_files(manifest):
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(CORPUS) for f in fs)
  assert total < 8 * 2**20
  assert manifest["audio_tokenizer"]["linguistic"]["frame_ms"] == 60
  assert manifest["audio_tokenizer"]["semantic"]["frame_ms"] == 40
  for f in (manifest["audio_tokenizer"]["file"], manifest["text_tokenizer"]["file"]):
    assert os.path.isfile(os.path.join(CORPUS, f))


def test_tasks_and_counts(corpus, manifest):
  assert set(corpus) == set(TASK_DIRS)
  for task, exs in corpus.items():
    assert len(exs) == manifest["tasks"][task]["examples"] > 0
    assert {e.task for e in exs} == {TASK_DIRS[task]}
    assert {e.metadata["split"] for e in exs} == {"train", "eval"}
  for task in ("asr", "tts", "aqta", "audio_continuation", "audio_text_interleaved"):
    assert {e.metadata["language"] for e in corpus[task]} == set(grammar.LANGUAGES)


def test_audio_frames_match_duration(corpus):
  for task in ("asr", "tts", "audio_continuation"):
    for e in corpus[task][:50]:
      n = round(float(e.metadata["duration_s"]) * features.SAMPLE_RATE)
      assert abs(len(e.linguistic[0]) - features.num_frames(n, 60)) <= 1
      assert abs(len(e.semantic[0]) - features.num_frames(n, 40)) <= 1


def test_tts_tags(corpus):
  tts = corpus["tts"]
  cantonese = [e for e in tts if e.metadata["language"] == "cantonese"]
  assert len(cantonese) >= 50
  assert all(e.metadata["instruction"].startswith("(Cantonese)") for e in cantonese)
  assert {e.metadata["speed"] for e in cantonese} == {"slow 2", "slow 1", "normal", "fast 1",
                                                      "fast 2"}
  for e in tts:
    assert e.text[0].size and e.linguistic[0].size and e.semantic[0].size
    assert e.metadata["speaker"] and e.metadata["speed_wpm"] > 0
    if e.metadata["speed"] != "normal":
      assert e.metadata["instruction"].endswith(f"({e.metadata['speed']})")
  slow = np.mean([e.metadata["duration_s"] for e in tts if e.metadata["speed"] == "slow 2"])
  fast = np.mean([e.metadata["duration_s"] for e in tts if e.metadata["speed"] == "fast 2"])
  assert slow > 1.5 * fast  # the speed tags have real audio behind them


def test_aqta_pairs(corpus):
  for e in corpus["aqta"]:
    assert e.metadata["kind"] == "aqta" and e.metadata["chunk_roles"] == "question,answer"
    assert e.text[0].size == 0 and e.linguistic[0].size and e.semantic[0].size
    assert e.text[1].size and e.linguistic[1].size == 0 and e.semantic[1].size == 0
    if e.metadata["topic"] == "arithmetic":
      op, a, b = e.metadata["op"], e.metadata["a"], e.metadata["b"]
      assert e.metadata["result"] == grammar.OPS[op](a, b)
      want = grammar.arithmetic(op, a, b, e.metadata["language"], True)
      assert (want.text, want.answer) == (e.metadata["question"], e.metadata["answer"])


def test_interleaved_and_images(corpus):
  for e in corpus["audio_text_interleaved"]:
    assert len(e.text) >= 3 and all(t.size and l.size and s.size
                                    for t, l, s in zip(e.text, e.linguistic, e.semantic))
  for e in corpus["image_text"]:
    assert e.image.shape[2] == 3 and e.text[0].size and e.metadata["caption"]


def test_text_ids_decode_to_metadata():
  spm = pytest.importorskip("sentencepiece", reason="pip install sentencepiece==0.2.1")
  sp = spm.SentencePieceProcessor(model_file=os.path.join(CORPUS, "spm_unigram.model"))
  assert [sp.pad_id(), sp.bos_id(), sp.unk_id(), sp.eos_id(), sp.piece_to_id("<|BOT|>")] == [
      0, 1, 2, 3, 4]
  from array_record.python import array_record_module
  reader = array_record_module.ArrayRecordReader(
      os.path.join(CORPUS, "tts", "train-00000-of-00002.array_record"))
  for b in reader.read([0, 1, 2]):
    e = records.decode(b)
    assert sp.decode(e.text[0].tolist()) == e.metadata["transcript"]
  reader.close()
