"""HiFi-GAN (Kong et al. 2020) generator and the two discriminators the vocoder trains against.

Axes in names: B batch, F mel frames, M mel bins, T samples, C channels.

Plain HiFi-GAN rather than HiFT: HiFT's neural source filter needs an F0 predictor trained on
F0 labels (a pitch tracker we do not have here) and an iSTFT head on top of the same upsampling
stack; HiFi-GAN is the same generator without those parts, so it trains from mel alone and each
piece can be checked against torch (export/torch_speech.py). Adding the NSF source is a change
to `Generator` only: the discriminators and losses are HiFT's.

  Generator: conv_pre (k7) -> per stage: leaky ReLU 0.1, transposed conv (x rate), mean of
  multi-receptive-field residual blocks -> leaky ReLU 0.01, conv_post (k7), tanh.
  MultiPeriod: one 2-D conv stack per period over the wave folded to [T / p, p].
  MultiResolution: one 2-D conv stack per (n_fft, hop, win) over |STFT| (UnivNet / HiFT).
Each discriminator returns its logits and the feature maps of every layer (feature matching).
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from stepaudio_jax.audio.mel import magnitude
from stepaudio_jax.config.speech import VocoderConfig
from stepaudio_jax.models.speech_layers import Conv1d, Conv2d, ConvTranspose1d

LRELU = 0.1


class ResBlock(nnx.Module):
  """HiFi-GAN's ResBlock1: per dilation d, x + conv(lrelu(conv_d(lrelu(x))))."""

  def __init__(self, channels: int, kernel: int, dilations: list[int], *, rngs: nnx.Rngs):
    self.convs1 = nnx.List([Conv1d(channels, channels, kernel, dilation=d, rngs=rngs)
                            for d in dilations])
    self.convs2 = nnx.List([Conv1d(channels, channels, kernel, rngs=rngs) for _ in dilations])

  def __call__(self, x: Float[Array, "B T C"]) -> Float[Array, "B T C"]:
    for c1, c2 in zip(self.convs1, self.convs2):
      x = x + c2(jax.nn.leaky_relu(c1(jax.nn.leaky_relu(x, LRELU)), LRELU))
    return x


class Generator(nnx.Module):
  def __init__(self, cfg: VocoderConfig, n_mels: int, *, rngs: nnx.Rngs):
    self.conv_pre = Conv1d(n_mels, cfg.channels, 7, rngs=rngs)
    self.ups, self.resblocks = nnx.List(), nnx.List()
    ch = cfg.channels
    for rate, kernel in zip(cfg.upsample_rates, cfg.upsample_kernels):
      self.ups.append(ConvTranspose1d(ch, ch // 2, kernel, rate, rngs=rngs))
      ch //= 2
      for k in cfg.resblock_kernels:
        self.resblocks.append(ResBlock(ch, k, cfg.resblock_dilations, rngs=rngs))
    self.conv_post = Conv1d(ch, 1, 7, rngs=rngs)
    self.kernels = len(cfg.resblock_kernels)

  def __call__(self, mel: Float[Array, "B F M"]) -> Float[Array, "B T"]:
    """Log-mel frames -> wave of F * prod(upsample_rates) samples in [-1, 1]."""
    x = self.conv_pre(mel)
    for i, up in enumerate(self.ups):
      x = up(jax.nn.leaky_relu(x, LRELU))
      blocks = self.resblocks[i * self.kernels:(i + 1) * self.kernels]
      x = sum(b(x) for b in blocks) / self.kernels
    return jnp.tanh(self.conv_post(jax.nn.leaky_relu(x, 0.01)))[:, :, 0]


def _conv_stack(convs, conv_post, x: Array) -> tuple[Array, list[Array]]:
  """A sub-discriminator's body: leaky-ReLU convs, then the score conv; returns the flattened
  scores and every layer's output (the feature-matching targets)."""
  fmaps = []
  for conv in convs:
    x = jax.nn.leaky_relu(conv(x), LRELU)
    fmaps.append(x)
  x = conv_post(x)
  fmaps.append(x)
  return x.reshape(x.shape[0], -1), fmaps


class PeriodDiscriminator(nnx.Module):
  def __init__(self, period: int, channels: list[int], *, rngs: nnx.Rngs):
    ins = [1] + channels
    self.convs = nnx.List([Conv2d(ins[i], ins[i + 1], (5, 1), stride=(3, 1), padding=(2, 0),
                                  rngs=rngs) for i in range(len(channels))])
    self.convs.append(Conv2d(channels[-1], channels[-1], (5, 1), padding=(2, 0), rngs=rngs))
    self.conv_post = Conv2d(channels[-1], 1, (3, 1), padding=(1, 0), rngs=rngs)
    self.period = period

  def __call__(self, wave: Float[Array, "B T"]) -> tuple[Array, list[Array]]:
    p = self.period
    x = jnp.pad(wave, ((0, 0), (0, -wave.shape[1] % p)), mode="reflect")
    return _conv_stack(self.convs, self.conv_post, x.reshape(x.shape[0], -1, p, 1))


class SpectrogramDiscriminator(nnx.Module):
  def __init__(self, resolution: list[int], channels: int, *, rngs: nnx.Rngs):
    self.convs = nnx.List([Conv2d(1, channels, (3, 9), padding=(1, 4), rngs=rngs)])
    for _ in range(3):
      self.convs.append(Conv2d(channels, channels, (3, 9), stride=(1, 2), padding=(1, 4),
                               rngs=rngs))
    self.convs.append(Conv2d(channels, channels, (3, 3), padding=(1, 1), rngs=rngs))
    self.conv_post = Conv2d(channels, 1, (3, 3), padding=(1, 1), rngs=rngs)
    self.resolution = tuple(resolution)

  def __call__(self, wave: Float[Array, "B T"]) -> tuple[Array, list[Array]]:
    x = magnitude(wave, *self.resolution)[..., None]  # [B, frames, bins, 1]
    return _conv_stack(self.convs, self.conv_post, x)


class Discriminators(nnx.Module):
  """Multi-period (cfg.periods) then multi-resolution (cfg.resolutions) sub-discriminators."""

  def __init__(self, cfg: VocoderConfig, *, rngs: nnx.Rngs):
    self.periods = nnx.List([PeriodDiscriminator(p, cfg.mpd_channels, rngs=rngs)
                             for p in cfg.periods])
    self.resolutions = nnx.List([SpectrogramDiscriminator(r, cfg.mrd_channels, rngs=rngs)
                                 for r in cfg.resolutions])

  def __call__(self, wave: Float[Array, "B T"]) -> list[tuple[Array, list[Array]]]:
    return [d(wave) for d in [*self.periods, *self.resolutions]]
