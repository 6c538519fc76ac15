"""The Beam pipeline (DirectRunner) turns WAV files into shards that decode and validate."""

import dataclasses
import glob
import json
import math

import numpy as np
import pytest

pytest.importorskip("apache_beam", reason="pip install 'apache-beam==2.77.*' (setup.cfg extra)")
from array_record.python import array_record_module  # noqa: E402
from scipy.io import wavfile  # noqa: E402

from data_pipelines import beam_pipeline, speak  # noqa: E402
from data_pipelines.kmeans_tokenizer import LINGUISTIC, SEMANTIC, KMeansDualTokenizer  # noqa: E402
from stepaudio_jax.config.model import TokenLayout  # noqa: E402
from stepaudio_jax.data import records  # noqa: E402


def read(pattern: str) -> list[records.Example]:
  out = []
  for path in sorted(glob.glob(pattern)):
    reader = array_record_module.ArrayRecordReader(path)
    out += [records.decode(b) for b in reader.read_all()]
    reader.close()
  return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Five WAVs (sine + noise, 22.05 kHz, one stereo), a manifest and a tiny tokenizer."""
  d = tmp_path_factory.mktemp("beam")
  rng = np.random.default_rng(0)
  entries, waves = [], []
  for i in range(5):
    n = int(22050 * (0.4 + 0.3 * i))
    x = np.sin(2 * np.pi * (180 + 60 * i) * np.arange(n) / 22050) + 0.2 * rng.standard_normal(n)
    pcm = (0.3 * x * 32767).astype(np.int16)
    path = str(d / f"clip{i}.wav")
    wavfile.write(path, 22050, np.stack([pcm, pcm], 1) if i == 1 else pcm)
    entries.append({"audio": path, "task": "asr" if i % 2 else "audio_continuation",
                    "metadata": {"speaker": f"synthetic{i}"}, "seconds": n / 22050})
    waves.append(x.astype(np.float32))
  if speak.available():
    wave, sr = speak.speak("the ball is red", speak.VOICES["cantonese"][0], 175)
    path = str(d / "espeak.wav")
    wavfile.write(path, sr, (wave * 32767).astype(np.int16))
    entries.append({"audio": path, "task": "tts", "metadata": {"instruction": "(Cantonese)"},
                    "seconds": len(wave) / sr})
  with open(d / "manifest.jsonl", "w") as f:
    f.write("\n".join(json.dumps({k: v for k, v in e.items() if k != "seconds"})
                      for e in entries))
  tok = KMeansDualTokenizer.fit(waves, dataclasses.replace(LINGUISTIC, codes=16),
                                dataclasses.replace(SEMANTIC, codes=32), iters=3)
  tok.save(str(d / "tok.safetensors"))
  return d, entries


def test_manifest_to_shards(setup):
  d, entries = setup
  paths = beam_pipeline.run([
      "--manifest", str(d / "manifest.jsonl"), "--tokenizer", f"kmeans:{d / 'tok.safetensors'}",
      "--output_prefix", str(d / "out" / "audio"), "--num_shards", "3", "--runner", "DirectRunner"])
  assert paths and all(p.endswith("-of-00003.array_record") for p in paths)
  examples = read(str(d / "out" / "audio-*-of-00003.array_record"))
  assert len(examples) == len(entries)
  layout = TokenLayout(text_vocab_size=1024, linguistic_codes=16, semantic_codes=32)
  seconds = {e["audio"]: e["seconds"] for e in entries}
  for ex in examples:
    records.validate(ex, layout)
    s = seconds[ex.metadata["source"]]
    assert abs(len(ex.linguistic[0]) - s / 0.060) < 1.01
    assert abs(len(ex.semantic[0]) - s / 0.040) < 1.01
  tasks = {ex.metadata["source"]: ex.task for ex in examples}
  assert tasks == {e["audio"]: e["task"] for e in entries}


def test_glob_input_is_continuation(setup):
  d, entries = setup
  beam_pipeline.run([
      "--input_glob", str(d / "clip*.wav"), "--tokenizer", f"kmeans:{d / 'tok.safetensors'}",
      "--output_prefix", str(d / "glob" / "cont"), "--num_shards", "1"])
  examples = read(str(d / "glob" / "cont-00000-of-00001.array_record"))
  assert [e.task for e in examples] == ["audio_continuation"] * 5
  assert [e.metadata["source"] for e in examples] == sorted(e.metadata["source"] for e in examples)
  assert all(e.text[0].size == 0 and math.isfinite(e.metadata["duration_s"]) for e in examples)
