"""AQTA and two-turn TTS templates: exact token layouts and loss masks, record validation, and
the committed corpus' AQTA pairs (stored as audio_text_interleaved, kind="aqta") read as AQTA."""

import glob
import os

import numpy as np
import pytest

from stepaudio_jax.config.data import DataConfig, StageConfig
from stepaudio_jax.config.model import TokenLayout, VisionConfig
from stepaudio_jax.data import records
from stepaudio_jax.data.interleave import interleave
from stepaudio_jax.data.loader import GrainLoader, RecordSource
from stepaudio_jax.data.templates import TemplateContext, render, tts_tags
from stepaudio_jax.data.tokenizer import ByteTokenizer, SentencePieceTokenizer
from stepaudio_jax.models.tokens import TokenType as T

LAYOUT = TokenLayout(text_vocab_size=320, linguistic_codes=64, semantic_codes=96)
CTX = TemplateContext(LAYOUT, VisionConfig(), ByteTokenizer(LAYOUT))
I32 = lambda *a: np.array(a, np.int32)  # noqa: E731
EMPTY = np.zeros(0, np.int32)
CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "data_pipelines", "corpus")


def _turn(role: str, body: list[int], layout=LAYOUT, tok=CTX.tokenizer) -> list[int]:
  return [layout.bot_id] + tok.encode(f"{role}\n") + list(body) + [layout.eos_id]


def _check(seg, full: list[int], learned: list[int]) -> None:
  """tokens/targets are `full` shifted by one; only the last len(learned) targets are learned,
  with types `learned`."""
  assert seg.tokens.tolist() == full[:-1] and seg.targets.tolist() == full[1:]
  assert seg.types.tolist() == [T.PAD] * (len(full) - 1 - len(learned)) + learned


def test_aqta_renders_text_history_then_the_spoken_question_and_learns_only_the_answer():
  ling, sem = I32(0, 1, 2, 3), I32(0, 1, 2, 3, 4, 5)
  history = [I32(20, 21), I32(22), I32(23, 24, 25), I32(26)]  # human, assistant, human, assistant
  answer = I32(30, 31, 32)
  ex = records.Example("aqta", history + [EMPTY, answer], [EMPTY] * 4 + [ling, EMPTY],
                       [EMPTY] * 4 + [sem, EMPTY])
  records.validate(ex, LAYOUT)
  audio = interleave(ling, sem, LAYOUT)[0].tolist()
  full = [LAYOUT.bos_id] + _turn("system", CTX.tokenizer.encode(CTX.aqta_prompt))
  for i, said in enumerate(history):
    full += _turn(("human", "assistant")[i % 2], said.tolist())
  full += _turn("human", audio) + _turn("assistant", answer.tolist())
  seg = render(ex, CTX)
  assert seg.task == "aqta"
  _check(seg, full, [T.TEXT] * 4)  # answer + <|EOT|>


def test_two_turn_tts_renders_the_voice_prompt_as_context_and_learns_only_the_target_audio():
  p_text, p_ling, p_sem = I32(40, 41), I32(5, 6), I32(7, 8, 9)
  t_text, t_ling, t_sem = I32(50, 51, 52), I32(0, 1, 2, 3), I32(0, 1, 2, 3, 4, 5)
  meta = {"speaker": "spk", "emotion": "happy 1", "speed": "fast 2"}
  ex = records.Example("tts", [p_text, t_text], [p_ling, t_ling], [p_sem, t_sem], None, meta)
  records.validate(ex, LAYOUT)
  tok = CTX.tokenizer
  p_audio = interleave(p_ling, p_sem, LAYOUT)[0].tolist()
  t_audio, t_types = interleave(t_ling, t_sem, LAYOUT)
  full = ([LAYOUT.bos_id] + _turn("system", tok.encode(CTX.tts_prompt.format(speaker="spk")))
          + _turn("human", p_text.tolist()) + _turn("assistant", p_audio)
          + _turn("human", tok.encode("(happy 1)(fast 2)") + t_text.tolist())
          + _turn("assistant", t_audio.tolist()))
  _check(render(ex, CTX), full, t_types.tolist() + [T.TEXT])  # target audio + <|EOT|>
  one = records.Example("tts", [t_text], [t_ling], [t_sem], None, meta)
  single = ([LAYOUT.bos_id] + _turn("system", tok.encode(CTX.tts_prompt.format(speaker="spk")))
            + _turn("human", tok.encode("(happy 1)(fast 2)") + t_text.tolist())
            + _turn("assistant", t_audio.tolist()))
  _check(render(one, CTX), single, t_types.tolist() + [T.TEXT])


