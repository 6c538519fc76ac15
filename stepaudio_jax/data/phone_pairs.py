"""(log-mel, phones) utterances for the phone CTC encoder: the file format, its writer, its reader
and the batches of the `phone_ctc` task.

File `{train,eval}.safetensors`, tensors concatenated over utterances with offsets [n + 1]:
  mel float16 [sum of frames, n_mels] (data_pipelines.features.log_mel: 16 kHz, 10 ms hop),
  mel_offsets int64, phones int32 (ids >= 1; 0 is the CTC blank), phone_offsets int64;
metadata (strings): n_mels, hop_ms ("10"), phones (JSON inventory, index 0 "<blank>"), and the
JSON lists speakers, languages, transcripts (one per utterance).

Rows are a pure function of (seed, split, step, row), so a resumed run sees the batches an
uninterrupted one would and the source needs no saved state.
"""

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.numpy import save_file

from stepaudio_jax.config import ConfigError
from stepaudio_jax.data.source import BatchSource, process_rows

BLANK = "<blank>"
HOP_MS = 10


@dataclasses.dataclass(frozen=True)
class PhoneSet:
  """One file's utterances, kept concatenated (float16 mel, as stored)."""

  mel: Float[np.ndarray, "F M"]
  mel_offsets: Int[np.ndarray, " N1"]
  phones: Int[np.ndarray, " P"]
  phone_offsets: Int[np.ndarray, " N1"]
  inventory: list[str]
  speakers: list[str]
  languages: list[str]
  transcripts: list[str]

  def __len__(self) -> int:
    return len(self.mel_offsets) - 1

  @property
  def n_mels(self) -> int:
    return self.mel.shape[1]

  @property
  def frames(self) -> Int[np.ndarray, " N"]:
    return np.diff(self.mel_offsets)

  @property
  def phone_counts(self) -> Int[np.ndarray, " N"]:
    return np.diff(self.phone_offsets)

  def utterance(self, i: int) -> tuple[Float[np.ndarray, "T M"], Int[np.ndarray, " L"]]:
    return (self.mel[self.mel_offsets[i]:self.mel_offsets[i + 1]],
            self.phones[self.phone_offsets[i]:self.phone_offsets[i + 1]])


def write_phone_file(path: str, mels: Sequence[np.ndarray], phones: Sequence[Sequence[int]],
                     inventory: Sequence[str], speakers: Sequence[str],
                     languages: Sequence[str], transcripts: Sequence[str]) -> None:
  """Write utterances (mel [T, n_mels] each, phone ids >= 1 each) as one phone file."""
  n = len(mels)
  if not n or not len(phones) == len(speakers) == len(languages) == len(transcripts) == n:
    raise ValueError(f"write_phone_file: need one phone list, speaker, language and transcript "
                     f"per mel ({n} mels, {len(phones)} phone lists, {len(speakers)} speakers, "
                     f"{len(languages)} languages, {len(transcripts)} transcripts)")
  if not inventory or inventory[0] != BLANK:
    raise ValueError(f"write_phone_file: inventory[0] must be {BLANK!r} (the CTC blank)")
  n_mels = mels[0].shape[1]
  ids = [np.asarray(p, np.int32) for p in phones]
  for i, (m, p) in enumerate(zip(mels, ids)):
    if m.ndim != 2 or m.shape[1] != n_mels or not len(m):
      raise ValueError(f"write_phone_file: utterance {i}: mel of shape {m.shape}, want "
                       f"[frames > 0, {n_mels}]")
    if not len(p) or p.min() < 1 or p.max() >= len(inventory):
      raise ValueError(f"write_phone_file: utterance {i}: phone ids must lie in "
                       f"1..{len(inventory) - 1} (0 is the blank), and there must be some")
  offsets = lambda xs: np.concatenate([[0], np.cumsum([len(x) for x in xs])]).astype(np.int64)
  tensors = {"mel": np.concatenate(mels).astype(np.float16), "mel_offsets": offsets(mels),
             "phones": np.concatenate(ids), "phone_offsets": offsets(ids)}
  meta = {"n_mels": str(n_mels), "hop_ms": str(HOP_MS), "phones": json.dumps(list(inventory)),
          "speakers": json.dumps(list(speakers)), "languages": json.dumps(list(languages)),
          "transcripts": json.dumps(list(transcripts), ensure_ascii=False)}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file(tensors, path, metadata=meta)


def _missing(path: str, key: str) -> ConfigError:
  return ConfigError(f"{key}={path!r} does not exist; build it with the corpus builder "
                     f"(runs/corpus_build/phones) or point {key} at a phone file")


