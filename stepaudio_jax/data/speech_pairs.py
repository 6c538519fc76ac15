"""Paired speech (data_pipelines/build_speech_pairs.py) as batches for the flow and vocoder tasks.

One utterance = its codes as one stream (the report's 2:3 interleave, linguistic ids 0..1023,
semantic 1024..5119: `id - 65536` of the LM's audio tokens) and its 22,050 Hz wave cut to the
codes' span: G groups of 120 ms are G * 2646 samples, so codes and mel cover the same time and
length regulation is a plain interpolation. Rows are a pure function of (split, step, row), so a
resumed run sees the batches an uninterrupted one would and the source needs no saved state.
"""

import dataclasses
import json
import os

import numpy as np
from jaxtyping import Float, Int
from safetensors import safe_open

from stepaudio_jax.audio.codes import group_samples, interleave_codes
from stepaudio_jax.audio.speaker import speaker_of
from stepaudio_jax.config.speech import MelConfig
from stepaudio_jax.data.source import BatchSource, process_rows

@dataclasses.dataclass(frozen=True)
class Utterance:
  codes: Int[np.ndarray, " N"]  # N = 5 * groups
  wave: Float[np.ndarray, " T"]  # T = groups * group_samples
  speaker: Float[np.ndarray, " E"]  # unit vector (audio/speaker.py)
  name: str  # the espeak-ng voice
  text: str = ""  # the transcript


def split_file(directory: str, split: str) -> str:
  """{directory}/{split}.safetensors of speech_data.path."""
  if not directory:
    raise FileNotFoundError("speech_data.path is not set: point it at a directory holding "
                            "train.safetensors and eval.safetensors, e.g. the committed "
                            "data_pipelines/corpus/speech")
  return os.path.join(directory, f"{split}.safetensors")


def load_pairs(path: str, mel: MelConfig, speaker_dim: int) -> list[Utterance]:
  """Every utterance of one {train,eval}.safetensors file; speaker_dim 0 skips the speaker
  vectors (the vocoder needs none)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist; build it with python -m "
                            "data_pipelines.build_speech_pairs (see its docstring)")
  with safe_open(path, "np") as f:
    meta = f.metadata()
    t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
  if int(meta["sample_rate"]) != mel.sample_rate:
    raise ValueError(f"{path} holds {meta['sample_rate']} Hz audio; mel.sample_rate is "
                     f"{mel.sample_rate}")
  step = group_samples(mel.sample_rate)
  out = []
  texts = json.loads(meta.get("transcripts", "[]"))
  for i, name in enumerate(json.loads(meta["speakers"])):
    part = {k: t[k][t[k + "_offsets"][i]:t[k + "_offsets"][i + 1]]
            for k in ("linguistic", "semantic", "wave")}
    codes = interleave_codes(part["linguistic"], part["semantic"])
    wave = part["wave"].astype(np.float32) / 32768.0
    wave = np.pad(wave, (0, max(len(codes) // 5 * step - len(wave), 0)))[:len(codes) // 5 * step]
    spk = speaker_of(wave, mel, speaker_dim) if speaker_dim else np.zeros(0, np.float32)
    out.append(Utterance(codes, wave, spk, name, texts[i] if i < len(texts) else ""))
  return out


class FlowSource(BatchSource):
  """Rows of (codes, groups, wave, speaker): a random window of at most max_codes / 5 groups of
  a random utterance in training; eval walks the utterances in order from their start."""

  def __init__(self, utts: list[Utterance], global_batch: int, max_codes: int, sample_rate: int,
               train: bool, seed: int):
    self.utts, self.global_batch, self.train, self.seed = utts, global_batch, train, seed
    self.max_groups, self.step_samples, self.step = max_codes // 5, group_samples(sample_rate), 0

  def row(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    u = self.utts[rng.integers(len(self.utts)) if self.train else index % len(self.utts)]
    total = len(u.codes) // 5
    g = min(total, self.max_groups)
    g0 = int(rng.integers(total - g + 1)) if self.train else 0
    codes = np.zeros(self.max_groups * 5, np.int32)
    codes[:5 * g] = u.codes[5 * g0:5 * (g0 + g)]
    wave = np.zeros(self.max_groups * self.step_samples, np.float32)
    wave[:g * self.step_samples] = u.wave[g0 * self.step_samples:(g0 + g) * self.step_samples]
    return {"codes": codes, "groups": np.int32(g), "wave": wave, "speaker": u.speaker}

  def next_local(self):
    rows = [self.row(r + self.step * self.global_batch,
                     np.random.default_rng([self.seed, int(self.train), self.step, r]))
            for r in process_rows(self.global_batch)]
    self.step += 1
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def restore(self, step, state):
    self.step = step

  def restart(self, at_step):
    self.step = 0


class SegmentSource(FlowSource):
  """Vocoder rows: `segment` samples at a random offset of a random utterance (zero-padded
  when shorter); eval takes every utterance's first segment."""

  def __init__(self, utts: list[Utterance], global_batch: int, segment: int, train: bool,
               seed: int):
    self.utts, self.global_batch, self.train, self.seed = utts, global_batch, train, seed
    self.segment, self.step = segment, 0

  def row(self, index, rng):
    u = self.utts[rng.integers(len(self.utts)) if self.train else index % len(self.utts)]
    start = int(rng.integers(max(len(u.wave) - self.segment, 0) + 1)) if self.train else 0
    out = np.zeros(self.segment, np.float32)
    piece = u.wave[start:start + self.segment]
    out[:len(piece)] = piece
    return {"wave": out}
