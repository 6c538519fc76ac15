"""Log-mel features against librosa and torch.stft (references we did not write)."""

import jax.numpy as jnp
import librosa
import numpy as np
import pytest
import torch

from stepaudio_jax.audio.mel import log_mel, magnitude, mel_filters
from stepaudio_jax.audio.speaker import speaker_embedding
from stepaudio_jax.config.speech import MelConfig

CFG = MelConfig()


def _wave(n=22050, seed=0):
  rng = np.random.default_rng(seed)
  t = np.arange(n) / CFG.sample_rate
  return (0.5 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)
          + 0.05 * rng.standard_normal(n)).astype(np.float32)


def test_filters_equal_librosa_slaney():
  ref = librosa.filters.mel(sr=CFG.sample_rate, n_fft=CFG.n_fft, n_mels=CFG.n_mels,
                            fmin=CFG.fmin, fmax=CFG.fmax)
  np.testing.assert_allclose(mel_filters(CFG), ref.T, atol=1e-6)


def test_magnitude_equals_torch_stft():
  x = _wave()
  pad = (CFG.n_fft - CFG.hop) // 2
  xt = torch.nn.functional.pad(torch.from_numpy(x)[None, None], (pad, pad), mode="reflect")[0]
  ref = torch.stft(xt, CFG.n_fft, CFG.hop, CFG.win, window=torch.hann_window(CFG.win),
                   center=False, return_complex=True).abs()[0].T.numpy()
  got = np.asarray(magnitude(jnp.asarray(x)[None], CFG.n_fft, CFG.hop, CFG.win))[0]
  assert got.shape == (len(x) // CFG.hop, CFG.n_fft // 2 + 1) == ref.shape
  np.testing.assert_allclose(got, ref, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("cfg", [CFG, MelConfig(sample_rate=16000, n_fft=512, hop=128, win=400,
                                                n_mels=40, fmin=50.0, fmax=7600.0)])
def test_log_mel_equals_librosa(cfg):
  x = _wave(12345, seed=1)
  pad = (cfg.n_fft - cfg.hop) // 2
  ref = librosa.feature.melspectrogram(
      y=np.pad(x, pad, mode="reflect"), sr=cfg.sample_rate, n_fft=cfg.n_fft,
      hop_length=cfg.hop, win_length=cfg.win, window="hann", center=False, power=1.0,
      n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax)
  ref = np.log(np.maximum(ref, cfg.floor)).T
  got = np.asarray(log_mel(jnp.asarray(x)[None], cfg))[0]
  assert got.shape == ref.shape == (len(x) // cfg.hop, cfg.n_mels)
  loud = ref > np.log(1e-3)  # the sqrt's 1e-9 only moves near-silent bins
  np.testing.assert_allclose(got[loud], ref[loud], atol=2e-3)


def test_bad_input_is_a_clear_error():
  with pytest.raises(ValueError, match="waves"):
    log_mel(jnp.zeros(4096), CFG)
  with pytest.raises(ValueError, match="fmax"):
    MelConfig(fmax=12000.0)


def test_speaker_embedding_is_unit_and_separates_pitch():
  mel = lambda f: np.asarray(log_mel(jnp.asarray(
      np.sin(2 * np.pi * f * np.arange(22050) / 22050, dtype=np.float32))[None], CFG))[0]
  a, b, c = speaker_embedding(mel(200)), speaker_embedding(mel(205)), speaker_embedding(mel(900))
  assert a.shape == (192,) and np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5)
  assert a @ b > a @ c
