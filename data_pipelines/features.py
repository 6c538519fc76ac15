"""Log-mel features in numpy, stacked to the token frame rate.

The report's tokenizers quantise 60 ms (linguistic) and 40 ms (semantic) frames. We compute a
10 ms-hop log-mel once and stack 6 or 4 consecutive frames, so the number of tokens is exactly
ceil(duration / frame) for every utterance; no torch or librosa is needed.
"""

import functools

import numpy as np

SAMPLE_RATE = 16_000
HOP = 160  # 10 ms
WIN = 400  # 25 ms
N_FFT = 512


def num_frames(n_samples: int, frame_ms: int) -> int:
  """Tokens an utterance of n_samples yields at one token per frame_ms (at least one)."""
  return max(1, -(-n_samples * 1000 // (SAMPLE_RATE * frame_ms)))


@functools.cache
def mel_filterbank(n_mels: int) -> np.ndarray:
  """HTK-style triangular filters, [N_FFT // 2 + 1, n_mels], 20 Hz to 8 kHz."""
  mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)
  hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)
  edges = hz(np.linspace(mel(20.0), mel(SAMPLE_RATE / 2), n_mels + 2))
  bins = np.fft.rfftfreq(N_FFT, 1.0 / SAMPLE_RATE)
  lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
  fb = np.maximum(0.0, np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)))
  return fb.T.astype(np.float32)


def log_mel(wave: np.ndarray, n_mels: int) -> np.ndarray:
  """[ceil(T / HOP), n_mels] log-mel energies of a 16 kHz wave (frames centred on hops)."""
  n = max(1, -(-len(wave) // HOP))
  padded = np.pad(wave.astype(np.float32), (WIN // 2, n * HOP + WIN // 2 - len(wave)))
  idx = np.arange(n)[:, None] * HOP + np.arange(WIN)[None, :]
  frames = padded[idx] * np.hanning(WIN).astype(np.float32)
  power = np.abs(np.fft.rfft(frames, N_FFT, axis=1)) ** 2
  return np.log(power @ mel_filterbank(n_mels) + 1e-6).astype(np.float32)


def stacked(wave: np.ndarray, n_mels: int, frame_ms: int) -> np.ndarray:
  """[num_frames(len(wave), frame_ms), n_mels * frame_ms / 10]: one row per token frame."""
  if frame_ms % 10:
    raise ValueError(f"frame_ms must be a multiple of the 10 ms hop, got {frame_ms}")
  k = frame_ms // 10
  m = log_mel(wave, n_mels)
  n = num_frames(len(wave), frame_ms)
  m = np.pad(m, ((0, n * k - len(m)), (0, 0)), mode="edge") if n * k > len(m) else m[: n * k]
  return m.reshape(n, k * n_mels)
