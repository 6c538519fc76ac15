"""A small speech encoder trained with CTC on phonemes: log-mel at 10 ms -> hidden states at 60 ms.

Its states at one layer (`code_layer`) are what a k-means tokenizer quantises into linguistic
codes, as Step-Audio quantises Paraformer's encoder outputs: a phone-trained encoder keeps what
is said and drops who says it, which frame-level k-means on log-mel cannot.

Axes in names: B batch, T 10 ms mel frames, U 60 ms frames (U = ceil(T / 6)), S CTC symbols
(S = ctc_per_frame * U), M mel bins, D width, V phones (blank included at 0).

  CMVN per utterance over its valid frames (removes the speaker's and channel's spectral tilt)
  -> Conv1d stride 2 -> GELU -> Conv1d stride 3 -> GELU (30 ms, then 60 ms) -> + sinusoids
  -> `layers` bidirectional pre-norm transformer blocks (keys masked past each length)
  -> LayerNorm -> Linear to ctc_per_frame * V, read as ctc_per_frame symbols per 60 ms frame.
Several symbols per frame because fast speech has up to ~16 phones/s and CTC needs one symbol
per phone (and a blank between repeats), more than one per 16.7 Hz frame. Padded frames are
zeroed after every stage, so the states of the valid frames do not depend on the padding.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from stepaudio_jax.models.speech_layers import Attention, Conv1d, Dense, LayerNorm, sinusoid

SUBSAMPLING = 6  # 10 ms mel frames per 60 ms encoder frame (stride 2, then stride 3)


@dataclasses.dataclass(frozen=True)
class PhoneEncoderConfig:
  """The encoder's shape (`phone_ctc.encoder`); mel bins and phones come from the data file."""

  dim: int = 256
  layers: int = 4
  heads: int = 4
  ffn: int = 1024
  kernel: int = 5  # of both subsampling convolutions (odd)
  ctc_per_frame: int = 2  # CTC symbols per 60 ms frame (30 ms each)
  code_layer: int = 4  # the block (1..layers) whose output k-means quantises

  def __post_init__(self):
    for name in ("dim", "layers", "heads", "ffn", "kernel", "ctc_per_frame"):
      if getattr(self, name) <= 0:
        raise ValueError(f"phone_ctc.encoder.{name} must be positive, got {getattr(self, name)}")
    if self.dim % self.heads:
      raise ValueError(f"phone_ctc.encoder.dim={self.dim} must divide by heads={self.heads}")
    if self.kernel % 2 == 0:
      raise ValueError(f"phone_ctc.encoder.kernel must be odd, got {self.kernel}")
    if not 1 <= self.code_layer <= self.layers:
      raise ValueError(f"phone_ctc.encoder.code_layer={self.code_layer} must name a block "
                       f"1..layers={self.layers}")


