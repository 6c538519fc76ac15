"""Audio front end shared by every tokenizer: 16 kHz, mono, peak-normalised float32.

Both Step-Audio tokenizers expect 16 kHz input and the report peak-normalises audio, so this is
done once here, before any tokenizer sees a wave, whatever the source file's rate and channels.
"""

from math import gcd

import numpy as np
from scipy.signal import resample_poly

SAMPLE_RATE = 16_000
PEAK = 0.95  # headroom below full scale after normalisation


def to_float(pcm: np.ndarray) -> np.ndarray:
  """Integer or float PCM -> float32 in [-1, 1]."""
  if np.issubdtype(pcm.dtype, np.integer):
    return pcm.astype(np.float32) / float(np.iinfo(pcm.dtype).max + 1)
  return pcm.astype(np.float32)


def prepare(wave: np.ndarray, sample_rate: int) -> np.ndarray:
  """Any wave ([T] or [T, channels]) -> 16 kHz mono float32 with peak PEAK (silence stays 0)."""
  x = to_float(wave)
  if x.ndim == 2:
    x = x.mean(axis=1)
  if sample_rate != SAMPLE_RATE:
    g = gcd(SAMPLE_RATE, sample_rate)
    x = resample_poly(x, SAMPLE_RATE // g, sample_rate // g).astype(np.float32)
  peak = float(np.abs(x).max()) if x.size else 0.0
  return x * (PEAK / peak) if peak > 0 else x
