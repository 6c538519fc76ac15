"""The committed corpus: shards exist, decode, validate and hold the documented tasks and tags."""

import collections
import json
import os
import re

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
  assert total < 10 * 2**20  # small enough to commit; the derived ASR pairs are ~0.9 MB of it
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


def _transcripts(exs: list[records.Example], split: str) -> list[str]:
  return [e.metadata["transcript"] for e in exs if e.metadata["split"] == split]


def test_every_eval_transcript_piece_occurs_in_a_training_transcript(corpus):
  """The text tokenizer cuts Chinese into characters, so a held-out sentence needs no piece
  that the training transcripts lack (a model can only emit pieces it was trained on)."""
  spm = pytest.importorskip("sentencepiece", reason="pip install sentencepiece==0.2.1")
  sp = spm.SentencePieceProcessor(model_file=os.path.join(CORPUS, "spm_unigram.model"))
  seen = {p for t in _transcripts(corpus["asr"], "train") for p in sp.encode(t)}
  for lang in grammar.LANGUAGES:
    held = [t for e in corpus["asr"] if e.metadata["split"] == "eval"
            and e.metadata["language"] == lang for t in [e.metadata["transcript"]]]
    missing = {sp.id_to_piece(p) for t in held for p in sp.encode(t)} - {
        sp.id_to_piece(p) for p in seen}
    assert held and not missing, (lang, sorted(missing))
  for t in _transcripts(corpus["asr"], "eval"):
    if not t.isascii():  # Chinese: one piece per character (and the leading "▁")
      pieces = [p for p in sp.encode(t, out_type=str) if p != "▁"]
      assert [p.lstrip("▁") for p in pieces] == list(t), t


def test_eval_holds_unseen_voices_and_unseen_arithmetic(corpus):
  """Per language one voice speaks only eval examples, and the held-out arithmetic facts occur
  in no training split of any task (text included), so eval means unseen speaker and sentence."""
  from data_pipelines import speak
  sp = pytest.importorskip("sentencepiece", reason="pip install sentencepiece==0.2.1")
  sp = sp.SentencePieceProcessor(model_file=os.path.join(CORPUS, "spm_unigram.model"))
  texts = collections.defaultdict(set)
  for task, exs in corpus.items():
    for e in exs:
      for ids in e.text:  # the stored text itself, split into sentences
        texts[e.metadata["split"]].update(
            t.strip() for t in re.findall(r"[^。？.?]*[。？.?]", sp.decode(ids.tolist())))
  held = {s.text for lang in grammar.LANGUAGES for q in (False, True)
          for s in grammar.all_sentences(grammar.World.make(0), lang, q) if grammar.held_out(s)}
  assert 280 <= len(held) <= 340  # about a tenth of 3 languages x 2 kinds x 528 sentences
  assert not held & texts["train"]
  assert len(held & texts["eval"]) > 100
  unseen = {v.name for v in speak.UNSEEN_VOICES.values()}
  for task in ("asr", "tts", "aqta", "audio_continuation", "audio_text_interleaved"):
    for e in corpus[task]:
      assert (e.metadata["speaker"] in unseen) == (e.metadata["voice"] == "unseen")
      assert e.metadata["split"] == "eval" or e.metadata["voice"] == "seen"
    for lang in grammar.LANGUAGES:
      voices = collections.Counter(e.metadata["voice"] for e in corpus[task]
                                   if e.metadata["split"] == "eval"
                                   and e.metadata["language"] == lang)
      assert voices["seen"] == voices["unseen"] > 0, (task, lang, voices)


def test_every_single_sentence_training_utterance_is_also_an_asr_pair(corpus):
  """TTS utterances, AQTA questions and interleaved chunks of the training splits reappear as ASR
  records (same speaker, transcript and codes); eval utterances do not."""
  asr = collections.Counter(
      (e.metadata["speaker"], e.metadata["transcript"], e.linguistic[0].tobytes(),
       e.semantic[0].tobytes()) for e in corpus["asr"] if e.metadata["split"] == "train")
  want = collections.Counter()
  for task in ("tts", "aqta", "audio_text_interleaved"):
    for e in corpus[task]:
      if e.metadata["split"] == "train":
        texts = [e.metadata["question"]] if task == "aqta" else (
            [e.metadata["transcript"]] if task == "tts" else
            [grammar_text for grammar_text in _chunk_texts(e)])
        for text, ling, sem in zip(texts, e.linguistic, e.semantic):
          want[e.metadata["speaker"], text, ling.tobytes(), sem.tobytes()] += 1
  assert len(want) > 1000 and not want - asr
  derived = sum(1 for e in corpus["asr"] if "from_task" in e.metadata)
  assert derived == sum(want.values())
  assert all(e.metadata["split"] == "train" for e in corpus["asr"] if "from_task" in e.metadata)


def _chunk_texts(e: records.Example) -> list[str]:
  """An interleaved record's chunk transcripts, decoded from its text ids."""
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=os.path.join(CORPUS, "spm_unigram.model"))
  return [sp.decode(t.tolist()) for t in e.text]
