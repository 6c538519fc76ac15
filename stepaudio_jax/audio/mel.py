"""Log-mel spectrograms in JAX, HiFi-GAN / CosyVoice style, so the vocoder's mel loss runs
inside the jitted step and the flow model's targets are the same features.

Waves are reflect-padded by (n_fft - hop) / 2 on each side and framed without centring, so a
wave of T samples gives exactly T // hop frames (frame j covers samples [j*hop, j*hop + n_fft)
of the padded wave); periodic Hann window; magnitude sqrt(re^2 + im^2 + 1e-9); Slaney mel
filters (librosa's default); natural log of max(mel, floor).
"""

import functools

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from stepaudio_jax.config.speech import MelConfig


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
  """Slaney's scale: linear below 1 kHz, logarithmic above."""
  f = np.asarray(f, np.float64)
  lin = f / (200.0 / 3)
  return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27),
                  lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
  m = np.asarray(m, np.float64)
  return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27) * (m - 15.0)), m * 200.0 / 3)


@functools.lru_cache(maxsize=8)
def mel_filters(cfg: MelConfig) -> np.ndarray:
  """[n_fft // 2 + 1, n_mels] Slaney-normalised triangular filters."""
  freqs = np.linspace(0, cfg.sample_rate / 2, cfg.n_fft // 2 + 1)
  edges = _mel_to_hz(np.linspace(_hz_to_mel(cfg.fmin), _hz_to_mel(cfg.fmax), cfg.n_mels + 2))
  lower = (freqs[None] - edges[:-2, None]) / np.diff(edges)[:-1, None]
  upper = (edges[2:, None] - freqs[None]) / np.diff(edges)[1:, None]
  weights = np.maximum(0, np.minimum(lower, upper))
  weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
  return weights.T.astype(np.float32)


def hann(win: int, n_fft: int) -> np.ndarray:
  """Periodic Hann window of `win` samples centred in n_fft (torch.hann_window's default)."""
  w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
  left = (n_fft - win) // 2
  return np.pad(w, (left, n_fft - win - left)).astype(np.float32)


def magnitude(wave: Float[Array, "B T"], n_fft: int, hop: int, win: int
              ) -> Float[Array, "B F K"]:
  """|STFT| of reflect-padded, uncentred frames: F = T // hop frames, K = n_fft // 2 + 1 bins."""
  if wave.ndim != 2:
    raise ValueError(f"magnitude expects waves [B, T], got shape {wave.shape}")
  pad = (n_fft - hop) // 2
  if wave.shape[1] <= pad:
    raise ValueError(f"a wave of {wave.shape[1]} samples is too short to reflect-pad by {pad}")
  x = jnp.pad(wave, ((0, 0), (pad, pad)), mode="reflect")
  frames = wave.shape[1] // hop
  idx = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None]
  spec = jnp.fft.rfft(x[:, idx] * jnp.asarray(hann(win, n_fft))[None, None], axis=-1)
  return jnp.sqrt(spec.real**2 + spec.imag**2 + 1e-9)


def log_mel(wave: Float[Array, "B T"], cfg: MelConfig) -> Float[Array, "B F M"]:
  """Log-mel frames of a batch of waves at cfg.sample_rate: [B, T // hop, n_mels]."""
  mag = magnitude(wave, cfg.n_fft, cfg.hop, cfg.win)
  mel = jnp.einsum("bfk,km->bfm", mag, jnp.asarray(mel_filters(cfg)))
  return jnp.log(jnp.maximum(mel, cfg.floor))
