"""A stand-in for the 192-d x-vector CosyVoice conditions on, computed from the mel alone.

No speaker-verification network is trained here, so the speaker vector is a fixed Gaussian
projection (seed 0) of the utterance's mean and standard deviation of log-mel, L2-normalised:
it separates the corpus's espeak-ng voices (pitch and timbre move the mean spectrum) and is
defined for any prompt WAV at inference. Swap in a real x-vector by writing its 192 numbers.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float

from stepaudio_jax.audio.mel import log_mel
from stepaudio_jax.config.speech import MelConfig


def speaker_embedding(mel: Float[np.ndarray, "F M"], dim: int = 192) -> Float[np.ndarray, " E"]:
  """[frames, n_mels] log-mel of one utterance -> unit vector of `dim` numbers."""
  if mel.ndim != 2 or mel.shape[0] == 0:
    raise ValueError(f"speaker_embedding needs a non-empty [frames, n_mels] mel, got {mel.shape}")
  stats = np.concatenate([mel.mean(0), mel.std(0)]).astype(np.float64)
  proj = np.random.default_rng(0).standard_normal((stats.size, dim)) / np.sqrt(stats.size)
  v = (stats - stats.mean()) @ proj
  return (v / max(np.linalg.norm(v), 1e-12)).astype(np.float32)


def speaker_of(wave: Float[np.ndarray, " T"], mel: MelConfig, dim: int) -> Float[np.ndarray, " E"]:
  """The stand-in x-vector of one wave (padded to whole seconds, so few shapes compile)."""
  pad = -len(wave) % mel.sample_rate
  frames = np.asarray(jax.jit(log_mel, static_argnums=1)(
      jnp.asarray(np.pad(wave, (0, pad)))[None], mel))[0]
  return speaker_embedding(frames[:max(len(wave) // mel.hop, 1)], dim)
