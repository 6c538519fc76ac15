"""Speech-decoder sections: `mel` (features), `speech_data` (paired audio), `flow` (codes -> mel)
and `vocoder` (mel -> waveform). Defaults follow CosyVoice / HiFi-GAN (facts.md sections 3, 8);
configs/speech/*.yaml set the tiny CPU sizes."""

import dataclasses

from stepaudio_jax.config.fields import input_path
from stepaudio_jax.config.training import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class MelConfig:
  """Log-mel features shared by the flow model (its target) and the vocoder (its input)."""

  sample_rate: int = 22050
  n_fft: int = 1024
  hop: int = 256
  win: int = 1024
  n_mels: int = 80
  fmin: float = 0.0
  fmax: float = 8000.0
  floor: float = 1e-5  # log(max(magnitude, floor))

  def __post_init__(self):
    for name in ("sample_rate", "n_fft", "hop", "win", "n_mels"):
      if getattr(self, name) <= 0:
        raise ValueError(f"mel.{name} must be positive, got {getattr(self, name)}")
    if self.win > self.n_fft or (self.n_fft - self.hop) % 2:
      raise ValueError(f"need mel.win <= n_fft and n_fft - hop even (reflect padding of "
                       f"(n_fft - hop) / 2 each side), got win {self.win}, n_fft {self.n_fft}, "
                       f"hop {self.hop}")
    if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
      raise ValueError(f"need 0 <= mel.fmin < fmax <= sample_rate / 2, got {self.fmin}, "
                       f"{self.fmax}")


@dataclasses.dataclass(frozen=True)
class SpeechDataConfig:
  """Paired (codes, waveform) utterances written by data_pipelines/build_speech_pairs.py."""

  # The directory of train.safetensors and eval.safetensors, relative to the config file that
  # sets it (the committed set: data_pipelines/corpus/speech); the flow and vocoder need it.
  path: str = input_path(default="")
  max_codes: int = 240  # interleaved code ids per row (48 groups of 2 + 3 = 5.76 s)
  speaker_dim: int = 192  # the stand-in x-vector's size (audio/speaker.py)

  def __post_init__(self):
    if self.max_codes <= 0 or self.max_codes % 5:
      raise ValueError(f"speech_data.max_codes must be a positive multiple of 5 (2:3 groups), "
                       f"got {self.max_codes}")


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  """The `flow` task (tasks/flow.py, models/flow.py): codes -> mel by conditional OT-CFM."""

  vocab: int = 5120  # one stream: linguistic 0..1023, semantic 1024..5119
  embed_dim: int = 512
  encoder_layers: int = 6  # Conformer blocks
  encoder_heads: int = 8
  encoder_ffn: int = 2048
  encoder_kernel: int = 15  # depthwise convolution of the Conformer conv module
  dim: int = 512  # DiT estimator width
  depth: int = 12
  heads: int = 8
  ffn: int = 2048
  sigma_min: float = 1e-6
  cfg_drop: float = 0.2  # (mu, speaker, prompt) dropped together in training
  cfg_rate: float = 0.7  # w in (1 + w) * cond - w * uncond
  steps: int = 10  # Euler steps on t = 1 - cos(t * pi / 2)
  prompt_fraction: float = 0.3  # prompt = first randint(0, fraction * len) frames...
  prompt_prob: float = 0.5  # ...for this share of the samples
  mel_mean: float = -5.0  # the estimator works on (log-mel - mean) / std
  mel_std: float = 2.5
  optimizer: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(
      learning_rate=1e-3, end_learning_rate=1e-3, warmup_steps=2500, embed_lr_multiplier=1.0,
      weight_decay=0.0, b2=0.999, grad_clip_norm=5.0))

  def __post_init__(self):
    for name in ("vocab", "embed_dim", "encoder_layers", "encoder_heads", "encoder_ffn",
                 "encoder_kernel", "dim", "depth", "heads", "ffn", "steps"):
      if getattr(self, name) <= 0:
        raise ValueError(f"flow.{name} must be positive, got {getattr(self, name)}")
    if self.embed_dim % self.encoder_heads or self.dim % self.heads:
      raise ValueError("flow.embed_dim must divide by encoder_heads and flow.dim by heads")
    if self.encoder_kernel % 2 == 0:
      raise ValueError(f"flow.encoder_kernel must be odd, got {self.encoder_kernel}")
    for name in ("cfg_drop", "prompt_fraction", "prompt_prob"):
      if not 0 <= getattr(self, name) < 1:
        raise ValueError(f"flow.{name} must lie in [0, 1), got {getattr(self, name)}")
    if not 0 <= self.sigma_min < 1 or self.cfg_rate < 0 or self.mel_std <= 0:
      raise ValueError("need 0 <= flow.sigma_min < 1, cfg_rate >= 0, mel_std > 0")