def test_tts_tags():
  assert tts_tags({"instruction": "(Cantonese)(fast 1)", "language": "cantonese",
                   "dialect": "cantonese", "speed": "fast 1"}) == "(Cantonese)(fast 1)"
  assert tts_tags({"instruction": "RAP"}) == "(RAP)"
  assert tts_tags({"language": "English", "dialect": "english", "speed": "normal"}) == "(English)"


@pytest.mark.parametrize("chunks, match", [
    ([(I32(20), EMPTY), (I32(21), EMPTY)], "spoken question"),  # no question audio
    ([(I32(20), I32(1, 2)), (I32(21), EMPTY)], "spoken question"),  # question with text
    ([(EMPTY, I32(1, 2)), (EMPTY, EMPTY)], "answer"),  # no answer text
    ([(I32(20), I32(1, 2)), (EMPTY, I32(1, 2)), (I32(21), EMPTY)], "even number"),
    ([(I32(20), I32(1, 2)), (I32(22), EMPTY), (EMPTY, I32(1, 2)), (I32(21), EMPTY)],
     "chunk 0 is a text turn but holds audio"),
])
def test_aqta_records_that_break_the_turn_layout_are_rejected(chunks, match):
  text = [t for t, _ in chunks]
  audio = [a for _, a in chunks]
  with pytest.raises(records.RecordError, match=match):
    records.validate(records.Example("aqta", text, audio, audio), LAYOUT)
  tagged = records.Example("audio_text_interleaved", text, audio, audio, None, {"kind": "aqta"})
  with pytest.raises(records.RecordError, match=match):
    records.validate(tagged, LAYOUT)
  with pytest.raises(records.RecordError, match="tts has one chunk"):
    records.validate(records.Example("tts", text[:1] * 3, audio[:1] * 3, audio[:1] * 3), LAYOUT)


CORPUS_LAYOUT = TokenLayout(text_vocab_size=1024, linguistic_codes=1024, semantic_codes=4096)


def test_committed_corpus_aqta_records_render_as_aqta():
  tok = SentencePieceTokenizer(os.path.join(CORPUS, "spm_unigram.model"), CORPUS_LAYOUT)
  ctx = TemplateContext(CORPUS_LAYOUT, VisionConfig(), tok)
  source = RecordSource(sorted(glob.glob(os.path.join(CORPUS, "aqta", "train-*.array_record"))))
  for index in range(0, len(source), len(source) // 5):
    where, data = source[index]
    ex = records.decode_checked(data, CORPUS_LAYOUT, where)
    assert ex.task == "audio_text_interleaved" and records.task_of(ex) == "aqta"
    seg = render(ex, ctx)
    assert seg.task == "aqta"
    question = interleave(ex.linguistic[0], ex.semantic[0], CORPUS_LAYOUT)[0].tolist()
    answer = ex.text[1].tolist()
    full = ([CORPUS_LAYOUT.bos_id]
            + _turn("system", tok.encode(ctx.aqta_prompt), CORPUS_LAYOUT, tok)
            + _turn("human", question, CORPUS_LAYOUT, tok)
            + _turn("assistant", answer, CORPUS_LAYOUT, tok))
    _check(seg, full, [T.TEXT] * (len(answer) + 1))
    assert tok.encode(ex.metadata["answer"]) == answer


def test_loader_trains_aqta_from_the_committed_corpus():
  data = DataConfig(source="grain", tokenizer_model=os.path.join(CORPUS, "spm_unigram.model"),
                    shards={"aqta": [os.path.join(CORPUS, "aqta", "train-*.array_record")]},
                    stages=[StageConfig(audio=1, text=0, image=0, continuation=0, aqta=1)])
  loader = GrainLoader(data, CORPUS_LAYOUT, VisionConfig(), 256, 2, seed=0)
  batch = loader.next_local()
  learned = batch["loss_mask"] > 0
  assert learned.any() and (batch["targets"][learned] < CORPUS_LAYOUT.text_vocab_size).all()
  stats = loader.stats()
  assert stats["tokens/aqta"] > 0 and stats["malformed"] == stats["truncated"] == 0
