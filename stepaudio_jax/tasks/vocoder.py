"""GAN vocoder (HiFi-GAN generator, multi-period + multi-resolution spectrogram discriminators).

Two models, `generator` and `discriminator`, each with its own optimizer (vocoder.*_optimizer:
learning rates and betas), and two updates in every jitted step, in this order:
  1. discriminator: LSGAN, sum over sub-discriminators of mean((1 - D(y))^2) + mean(D(G(x))^2),
     with G(x) from the generator as it is before this step (no gradient to it);
  2. generator, against the discriminator just updated: LSGAN sum of mean((1 - D(G(x)))^2)
     + fm_weight (2, applied once) x sum over every feature map of mean|D_l(y) - D_l(G(x))|
     + mel_weight (45) x mean|mel(G(x)) - mel(y)|.
x = log-mel of the real segment y (audio/mel.py, the flow model's features), computed in the
step. Each row is `vocoder.segment` samples of real speech (data/speech_pairs.py SegmentSource),
zero-padded past an utterance's end: a segment longer than every training utterance (rows that
are mostly padding) is refused at start, naming the longest; one longer than most of them is
warned about once.

Each update is named for the model it trains, and its metrics (`discriminator/...`,
`generator/...`: the loss and its terms per row) follow from that name.

Divergence guard (`stop_reason`): a step whose `discriminator/loss` passes vocoder.d_loss_limit
stops the run there, before it is checkpointed, saying which optimizer to change.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np

from stepaudio_jax.audio.mel import log_mel
from stepaudio_jax.config import ConfigError
from stepaudio_jax.config.speech import MelConfig, SpeechDataConfig, VocoderConfig
from stepaudio_jax.data.speech_pairs import SegmentSource, load_pairs, split_file
from stepaudio_jax.models.hifigan import Discriminators, Generator
from stepaudio_jax.tasks.base import BatchField, Deliverable, Model, Split, Task, Update

log = logging.getLogger(__name__)


def discriminator_loss(real: list, fake: list) -> jax.Array:
  """LSGAN: real logits towards 1, generated towards 0, summed over sub-discriminators."""
  return sum(jnp.mean((1 - r[0]) ** 2) + jnp.mean(f[0] ** 2) for r, f in zip(real, fake))


def generator_losses(real: list, fake: list) -> tuple[jax.Array, jax.Array]:
  """(LSGAN adversarial, feature matching): generated logits towards 1; |feature differences|
  averaged per map, summed over maps and sub-discriminators."""
  adv = sum(jnp.mean((1 - f[0]) ** 2) for f in fake)
  fm = sum(jnp.mean(jnp.abs(jax.lax.stop_gradient(a) - b))
           for r, f in zip(real, fake) for a, b in zip(r[1], f[1]))
  return adv, fm


class VocoderTask(Task):
  progress_keys = ("generator/mel_l1", "discriminator/loss", "generator/loss")
  throughput_unit = "samples"
  # What each update's loss reports besides its total (`<term>_sum`), by the update's name.
  TERMS = {"discriminator": (), "generator": ("adv", "fm", "mel_l1")}

  sections = {"mel": MelConfig, "speech_data": SpeechDataConfig, "vocoder": VocoderConfig}
  deliverables = {"generator": Deliverable("generator", "vocoder")}
  optimizer_keys = ("vocoder.generator_optimizer", "vocoder.discriminator_optimizer")

  @classmethod
  def check_config(cls, cfg):
    if cfg.vocoder.hop != cfg.mel.hop:
      raise ValueError(f"vocoder.upsample_rates multiply to {cfg.vocoder.hop} samples per "
                       f"frame but mel.hop is {cfg.mel.hop}; they must be equal")
    segment, hop = cfg.vocoder.segment, cfg.mel.hop
    if segment % hop:
      raise ValueError(f"vocoder.segment={segment} must be a multiple of mel.hop={hop}, e.g. "
                       f"{max(round(segment / hop), 1) * hop}")

  def __init__(self, cfg, shard):
    super().__init__(cfg, shard)
    self._utts = {}

  def models(self) -> dict[str, Model]:
    c = self.cfg
    return {
        "generator": Model(lambda rngs: Generator(c.vocoder, c.mel.n_mels, rngs=rngs),
                           optimizer=c.vocoder.generator_optimizer),
        "discriminator": Model(lambda rngs: Discriminators(c.vocoder, rngs=rngs),
                               optimizer=c.vocoder.discriminator_optimizer),
    }

  def batch_fields(self) -> dict[str, BatchField]:
    return {"wave": BatchField((self.cfg.train.batch_size, self.cfg.vocoder.segment), np.float32,
                               ("act_batch", None))}

  def _generate(self, params, frozen, batch):
    mel = log_mel(batch["wave"], self.cfg.mel)
    return mel, self.merge("generator", params, frozen)(mel)

  def d_loss(self, params, frozen, batch, rng):
    _, fake = self._generate(params, frozen, batch)
    disc = self.merge("discriminator", params, frozen)
    loss = discriminator_loss(disc(batch["wave"]), disc(jax.lax.stop_gradient(fake)))
    rows = jnp.float32(batch["wave"].shape[0])
    return loss * rows, {"loss_sum": loss * rows, "rows": rows}

  def g_loss(self, params, frozen, batch, rng):
    vc = self.cfg.vocoder
    mel, fake = self._generate(params, frozen, batch)
    disc = self.merge("discriminator", params, frozen)
    adv, fm = generator_losses(disc(batch["wave"]), disc(fake))
    mel_l1 = jnp.mean(jnp.abs(log_mel(fake, self.cfg.mel) - mel))
    loss = adv + vc.fm_weight * fm + vc.mel_weight * mel_l1
    rows = jnp.float32(batch["wave"].shape[0])
    return loss * rows, {"loss_sum": loss * rows, "rows": rows, "adv_sum": adv * rows,
                         "fm_sum": fm * rows, "mel_l1_sum": mel_l1 * rows}

  def updates(self) -> tuple[Update, ...]:
    """The discriminator, then the generator against it: each named for its one model."""
    return tuple(Update((name,), loss, name, "rows")
                 for name, loss in (("discriminator", self.d_loss), ("generator", self.g_loss)))

  def _update(self, name: str) -> Update:
    return next(u for u in self.updates() if u.name == name)

  def metrics(self, sums, update):
    """The update's loss and its terms, per row."""
    rows = jnp.maximum(sums[update.denominator], 1.0)
    return {"loss": sums["loss_sum"] / rows,
            **{t: sums[f"{t}_sum"] / rows for t in self.TERMS[update.name]}}

  def stop_reason(self, metrics):
    loss, limit = metrics.get("discriminator/loss"), self.cfg.vocoder.d_loss_limit
    if loss is not None and loss > limit:
      return (f"discriminator/loss {loss:.4g} passed vocoder.d_loss_limit={limit:g}, the "
              "discriminator is diverging (resume with a lower "
              "vocoder.discriminator_optimizer.learning_rate, or a generator that keeps up: "
              "vocoder.generator_optimizer)")
    return None

  def eval_sums(self, params, frozen, batch, rng):
    """Eval reports the generator's losses (mel L1 is the number to watch)."""
    return self._update("generator").loss(params, frozen, batch, rng)[1]

  def eval_metrics(self, sums):
    return self.metrics(sums, self._update("generator"))

  def make_source(self, split: Split) -> SegmentSource:
    tc = self.cfg.train
    name = "train" if split == Split.TRAIN else "eval"
    if name not in self._utts:
      self._utts[name] = load_pairs(split_file(self.cfg.speech_data.path, name), self.cfg.mel,
                                    0)
      if split == Split.TRAIN:
        self._check_segment(self._utts[name])
    return SegmentSource(self._utts[name], tc.batch_size, self.cfg.vocoder.segment,
                         split == Split.TRAIN, tc.seed)

  def _check_segment(self, utts) -> None:
    """Refuse a segment longer than every training utterance; warn when most are shorter."""
    segment, hop, rate = self.cfg.vocoder.segment, self.cfg.mel.hop, self.cfg.mel.sample_rate
    lengths = np.asarray([len(u.wave) for u in utts])
    where = f"speech_data.path={self.cfg.speech_data.path!r}"
    if not len(lengths) or segment > lengths.max():
      longest = int(lengths.max()) if len(lengths) else 0
      raise ConfigError(
          f"vocoder.segment={segment} samples is longer than every training utterance of "
          f"{where} (the longest has {longest:,} samples, {longest / rate:.2f} s): every row "
          f"would be at least {1 - longest / segment:.0%} zero padding; set vocoder.segment to "
          f"at most {longest // hop * hop} (a multiple of mel.hop={hop})")
    shorter = float(np.mean(lengths < segment))
    if shorter > 0.5:
      log.warning("vocoder.segment=%d samples is longer than %.0f%% of the training utterances "
                  "of %s (median %d samples): many rows end in zero padding", segment,
                  100 * shorter, where, int(np.median(lengths)))

  def items_per_step(self) -> float:
    """Waveform samples per step."""
    return float(self.cfg.train.batch_size * self.cfg.vocoder.segment)