@dataclasses.dataclass(frozen=True)
class VocoderConfig:
  """The `vocoder` task (tasks/vocoder.py, models/hifigan.py): HiFi-GAN v1 defaults."""

  channels: int = 512  # after conv_pre; halved at every upsampling
  upsample_rates: list[int] = dataclasses.field(default_factory=lambda: [8, 8, 2, 2])
  upsample_kernels: list[int] = dataclasses.field(default_factory=lambda: [16, 16, 4, 4])
  resblock_kernels: list[int] = dataclasses.field(default_factory=lambda: [3, 7, 11])
  resblock_dilations: list[int] = dataclasses.field(default_factory=lambda: [1, 3, 5])
  periods: list[int] = dataclasses.field(default_factory=lambda: [2, 3, 5, 7, 11])
  mpd_channels: list[int] = dataclasses.field(default_factory=lambda: [32, 128, 512, 1024])
  # multi-resolution spectrogram discriminator: (n_fft, hop, win) each
  resolutions: list[list[int]] = dataclasses.field(
      default_factory=lambda: [[1024, 120, 600], [2048, 240, 1200], [512, 50, 240]])
  mrd_channels: int = 32
  segment: int = 8192  # waveform samples per training row
  mel_weight: float = 45.0
  fm_weight: float = 2.0  # feature matching, applied once
  # Stop when the discriminator's loss passes this (LSGAN: a balanced D sits near 0.25 per
  # sub-discriminator; far above means it is diverging).
  d_loss_limit: float = 100.0
  generator_optimizer: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(
      learning_rate=2e-4, end_learning_rate=2e-4, embed_lr_multiplier=1.0, weight_decay=0.0,
      b1=0.8, b2=0.99, grad_clip_norm=0.0))
  discriminator_optimizer: OptimizerConfig = dataclasses.field(
      default_factory=lambda: OptimizerConfig(
          learning_rate=2e-4, end_learning_rate=2e-4, embed_lr_multiplier=1.0, weight_decay=0.0,
          b1=0.8, b2=0.99, grad_clip_norm=0.0))

  def __post_init__(self):
    if len(self.upsample_rates) != len(self.upsample_kernels):
      raise ValueError("vocoder.upsample_rates and upsample_kernels need one entry per stage")
    for r, k in zip(self.upsample_rates, self.upsample_kernels):
      if r <= 0 or k < r or (k - r) % 2:
        raise ValueError(f"vocoder upsampling kernel {k} for rate {r}: need k >= r, k - r even")
    if self.channels % 2 ** len(self.upsample_rates):
      raise ValueError("vocoder.channels must halve cleanly at every upsampling stage")
    if any(len(r) != 3 for r in self.resolutions):
      raise ValueError("vocoder.resolutions entries are [n_fft, hop, win]")
    if self.segment <= 0 or self.d_loss_limit <= 0:
      raise ValueError("vocoder.segment and d_loss_limit must be positive")

  @property
  def hop(self) -> int:
    """Samples per mel frame the generator produces (the product of its upsampling rates)."""
    out = 1
    for r in self.upsample_rates:
      out *= r
    return out
