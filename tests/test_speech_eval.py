"""The listening evaluators (pocketsphinx, pystoi, resemblyzer) on the committed espeak-ng clips:
they hear the originals, fail on speech that is not there, and tell the corpus's voices apart."""

import os

import numpy as np
import pytest

pytest.importorskip("pocketsphinx")
pytest.importorskip("pystoi")
pytest.importorskip("resemblyzer")

from stepaudio_jax.config.speech import MelConfig  # noqa: E402
from stepaudio_jax.data.speech_pairs import load_pairs  # noqa: E402
from stepaudio_jax.experiments import speech_eval  # noqa: E402
from tests.conftest import REPO  # noqa: E402

PAIRS = os.path.join(REPO, "data_pipelines", "corpus", "speech")
RATE = 22050


@pytest.fixture(scope="module")
def clips():
  utts = [u for split in ("train", "eval")
          for u in load_pairs(os.path.join(PAIRS, f"{split}.safetensors"), MelConfig(), 0)]
  return utts


@pytest.fixture(scope="module")
def listener():
  return speech_eval.Listener()


def test_the_recogniser_hears_the_originals_and_not_reversed_speech(clips, listener):
  english = [u for u in clips if u.name.startswith("en")]
  assert len(english) >= 20
  heard = [listener.transcribe(u.wave, RATE) for u in english]
  original = speech_eval.wer([u.text for u in english], heard)
  reversed_ = speech_eval.wer([u.text for u in english],
                              [listener.transcribe(u.wave[::-1].copy(), RATE) for u in english])
  assert original <= 0.15, list(zip([u.text for u in english], heard))
  assert reversed_ >= 0.5  # same spectrum, no words: the evaluator can fail


def test_stoi_is_one_for_the_original_and_low_for_other_speech(clips):
  a, b = clips[0].wave, clips[1].wave
  assert speech_eval.stoi(a, a, RATE) == pytest.approx(1.0, abs=1e-6)
  assert speech_eval.stoi(a, b, RATE) < 0.5


def test_the_speaker_encoder_tells_the_corpus_voices_apart(clips, listener):
  """Each voice's clips are closer to each other than to any other voice's, on average."""
  by_voice: dict[str, list[np.ndarray]] = {}
  for u in clips:
    by_voice.setdefault(u.name, []).append(u.wave)
  matrix = speech_eval.voice_matrix(listener, by_voice, RATE)
  for voice, row in matrix.items():
    if len(by_voice[voice]) < 2:
      continue
    others = max(v for k, v in row.items() if k != voice)
    assert row[voice] > others, (voice, row)


def test_listen_scores_a_degraded_copy_below_the_original(clips, listener):
  english = [speech_eval.Clip(u.text, u.wave, True) for u in clips if u.name.startswith("en")][:6]
  rng = np.random.default_rng(0)
  noisy = [c.original + 0.3 * rng.standard_normal(len(c.original)) for c in english]
  clean = speech_eval.listen(listener, english, [c.original for c in english], RATE)
  bad = speech_eval.listen(listener, english, noisy, RATE)
  assert clean["stoi"] == pytest.approx(1.0) and clean["speaker_cos"] == pytest.approx(1.0)
  assert bad["stoi"] < clean["stoi"] - 0.2 and bad["speaker_cos"] < 0.9
  assert bad["wer"] > clean["wer"]
  assert "| original |" in speech_eval.table({"original": clean})