def subsampled(frames: Int[Array, "*B"]) -> Int[Array, "*B"]:
  """60 ms frames of `frames` 10 ms frames: ceil(T / 2) then ceil(. / 3) = ceil(T / 6)."""
  return -(-(-(-frames // 2)) // 3)


def valid(lengths: Int[Array, " B"], size: int) -> Bool[Array, "B N"]:
  return jnp.arange(size)[None, :] < lengths[:, None]


def cmvn(mel: Float[Array, "B T M"], mask: Bool[Array, "B T"]) -> Float[Array, "B T M"]:
  """Per utterance and bin: zero mean, unit variance over the valid frames; padding is 0."""
  keep = mask[:, :, None].astype(mel.dtype)
  n = jnp.maximum(keep.sum(1, keepdims=True), 1.0)
  mean = (mel * keep).sum(1, keepdims=True) / n
  var = (((mel - mean) * keep) ** 2).sum(1, keepdims=True) / n
  return (mel - mean) * jax.lax.rsqrt(var + 1e-5) * keep


class Block(nnx.Module):
  """Pre-norm: x + attn(norm(x)), then x + ffn(norm(x)), over the valid frames."""

  def __init__(self, dim: int, heads: int, ffn: int, *, rngs: nnx.Rngs):
    self.norm_attn, self.attn = LayerNorm(dim), Attention(dim, heads, rngs=rngs)
    self.norm_ffn = LayerNorm(dim)
    self.up, self.down = Dense(dim, ffn, rngs=rngs), Dense(ffn, dim, rngs=rngs)

  def __call__(self, x: Float[Array, "B U D"], mask: Bool[Array, "B U"]) -> Float[Array, "B U D"]:
    x = x + self.attn(self.norm_attn(x), mask)
    x = x + self.down(jax.nn.gelu(self.up(self.norm_ffn(x))))
    return x * mask[:, :, None].astype(x.dtype)


class PhoneEncoder(nnx.Module):
  def __init__(self, cfg: PhoneEncoderConfig, n_mels: int, phones: int, *, rngs: nnx.Rngs):
    """`phones`: the inventory's size, blank included (CTC classes per symbol)."""
    self.cfg, self.n_mels, self.phones = cfg, n_mels, phones
    pad = cfg.kernel // 2
    self.conv1 = Conv1d(n_mels, cfg.dim, cfg.kernel, stride=2, padding=pad, rngs=rngs)
    self.conv2 = Conv1d(cfg.dim, cfg.dim, cfg.kernel, stride=3, padding=pad, rngs=rngs)
    self.blocks = nnx.List([Block(cfg.dim, cfg.heads, cfg.ffn, rngs=rngs)
                            for _ in range(cfg.layers)])
    self.norm = LayerNorm(cfg.dim)
    self.head = Dense(cfg.dim, cfg.ctc_per_frame * phones, rngs=rngs)

  def front(self, mel: Float[Array, "B T M"], frames: Int[Array, " B"]
            ) -> tuple[Float[Array, "B U D"], Bool[Array, "B U"]]:
    """Normalised, subsampled and position-coded input of the blocks, and its mask."""
    x = cmvn(mel, valid(frames, mel.shape[1]))
    x = jax.nn.gelu(self.conv1(x))
    x = x * valid(-(-frames // 2), x.shape[1])[:, :, None]
    x = jax.nn.gelu(self.conv2(x))
    mask = valid(subsampled(frames), x.shape[1])
    x = x + sinusoid(jnp.arange(x.shape[1], dtype=jnp.float32), self.cfg.dim, 1.0)[None]
    return x * mask[:, :, None], mask

  def states(self, mel: Float[Array, "B T M"], frames: Int[Array, " B"], layer: int | None = None
             ) -> tuple[Float[Array, "B U D"], Bool[Array, "B U"]]:
    """The output of block `layer` (default code_layer) at 60 ms, zero past each length."""
    x, mask = self.front(mel, frames)
    for block in list(self.blocks)[:self.cfg.code_layer if layer is None else layer]:
      x = block(x, mask)
    return x, mask

  def __call__(self, mel: Float[Array, "B T M"], frames: Int[Array, " B"]
               ) -> tuple[Float[Array, "B S V"], Bool[Array, "B S"]]:
    """CTC log-probabilities, ctc_per_frame symbols per 60 ms frame, and their mask."""
    x, mask = self.states(mel, frames, self.cfg.layers)
    b, u, _ = x.shape
    logits = self.head(self.norm(x)).reshape(b, u * self.cfg.ctc_per_frame, self.phones)
    return jax.nn.log_softmax(logits, -1), jnp.repeat(mask, self.cfg.ctc_per_frame, axis=1)


@nnx.jit
def _states(model: PhoneEncoder, mel: Float[Array, "1 T M"], frames: Int[Array, " 1"]
            ) -> Float[Array, "1 U D"]:
  return model.states(mel, frames)[0]


def bucket(frames: int, smallest: int = 64) -> int:
  """The padded length for `frames`: the next power of two, so lengths share few compiles."""
  return max(smallest, 1 << max(frames - 1, 0).bit_length())


def encoder_states(model: PhoneEncoder, mel: Float[np.ndarray, "T M"]) -> Float[np.ndarray, "U D"]:
  """One utterance's code_layer states, [ceil(T / 6), D]: the vectors k-means quantises."""
  mel = np.asarray(mel, np.float32)
  t = len(mel)
  padded = np.zeros((1, bucket(t), mel.shape[1]), np.float32)
  padded[0, :t] = mel
  out = _states(model, jnp.asarray(padded), jnp.asarray([t], jnp.int32))
  return np.asarray(out[0, :-(-t // SUBSAMPLING)])
