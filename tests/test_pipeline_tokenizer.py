"""The built-in k-means tokenizer: Step-Audio's frame rates, code ranges, safetensors round trip."""

import dataclasses
import math

import numpy as np
import pytest

from data_pipelines import audio, features
from data_pipelines.kmeans_tokenizer import LINGUISTIC, SEMANTIC, KMeansDualTokenizer, kmeans
from data_pipelines.tokenizer import AudioTokenizer, load_tokenizer

SR = audio.SAMPLE_RATE


def tone(seconds: float, hz: float, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  t = np.arange(int(round(seconds * SR))) / SR
  return (np.sin(2 * np.pi * hz * t) + 0.1 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def tok() -> KMeansDualTokenizer:
  waves = [tone(1.0, 150 + 40 * i, i) for i in range(12)]
  return KMeansDualTokenizer.fit(waves, dataclasses.replace(LINGUISTIC, codes=32),
                                 dataclasses.replace(SEMANTIC, codes=64), iters=5)


def test_defaults_are_step_audio_rates():
  assert (LINGUISTIC.frame_ms, LINGUISTIC.codes) == (60, 1024)  # 16.7 Hz
  assert (SEMANTIC.frame_ms, SEMANTIC.codes) == (40, 4096)  # 25 Hz


@pytest.mark.parametrize("seconds", [0.03, 0.5, 1.0, 1.23, 2.7])
def test_rates_and_ranges(tok, seconds):
  wave = audio.prepare(tone(seconds, 220, 0), SR)
  ling, sem = tok.linguistic(wave), tok.semantic(wave)
  assert ling.dtype == sem.dtype == np.int32
  assert len(ling) == math.ceil(seconds / 0.060 - 1e-9) and abs(len(ling) - seconds / 0.060) < 1
  assert len(sem) == math.ceil(seconds / 0.040 - 1e-9) and abs(len(sem) - seconds / 0.040) < 1
  assert 0 <= ling.min() and ling.max() < 32 and 0 <= sem.min() and sem.max() < 64


def test_save_load_round_trip(tok, tmp_path):
  path = str(tmp_path / "tok.safetensors")
  tok.save(path)
  with open(path, "rb") as f:
    assert not f.read(64).startswith(b"\x80")  # not a pickle
  loaded = load_tokenizer(f"kmeans:{path}")
  assert isinstance(loaded, AudioTokenizer)
  wave = tone(0.8, 300, 5)
  np.testing.assert_array_equal(loaded.semantic(wave), tok.semantic(wave))
  np.testing.assert_array_equal(loaded.linguistic(wave), tok.linguistic(wave))
  assert (loaded.linguistic_frame_ms, loaded.semantic_codes) == (60, 64)


def test_kmeans_finds_separated_clusters():
  rng = np.random.default_rng(0)
  centres = np.array([[0, 0], [10, 0], [0, 10]], np.float32)
  x = (centres[rng.integers(0, 3, 600)] + 0.1 * rng.standard_normal((600, 2))).astype(np.float32)
  c = kmeans(x, 3, 10, rng)
  key = lambda p: np.sort(p[:, 0] + 3 * p[:, 1])  # orders the three centres
  assert np.abs(key(c) - key(centres)).max() < 0.2


def test_front_end_resamples_downmixes_and_normalises():
  t = np.arange(22050) / 22050
  pcm = (0.25 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
  wave = audio.prepare(np.stack([pcm, pcm], 1), 22050)
  assert wave.dtype == np.float32 and wave.ndim == 1 and abs(len(wave) - SR) <= 1
  assert abs(np.abs(wave).max() - audio.PEAK) < 1e-6
  assert features.num_frames(len(wave), 60) == 17 and features.num_frames(len(wave), 40) == 25
