"""Listening to speech with evaluators this project did not write (the `eval` extra).

- Words: pocketsphinx 5 with its bundled en-us acoustic model, decoding against a JSGF grammar
  of the corpus's English sentence forms (every number, object, colour and owner in every slot
  of data_pipelines/grammar.py, not a list of the corpus sentences, so a wrong number is a
  word error), scored against the transcript by jiwer: word error rate (WER). pocketsphinx's
  general language model cannot read espeak-ng speech at all; the grammar makes it a usable
  recogniser here. English only; a fixed noise floor is added first (DITHER).
- Intelligibility: STOI (pystoi) of a wave against the original recording of the same
  utterance, both cut to the shorter.
- Voice: resemblyzer's pretrained d-vector encoder (its weights ship in the wheel), cosine of
  unit embeddings: a wave against the original of the same utterance.
"""

import dataclasses
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from math import gcd

import numpy as np
from jaxtyping import Float
from scipy.signal import resample_poly

from data_pipelines import grammar

RATE = 16000  # what pocketsphinx's en-us model and resemblyzer take
PAD = 0.5  # seconds of silence around an utterance: espeak-ng stops on its last phone
# A fixed noise floor (1% of full scale, seeded) under what pocketsphinx hears: on exact digital
# silence its noise estimate fails (held-out espeak originals: WER 0.59 without, 0.08 with).
DITHER = 1e-2


def corpus_grammar() -> str:
  """JSGF of the English sentence forms (statements and questions, one or more per clip)."""
  def alt(words):
    return " | ".join(sorted({w.lower() for w in words}))

  number = alt(n[0] for n in grammar.NUMBERS)
  obj, colour = alt(o[0] for o in grammar.OBJECTS), alt(c[0] for c in grammar.COLOURS)
  owner, op = alt(o[0] for o in grammar.OWNERS), alt(grammar.OPS)
  return f"""#JSGF V1.0;
grammar corpus;
<number> = {number};
<object> = {obj};
<colour> = {colour};
<owner> = {owner};
<op> = {op};
<sentence> = <number> <op> <number> is <number> | what is <number> <op> <number>
  | the <object> is <colour> | what colour is the <object>
  | the <object> belongs to <owner> | who owns the <object>;
public <utterance> = <sentence>+;
"""


def normalise(text: str) -> str:
  """Lower case, words only: how the grammar's output and a transcript compare."""
  return " ".join(re.findall(r"[a-z]+", text.lower()))


def resample(wave: Float[np.ndarray, " T"], rate: int, to: int = RATE) -> np.ndarray:
  g = gcd(rate, to)
  return resample_poly(np.asarray(wave, np.float64), to // g, rate // g)


class Listener:
  """The recogniser and the speaker encoder, loaded once."""

  def __init__(self):
    try:
      from pocketsphinx import Decoder
      with warnings.catch_warnings():  # webrtcvad (resemblyzer's VAD) imports pkg_resources
        warnings.simplefilter("ignore")
        from resemblyzer import VoiceEncoder
    except ImportError as e:
      raise ImportError(f"listening needs the eval extra: pip install -e '.[eval]' ({e})") from e
    with tempfile.NamedTemporaryFile("w", suffix=".jsgf", delete=False) as f:
      f.write(corpus_grammar())
    try:
      self._decoder = Decoder(jsgf=f.name, loglevel="FATAL")
    finally:
      os.remove(f.name)
    self._encoder = VoiceEncoder("cpu", verbose=False)

  def transcribe(self, wave: Float[np.ndarray, " T"], rate: int) -> str:
    x = resample(wave, rate)
    x = np.pad(x, (int(PAD * RATE),) * 2)
    x = x + DITHER * np.random.default_rng(0).standard_normal(len(x))
    pcm = (np.clip(x, -1, 1) * 32767).astype(np.int16)
    d = self._decoder
    d.start_utt()
    d.process_raw(pcm.tobytes(), full_utt=True)
    d.end_utt()
    return d.hyp().hypstr if d.hyp() is not None else ""

  def voice(self, wave: Float[np.ndarray, " T"], rate: int) -> Float[np.ndarray, " E"]:
    """resemblyzer's unit d-vector of the whole utterance."""
    from resemblyzer import preprocess_wav

    e = self._encoder.embed_utterance(preprocess_wav(resample(wave, rate).astype(np.float32),
                                                     RATE))
    return e / np.linalg.norm(e)


def stoi(reference: np.ndarray, degraded: np.ndarray, rate: int) -> float:
  from pystoi import stoi as _stoi

  n = min(len(reference), len(degraded))
  return float(_stoi(np.asarray(reference[:n], np.float64), np.asarray(degraded[:n], np.float64),
                     rate, extended=False))


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
  import jiwer

  return float(jiwer.wer([normalise(r) for r in references],
                         [normalise(h) or "<nothing>" for h in hypotheses]))


@dataclasses.dataclass(frozen=True)
class Clip:
  """One utterance to score: its transcript, its original recording and its voice."""

  text: str
  original: np.ndarray
  english: bool


def listen(listener: Listener, clips: Sequence[Clip], waves: Sequence[np.ndarray], rate: int,
           originals: Sequence[np.ndarray] | None = None) -> dict[str, float]:
  """WER (English clips), STOI and speaker cosine against the originals, and the duration
  ratio, of `waves` (one per clip); `originals` stand in for the clips' own when given."""
  originals = originals or [c.original for c in clips]
  english = [i for i, c in enumerate(clips) if c.english]
  hyps = [listener.transcribe(waves[i], rate) for i in english]
  return {
      "wer": wer([clips[i].text for i in english], hyps) if english else float("nan"),
      "stoi": float(np.mean([stoi(o, w, rate) for o, w in zip(originals, waves)])),
      "speaker_cos": float(np.mean([listener.voice(o, rate) @ listener.voice(w, rate)
                                    for o, w in zip(originals, waves)])),
      "duration_ratio": float(np.mean([len(w) / len(o) for o, w in zip(originals, waves)])),
      "clips": len(waves), "english_clips": len(english),
  }


def voice_matrix(listener: Listener, waves: dict[str, list[np.ndarray]], rate: int
                 ) -> dict[str, dict[str, float]]:
  """Mean speaker cosine between the clips of every two voices (the diagonal: between different
  clips of one voice), so how well the encoder tells the corpus's voices apart is on record."""
  emb = {v: [listener.voice(w, rate) for w in ws] for v, ws in waves.items()}
  out: dict[str, dict[str, float]] = {}
  for a, ea in emb.items():
    out[a] = {}
    for b, eb in emb.items():
      sims = [x @ y for i, x in enumerate(ea) for j, y in enumerate(eb) if a != b or i < j]
      out[a][b] = float(np.mean(sims)) if sims else float("nan")
  return out


def table(rows: dict[str, dict[str, float]]) -> str:
  """The markdown table of `listen` results by row name."""
  lines = ["| audio | WER | STOI | speaker cos | duration ratio |", "|---|---|---|---|---|"]
  for name, r in rows.items():
    lines.append(f"| {name} | {r['wer']:.2f} | {r['stoi']:.2f} | {r['speaker_cos']:.2f} | "
                 f"{r['duration_ratio']:.2f} |")
  return "\n".join(lines)
