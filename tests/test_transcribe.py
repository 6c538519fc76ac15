"""`stepaudio transcribe` on a run of configs/asr/corpus.yaml trained for two steps: one
`AUDIO: TEXT` line per file and the --out JSON, each transcript the shared greedy decoder's
(experiments/asr.py greedy_transcripts) for the codes the run's audio tokenizer gives here, the
same codes from a 44.1 kHz stereo copy of the clip, and bad input as one error line (exit 2).

tests/data/asr_english.wav is held-out utterance 1 of data_pipelines/corpus/speech/eval.safetensors
("the ball is yellow.", en-gb-scotland), 22,050 Hz mono int16 as the corpus stores it.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from scipy.io import wavfile
from scipy.signal import resample_poly

from data_pipelines import audio
from data_pipelines.tokenizer import load_tokenizer
from stepaudio_jax import cli
from stepaudio_jax.data.templates import template_context
from stepaudio_jax.experiments.asr import greedy_transcripts
from stepaudio_jax.export.orbax_reader import load_run_config
from stepaudio_jax.export.score import load_lm
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training.trainer import train
from tests.conftest import REPO

CLIP = os.path.join(REPO, "tests", "data", "asr_english.wav")
CONFIG = os.path.join(REPO, "configs", "asr", "corpus.yaml")
NEW = 16


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  run = str(tmp_path_factory.mktemp("transcribe") / "run")
  train(load_config(CONFIG, [f"train.run_dir={run}", "train.steps=2", "train.batch_size=8",
                             "train.eval_every=0", "checkpoint.every=2"]),
        print_fn=lambda *a, **k: None)
  return run


@pytest.fixture(scope="module")
def stereo_44k(tmp_path_factory) -> str:
  """The clip at 44.1 kHz in two channels, the second quieter."""
  sr, pcm = wavfile.read(CLIP)
  up = resample_poly(pcm.astype(np.float32), 44_100 // sr, 1)
  path = str(tmp_path_factory.mktemp("stereo") / "clip_44k_stereo.wav")
  wavfile.write(path, 44_100, np.clip(np.stack([up, 0.8 * up], 1), -32768, 32767).astype(np.int16))
  return path


def _codes(tok, path: str):
  sr, pcm = wavfile.read(path)
  wave = audio.prepare(pcm, sr)
  return tok.linguistic(wave), tok.semantic(wave)


def test_the_config_names_the_committed_audio_tokenizer():
  cfg = load_config(CONFIG)
  assert cfg.data.audio_tokenizer == os.path.join(REPO, "data_pipelines", "corpus",
                                                  "audio_tokenizer.safetensors")
  assert cfg.data.shards["asr"] == [os.path.join(REPO, "data_pipelines", "corpus", "asr",
                                                 "train-*.array_record")]
  assert cfg.data.live_tasks() == ["asr"]


def test_transcribe_lines_and_json_are_the_shared_greedy_decoder(run_dir, stereo_44k, tmp_path):
  """In a one-device subprocess, as a user runs it; a relative and an absolute path."""
  out = str(tmp_path / "transcripts.json")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  rel = os.path.relpath(CLIP, REPO)
  proc = subprocess.run(
      [sys.executable, "-m", "stepaudio_jax.cli", "transcribe", run_dir, rel, stereo_44k,
       "--out", out, "--max-new-tokens", str(NEW)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]

  cfg = load_run_config(run_dir)
  tok = load_tokenizer(cfg.data.audio_tokenizer)
  lm, ctx = load_lm(run_dir), template_context(cfg.data, cfg.tokens, cfg.vision)
  want = greedy_transcripts(lm, ctx, [_codes(tok, CLIP), _codes(tok, stereo_44k)], NEW)
  # The two-step LM already answers codes in kind: the clip left at 22,050 Hz (not brought to
  # 16 kHz) reads otherwise, so equal transcripts mean equal codes and prompts.
  sr, pcm = wavfile.read(CLIP)
  unresampled = audio.prepare(pcm, audio.SAMPLE_RATE)
  assert greedy_transcripts(lm, ctx, [(tok.linguistic(unresampled), tok.semantic(unresampled)),
                                      _codes(tok, stereo_44k)], NEW)[0] != want[0]
  assert proc.stdout.splitlines() == [f"{rel}: {want[0]}", f"{stereo_44k}: {want[1]}"]
  with open(out) as f:
    assert json.load(f) == [{"audio": rel, "text": want[0]}, {"audio": stereo_44k,
                                                              "text": want[1]}]


def test_a_44k_stereo_copy_gives_the_same_codes(stereo_44k):
  tok = load_tokenizer(load_config(CONFIG).data.audio_tokenizer)
  for mono, stereo in zip(_codes(tok, CLIP), _codes(tok, stereo_44k)):
    assert len(mono) == len(stereo) > 30
    assert (mono != stereo).mean() <= 0.05


def _run_without_audio_tokenizer(run_dir: str, tmp_path) -> str:
  """The run's checkpoints under a config.yaml whose data.audio_tokenizer is empty."""
  copy = str(tmp_path / "no-audio-tokenizer")
  shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("run.lock"))
  path = os.path.join(copy, "config.yaml")
  with open(path) as f:
    written = yaml.safe_load(f)
  written["data"]["audio_tokenizer"] = ""
  with open(path, "w") as f:
    yaml.safe_dump(written, f, sort_keys=False)
  return copy


@pytest.mark.parametrize("case", ["missing wav", "not a wav", "no checkpoint",
                                  "no audio tokenizer"])
def test_bad_input_is_one_error_line(run_dir, tmp_path, capsys, case):
  run, clip = run_dir, CLIP
  if case == "missing wav":
    clip, named = str(tmp_path / "absent.wav"), str(tmp_path / "absent.wav")
  elif case == "not a wav":
    clip, named = os.path.join(REPO, "README.md"), "is not a WAV file"
  elif case == "no checkpoint":
    run, named = str(tmp_path), "neither a run directory"
  else:
    run, named = (_run_without_audio_tokenizer(run_dir, tmp_path),
                  "names no audio tokenizer (data.audio_tokenizer")
  assert cli.main(["transcribe", run, clip]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("stepaudio transcribe: error: ")
  assert named in lines[0]
