"""The built-in k-means tokenizer: Step-Audio's frame rates, code ranges, safetensors round trip;
load_tokenizer's specs: a file by its kind, kmeans:PATH, module:function, a missing file."""

import dataclasses
import math
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from data_pipelines import audio, features
from data_pipelines.kmeans_tokenizer import LINGUISTIC, SEMANTIC, KMeansDualTokenizer, kmeans
from data_pipelines.tokenizer import FILE_KINDS, AudioTokenizer, file_kind, load_tokenizer
from tests.conftest import REPO

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


COMMITTED = os.path.join(REPO, "data_pipelines", "corpus", "audio_tokenizer.safetensors")


class FakeTokenizer:
  """A second file kind: every frame is code 1."""

  linguistic_frame_ms, semantic_frame_ms, linguistic_codes, semantic_codes = 60, 40, 4, 4

  @classmethod
  def load(cls, path: str) -> "FakeTokenizer":
    return cls()

  def linguistic(self, wave16k):
    return np.ones(features.num_frames(len(wave16k), 60), np.int32)

  def semantic(self, wave16k):
    return np.ones(features.num_frames(len(wave16k), 40), np.int32)


def make_fake() -> FakeTokenizer:
  return FakeTokenizer()


def test_a_plain_path_without_a_kind_is_the_kmeans_file():
  """The committed file's metadata name no kind: a plain path and kmeans:PATH load the same."""
  assert file_kind(COMMITTED) == "kmeans"
  plain, prefixed = load_tokenizer(COMMITTED), load_tokenizer(f"kmeans:{COMMITTED}")
  assert isinstance(plain, KMeansDualTokenizer) and isinstance(plain, AudioTokenizer)
  wave = audio.prepare(tone(0.6, 180, 3), SR)
  np.testing.assert_array_equal(plain.linguistic(wave), prefixed.linguistic(wave))
  np.testing.assert_array_equal(plain.semantic(wave), prefixed.semantic(wave))


def test_a_file_dispatches_on_its_kind(tmp_path, monkeypatch):
  """A kind is one FILE_KINDS entry; a kind without one is refused, naming the known kinds."""
  path = str(tmp_path / "fake.safetensors")
  save_file({"x": np.zeros(1, np.float32)}, path, metadata={"kind": "fake"})
  with pytest.raises(ValueError, match=r"kind 'fake'; known kinds: \['kmeans'\]"):
    load_tokenizer(path)
  monkeypatch.setitem(FILE_KINDS, "fake", f"{__name__}:FakeTokenizer")
  assert isinstance(load_tokenizer(path), FakeTokenizer)


def test_module_function_spec():
  assert isinstance(load_tokenizer(f"{__name__}:make_fake"), FakeTokenizer)


@pytest.mark.parametrize("spec", ["{d}/absent.safetensors", "kmeans:{d}/absent.safetensors"])
def test_a_missing_file_is_one_line_naming_it(tmp_path, spec):
  spec = spec.format(d=tmp_path)
  with pytest.raises(FileNotFoundError) as e:
    load_tokenizer(spec)
  assert str(e.value) == f"audio tokenizer file {tmp_path}/absent.safetensors does not exist"


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
  path = tmp_path / "bad.safetensors"
  path.write_text("not a tensor file")
  with pytest.raises(ValueError, match="is not a safetensors file"):
    load_tokenizer(str(path))
