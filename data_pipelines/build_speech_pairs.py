"""Paired (codes, 22,050 Hz waveform) utterances for the speech decoder's flow and vocoder.

The corpus's `tts` records hold codes only. espeak-ng is deterministic, so this regenerates each
record's speech from its metadata (speaker, speed, transcript) at espeak-ng's native 22,050 Hz,
re-tokenises it (16 kHz front end, the committed k-means tokenizer) and keeps the utterance
only when the codes equal the record's, so every pair is exactly what the corpus tokenized.
English and Cantonese are spoken from their transcripts; Mandarin was spoken from pinyin the
record does not keep, so it is skipped.

  python -m data_pipelines.build_speech_pairs --out data_pipelines/corpus/speech \
      --train-seconds 40 --eval-count 3          # the committed set (about 2.3 MB)
  python -m data_pipelines.build_speech_pairs --out runs/speech_data    # every usable record

Output: {train,eval}.safetensors with `wave` (int16, concatenated), `linguistic`, `semantic`
(int32, concatenated) and their `*_offsets` (int64, n + 1 each); the header's metadata holds
`sample_rate` and the JSON lists `speakers` and `transcripts`.
"""

import argparse
import glob
import json
import os

import numpy as np
from safetensors.numpy import save_file

from data_pipelines import audio, speak
from data_pipelines.kmeans_tokenizer import KMeansDualTokenizer
from stepaudio_jax.data import records

CORPUS = os.path.join(os.path.dirname(__file__), "corpus")
LANGUAGES = ("english", "cantonese")


def read_tts(split: str) -> list[records.Example]:
  from array_record.python import array_record_module  # heavy import, readers only

  out = []
  for path in sorted(glob.glob(os.path.join(CORPUS, "tts", f"{split}-*.array_record"))):
    reader = array_record_module.ArrayRecordReader(path)
    out += [records.decode(b) for b in reader.read(list(range(reader.num_records())))]
    reader.close()
  return out


def voice_of(name: str) -> speak.Voice:
  """'en-us+m3@p45' -> Voice('en-us', 'm3', 45)."""
  voice, rest = name.split("+")
  variant, pitch = rest.split("@p")
  return speak.Voice(voice, variant, int(pitch))


def regenerate(ex: records.Example, tok: KMeansDualTokenizer) -> np.ndarray | None:
  """The record's 22,050 Hz speech as int16, or None when its codes do not come back."""
  md = ex.metadata
  wave, sr = speak.speak(str(md["transcript"]), voice_of(str(md["speaker"])),
                         int(md["speed_wpm"]))
  if sr != 22050:
    raise RuntimeError(f"espeak-ng wrote {sr} Hz; this builder expects 22050")
  w16 = audio.prepare(wave, sr)
  if not (np.array_equal(tok.linguistic(w16), ex.linguistic[-1])
          and np.array_equal(tok.semantic(w16), ex.semantic[-1])):
    return None
  return np.round(wave * 32767).clip(-32768, 32767).astype(np.int16)


def _offsets(parts: list[np.ndarray]) -> np.ndarray:
  return np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)


def write(path: str, items: list[tuple[records.Example, np.ndarray]]) -> None:
  waves = [w for _, w in items]
  ling = [e.linguistic[-1].astype(np.int32) for e, _ in items]
  sem = [e.semantic[-1].astype(np.int32) for e, _ in items]
  save_file({"wave": np.concatenate(waves), "wave_offsets": _offsets(waves),
             "linguistic": np.concatenate(ling), "linguistic_offsets": _offsets(ling),
             "semantic": np.concatenate(sem), "semantic_offsets": _offsets(sem)}, path,
            metadata={"sample_rate": "22050",
                      "speakers": json.dumps([str(e.metadata["speaker"]) for e, _ in items]),
                      "transcripts": json.dumps([str(e.metadata["transcript"])
                                                 for e, _ in items], ensure_ascii=False)})


def build(out: str, train_seconds: float, eval_count: int) -> dict[str, int]:
  """Write the pairs; train takes the shortest utterances up to `train_seconds` (0 = all)."""
  if not speak.available():
    raise RuntimeError("espeak-ng is not on PATH: apt-get install -y espeak-ng")
  tok = KMeansDualTokenizer.load(os.path.join(CORPUS, "audio_tokenizer.safetensors"))
  os.makedirs(out, exist_ok=True)
  counts = {}
  for split in ("train", "eval"):
    exs = [e for e in read_tts(split) if e.metadata["language"] in LANGUAGES]
    if split == "train" and train_seconds:
      exs.sort(key=lambda e: float(e.metadata["duration_s"]))
    items, seconds = [], 0.0
    for ex in exs:
      if split == "train" and train_seconds and seconds >= train_seconds:
        break
      if split == "eval" and eval_count and len(items) >= eval_count:
        break
      wave = regenerate(ex, tok)
      if wave is not None:
        items.append((ex, wave))
        seconds += len(wave) / 22050
    write(os.path.join(out, f"{split}.safetensors"), items)
    counts[split] = len(items)
    print(f"{split}: {len(items)} utterances, {seconds:.1f} s of {len(exs)} candidates")
  return counts


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--train-seconds", type=float, default=0.0, help="0 = every usable record")
  p.add_argument("--eval-count", type=int, default=0, help="0 = every usable record")
  args = p.parse_args(argv)
  build(args.out, args.train_seconds, args.eval_count)


if __name__ == "__main__":
  main()