def read_metadata(path: str, key: str) -> dict[str, str]:
  """The file's metadata alone (cheap: the models are sized from it before any data is read)."""
  if not path or not os.path.isfile(path):
    raise _missing(path, key)
  with safe_open(path, "np") as f:
    meta = f.metadata() or {}
  if "phones" not in meta or "n_mels" not in meta:
    raise ConfigError(f"{key}={path!r} is no phone file (its metadata lacks phones/n_mels)")
  if meta.get("hop_ms", str(HOP_MS)) != str(HOP_MS):
    raise ConfigError(f"{key}={path!r} has a {meta['hop_ms']} ms hop; the encoder takes "
                      f"{HOP_MS} ms log-mel frames")
  return meta


def read_phone_file(path: str, key: str = "phone_ctc.train_path") -> PhoneSet:
  """Every utterance of a phone file; `key` names the setting in errors."""
  meta = read_metadata(path, key)
  with safe_open(path, "np") as f:
    t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
  lists = {k: json.loads(meta.get(k, "[]")) for k in ("speakers", "languages", "transcripts")}
  return PhoneSet(t["mel"], t["mel_offsets"], t["phones"], t["phone_offsets"],
                  json.loads(meta["phones"]), **lists)


def check_fits(data: PhoneSet, max_frames: int, max_phones: int, ctc_per_frame: int,
               key: str) -> None:
  """Refuse utterances longer than a row, or with more phones than CTC can emit, in one line."""
  frames, counts = data.frames, data.phone_counts
  if frames.max() > max_frames:
    raise ConfigError(f"{key}: {int((frames > max_frames).sum())} of {len(data)} utterances "
                      f"have more than phone_ctc.max_frames={max_frames} mel frames (the longest "
                      f"{int(frames.max())}); raise phone_ctc.max_frames to {int(frames.max())}")
  if counts.max() > max_phones:
    raise ConfigError(f"{key}: {int((counts > max_phones).sum())} utterances have more than "
                      f"phone_ctc.max_phones={max_phones} phones; raise phone_ctc.max_phones to "
                      f"{int(counts.max())}")
  symbols = ctc_per_frame * -(-frames // 6)
  need = np.array([len(p) + int(np.sum(p[1:] == p[:-1]))
                   for p in np.split(data.phones, data.phone_offsets[1:-1])])
  bad = np.flatnonzero(need > symbols)
  if len(bad):
    i = int(bad[0])
    raise ConfigError(f"{key}: {len(bad)} utterances have more phones (and repeats) than "
                      f"phone_ctc.encoder.ctc_per_frame={ctc_per_frame} CTC symbols per 60 ms "
                      f"frame can emit (utterance {i}: {need[i]} in {symbols[i]} symbols); "
                      f"raise phone_ctc.encoder.ctc_per_frame")


class PhoneSource(BatchSource):
  """Rows of (mel, frames, phones, n_phones), padded to max_frames / max_phones. Training walks
  a fresh permutation of the utterances every epoch; eval takes them in order, and rows past
  the last are empty (frames 0), so each eval utterance counts once."""

  def __init__(self, data: PhoneSet, global_batch: int, max_frames: int, max_phones: int,
               train: bool, seed: int):
    self.data, self.global_batch, self.train, self.seed = data, global_batch, train, seed
    self.max_frames, self.max_phones, self.step = max_frames, max_phones, 0
    self._order: tuple[int, np.ndarray] | None = None

  def _utterance(self, index: int) -> int | None:
    n = len(self.data)
    if not self.train:
      return index if index < n else None
    epoch = index // n
    if self._order is None or self._order[0] != epoch:
      self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
    return int(self._order[1][index % n])

  def row(self, index: int) -> dict[str, np.ndarray]:
    mel = np.zeros((self.max_frames, self.data.n_mels), np.float32)
    phones = np.zeros(self.max_phones, np.int32)
    i = self._utterance(index)
    if i is None:
      return {"mel": mel, "frames": np.int32(0), "phones": phones, "n_phones": np.int32(0)}
    m, p = self.data.utterance(i)
    mel[:len(m)], phones[:len(p)] = m, p
    return {"mel": mel, "frames": np.int32(len(m)), "phones": phones,
            "n_phones": np.int32(len(p))}

  def next_local(self):
    rows = [self.row(r + self.step * self.global_batch) for r in process_rows(self.global_batch)]
    self.step += 1
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def restore(self, step, state):
    self.step = step

  def restart(self, at_step):
    self.step = 0
