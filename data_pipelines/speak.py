"""Speech synthesis with espeak-ng: the corpus's only source of audio.

espeak-ng is small, deterministic and packaged by Debian, so anyone can regenerate the corpus
bit for bit; its voices cover English accents, Mandarin and Cantonese, and `-s` (words per
minute) and `-p` (pitch) give the speed levels and speaker variety the TTS tags describe.
"""

import dataclasses
import io
import shutil
import subprocess

import numpy as np
from scipy.io import wavfile

# Step-Audio's comparative speed tags (slow 2 .. fast 2) mapped to espeak-ng words per minute.
SPEEDS = {"slow 2": 105, "slow 1": 140, "normal": 175, "fast 1": 215, "fast 2": 260}
# The descriptive language/dialect tag each of our languages carries in TTS instructions.
LANGUAGE_TAGS = {"english": "English", "mandarin": "Chinese", "cantonese": "Cantonese"}


@dataclasses.dataclass(frozen=True)
class Voice:
  """One synthetic speaker: an espeak-ng voice, a variant (timbre) and a pitch."""

  voice: str
  variant: str
  pitch: int

  @property
  def name(self) -> str:
    return f"{self.voice}+{self.variant}@p{self.pitch}"


# Mandarin is spoken from pinyin (see grammar.py), Cantonese from characters.
VOICES = {
    "english": (Voice("en-us", "m3", 45), Voice("en-us", "f3", 60), Voice("en-gb", "m1", 40),
                Voice("en-gb", "f2", 65), Voice("en-gb-scotland", "m7", 50),
                Voice("en-us", "f5", 70)),
    "mandarin": (Voice("cmn-latn-pinyin", "m3", 45), Voice("cmn-latn-pinyin", "f3", 65),
                 Voice("cmn-latn-pinyin", "m1", 35), Voice("cmn-latn-pinyin", "f2", 60)),
    "cantonese": (Voice("yue", "m3", 45), Voice("yue", "f3", 65), Voice("yue", "f4", 55)),
}
# One more speaker per language that speaks only eval examples, so that "held out" means an
# unseen voice as well as an unseen sentence.
UNSEEN_VOICES = {"english": Voice("en-us-nyc", "m5", 52),
                 "mandarin": Voice("cmn-latn-pinyin", "m5", 50),
                 "cantonese": Voice("yue", "m1", 40)}


def available() -> bool:
  """Whether espeak-ng is on PATH (the committed corpus makes it optional elsewhere)."""
  return shutil.which("espeak-ng") is not None


def speak(text: str, voice: Voice, wpm: int) -> tuple[np.ndarray, int]:
  """Synthesise `text`; returns (float32 mono wave in [-1, 1], sample rate)."""
  cmd = ["espeak-ng", "-v", f"{voice.voice}+{voice.variant}", "-s", str(wpm),
         "-p", str(voice.pitch), "--stdout", text]
  wav = subprocess.run(cmd, check=True, capture_output=True).stdout
  # --stdout streams, so the RIFF sizes are placeholders; patch them before parsing.
  data_at = wav.find(b"data") + 8
  n = len(wav) - data_at
  fixed = (wav[:4] + (len(wav) - 8).to_bytes(4, "little") + wav[8:data_at - 4]
           + n.to_bytes(4, "little") + wav[data_at:])
  sr, pcm = wavfile.read(io.BytesIO(fixed))
  return pcm.astype(np.float32) / 32768.0, int(sr)
