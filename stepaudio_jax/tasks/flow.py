"""Flow matching (CosyVoice, facts.md sections 3 and 8): speech codes -> mel.

One model, `flow` (models/flow.py). Each row is a window of an utterance's codes with its wave;
the loss computes the target log-mel from the wave in the step (audio/mel.py), so flow targets
and vocoder inputs are one feature. Per row, from the step's key:
  - a prompt: with probability flow.prompt_prob, the first randint(0, prompt_fraction * frames)
    target frames are given as the condition `cond` (else none);
  - t ~ U(0, 1) mapped by the cosine schedule t = 1 - cos(t * pi / 2);
  - OT-CFM: z ~ N(0, I), x_t = (1 - (1 - sigma_min) t) z + t x1, target u = x1 - (1 - sigma_min) z;
  - classifier-free guidance training: with probability flow.cfg_drop, mu, speaker and prompt
    are all zeroed.
The loss is the squared error of the velocity on valid frames after the prompt, summed; the
step divides by `bins` (those frames x mel bins), i.e. a masked MSE.
"""


import jax
import jax.numpy as jnp
import numpy as np

from stepaudio_jax.audio.codes import group_samples
from stepaudio_jax.audio.mel import log_mel
from stepaudio_jax.config.speech import FlowConfig, MelConfig, SpeechDataConfig
from stepaudio_jax.data.speech_pairs import FlowSource, load_pairs, split_file
from stepaudio_jax.models.flow import FlowModel
from stepaudio_jax.tasks.base import BatchField, Deliverable, Model, Split, Task, Update


class FlowTask(Task):
  progress_keys = ("loss", "grad_norm", "learning_rate")
  throughput_unit = "frames"
  sections = {"mel": MelConfig, "speech_data": SpeechDataConfig, "flow": FlowConfig}
  deliverables = {"flow": Deliverable("flow", "flow")}
  optimizer_keys = ("flow.optimizer",)

  def __init__(self, cfg, shard):
    super().__init__(cfg, shard)
    self._utts: dict[str, list] = {}

  def models(self) -> dict[str, Model]:
    c = self.cfg
    return {"flow": Model(lambda rngs: FlowModel(c.flow, c.mel.n_mels, c.speech_data.speaker_dim,
                                                 rngs=rngs), optimizer=c.flow.optimizer)}

  @property
  def max_codes(self) -> int:
    return self.cfg.speech_data.max_codes

  def wave_samples(self) -> int:
    return self.max_codes // 5 * group_samples(self.cfg.mel.sample_rate)

  def batch_fields(self) -> dict[str, BatchField]:
    b = self.cfg.train.batch_size
    return {
        "codes": BatchField((b, self.max_codes), np.int32, ("act_batch", None)),
        "groups": BatchField((b,), np.int32, ("act_batch",)),
        "wave": BatchField((b, self.wave_samples()), np.float32, ("act_batch", None)),
        "speaker": BatchField((b, self.cfg.speech_data.speaker_dim), np.float32,
                              ("act_batch", None)),
    }

  def targets(self, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(normalised log-mel [B, F, M], valid frames per row [B], codes per row [B])."""
    fc = self.cfg.flow
    mel = (log_mel(batch["wave"], self.cfg.mel) - fc.mel_mean) / fc.mel_std
    frames = batch["groups"] * group_samples(self.cfg.mel.sample_rate) // self.cfg.mel.hop
    return mel, frames, 5 * batch["groups"]

  def loss(self, params, frozen, batch, rng):
    fc = self.cfg.flow
    model = self.merge("flow", params, frozen)
    x1, f, n = self.targets(batch)
    b, frames, bins = x1.shape
    j = jnp.arange(frames)[None, :]
    valid = j < f[:, None]
    k_prompt, k_len, k_t, k_z, k_cfg = jax.random.split(rng, 5)
    has_prompt = jax.random.uniform(k_prompt, (b,)) < fc.prompt_prob
    longest = jnp.floor(fc.prompt_fraction * f.astype(jnp.float32)).astype(jnp.int32)
    plen = jnp.where(has_prompt, jax.random.randint(k_len, (b,), 0, longest + 1), 0)
    in_prompt = (j < plen[:, None])[:, :, None]
    cond = jnp.where(in_prompt, x1, 0.0)
    t = 1.0 - jnp.cos(jax.random.uniform(k_t, (b,)) * jnp.pi / 2)
    z = jax.random.normal(k_z, x1.shape)
    tt = t[:, None, None]
    xt = (1 - (1 - fc.sigma_min) * tt) * z + tt * x1
    u = x1 - (1 - fc.sigma_min) * z
    keep = (jax.random.uniform(k_cfg, (b,)) >= fc.cfg_drop).astype(jnp.float32)
    mu = model.encode(batch["codes"], n, f, frames) * keep[:, None, None]
    spk = model.speaker(batch["speaker"]) * keep[:, None]
    pred = model.velocity(xt, valid, mu, t, spk, cond * keep[:, None, None])
    weight = (valid[:, :, None] & ~in_prompt).astype(jnp.float32)
    total = jnp.sum((pred - u) ** 2 * weight)
    return total, {"loss_sum": total, "bins": jnp.sum(weight) * bins,
                   "prompt_frames": jnp.sum(plen).astype(jnp.float32)}

  def updates(self):
    return (Update(("flow",), self.loss, denominator="bins"),)

  def metrics(self, sums, update):
    return {"loss": sums["loss_sum"] / jnp.maximum(sums[update.denominator], 1.0),
            "prompt_frames": sums["prompt_frames"]}

  def utterances(self, split: Split) -> list:
    """The split's paired utterances, read once per task."""
    sd = self.cfg.speech_data
    name = "train" if split == Split.TRAIN else "eval"
    if name not in self._utts:
      self._utts[name] = load_pairs(split_file(sd.path, name), self.cfg.mel, sd.speaker_dim)
    return self._utts[name]

  def make_source(self, split: Split) -> FlowSource:
    tc = self.cfg.train
    return FlowSource(self.utterances(split), tc.batch_size, self.max_codes,
                      self.cfg.mel.sample_rate, split == Split.TRAIN, tc.seed)

  def items_per_step(self) -> float:
    """Mel frames per step."""
    return self.cfg.train.batch_size * self.wave_samples() / self.cfg.mel.hop
