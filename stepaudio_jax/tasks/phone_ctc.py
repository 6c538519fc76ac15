"""Phone CTC: a speech encoder (models/phone_encoder.py) trained to recognise phonemes, whose
hidden states a k-means tokenizer later quantises into linguistic codes.

One model, `encoder`. Each row is one utterance of phone_ctc.train_path (data/phone_pairs.py),
its 10 ms log-mel padded to phone_ctc.max_frames and its phone ids to max_phones. The loss is
CTC (blank 0) summed over rows; the step divides it by `phones`, the number of target phones,
so microbatches add up. Eval, over the first train.eval_batches batches of
phone_ctc.eval_path in order, reports the CTC loss per phone and `per`, the greedy phone error
rate: the best symbol per 30 ms, repeats merged, blanks dropped, edit distance to the target
phones over their number.
"""

import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from stepaudio_jax.config import ConfigError
from stepaudio_jax.config.fields import input_path
from stepaudio_jax.config.training import OptimizerConfig, Schedule
from stepaudio_jax.data.phone_pairs import PhoneSource, check_fits, read_metadata, read_phone_file
from stepaudio_jax.models.phone_encoder import PhoneEncoder, PhoneEncoderConfig
from stepaudio_jax.tasks.base import BatchField, Deliverable, Model, Split, Task, Update

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PhoneCTCConfig:
  """The `phone_ctc` section: data, row sizes, the encoder and its optimizer."""

  # The phone files (data/phone_pairs.py), relative to the config file that sets them.
  train_path: str = input_path(default="")
  eval_path: str = input_path(default="")
  max_frames: int = 600  # 10 ms mel frames per row (6 s); longer utterances are refused
  max_phones: int = 120  # target phones per row
  encoder: PhoneEncoderConfig = dataclasses.field(default_factory=PhoneEncoderConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(
      learning_rate=1e-3, end_learning_rate=1e-4, schedule=Schedule.COSINE, warmup_steps=100,
      embed_lr_multiplier=1.0, weight_decay=0.0, b2=0.98, grad_clip_norm=5.0))

  def __post_init__(self):
    if self.max_frames <= 0 or self.max_phones <= 0:
      raise ValueError(f"phone_ctc.max_frames and max_phones must be positive, got "
                       f"{self.max_frames} and {self.max_phones}")


def ctc_loss_sum(logprobs: Float[Array, "B S V"], symbols: Int[Array, " B"],
                 phones: Int[Array, "B L"], n_phones: Int[Array, " B"]) -> Float[Array, " B"]:
  """-log p(phones | frames) per row (blank 0); 0 for an empty row."""
  s, lmax = logprobs.shape[1], phones.shape[1]
  logit_pad = (jnp.arange(s)[None] >= symbols[:, None]).astype(jnp.float32)
  label_pad = (jnp.arange(lmax)[None] >= n_phones[:, None]).astype(jnp.float32)
  per_row = optax.ctc_loss(logprobs, logit_pad, phones, label_pad, blank_id=0)
  return jnp.where(n_phones > 0, per_row, 0.0)


def greedy_phones(logprobs: Float[Array, "B S V"], symbols: Int[Array, " B"]
                  ) -> tuple[Int[Array, "B S"], Int[Array, " B"]]:
  """Best path: argmax per symbol, repeats merged, blanks dropped, packed left (0-padded)."""
  b, s, _ = logprobs.shape
  best = jnp.argmax(logprobs, -1).astype(jnp.int32)
  prev = jnp.pad(best[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  keep = (best != 0) & (best != prev) & (jnp.arange(s)[None] < symbols[:, None])
  where = jnp.where(keep, jnp.cumsum(keep, 1) - 1, s)
  out = jnp.zeros((b, s), jnp.int32).at[jnp.arange(b)[:, None], where].set(best, mode="drop")
  return out, keep.sum(1).astype(jnp.int32)


def edit_distance(hyp: Int[Array, "B S"], n_hyp: Int[Array, " B"], ref: Int[Array, "B L"],
                  n_ref: Int[Array, " B"]) -> Int[Array, " B"]:
  """Levenshtein distance per row. Row i of the table from row i - 1 in parallel: with
  c[j] = min(d[j] + 1, d[j - 1] + sub), the new row is j + cummin(c[k] - k)."""
  lmax = ref.shape[1]
  j = jnp.arange(lmax + 1)[None]

  def row(d, xs):
    i, h = xs
    sub = (h[:, None] != ref).astype(jnp.int32)
    c = jnp.concatenate([d[:, :1] + 1, jnp.minimum(d[:, 1:] + 1, d[:, :-1] + sub)], axis=1)
    new = jax.lax.cummin(c - j, axis=1) + j
    return jnp.where((i < n_hyp)[:, None], new, d), None

  d0 = jnp.broadcast_to(j, (hyp.shape[0], lmax + 1)).astype(jnp.int32)
  d, _ = jax.lax.scan(row, d0, (jnp.arange(hyp.shape[1]), hyp.T))
  return jnp.take_along_axis(d, n_ref[:, None], axis=1)[:, 0]


class PhoneCTCTask(Task):
  progress_keys = ("per", "loss", "grad_norm", "learning_rate")
  throughput_unit = "frames"
  sections = {"phone_ctc": PhoneCTCConfig}
  deliverables = {"encoder": Deliverable("encoder", "phone_encoder")}
  optimizer_keys = ("phone_ctc.optimizer",)

  def __init__(self, cfg, shard):
    super().__init__(cfg, shard)
    self._meta: dict | None = None
    self._data: dict = {}

  @property
  def meta(self) -> dict:
    """The train file's metadata: mel bins and the phone inventory size the model."""
    if self._meta is None:
      self._meta = read_metadata(self.cfg.phone_ctc.train_path, "phone_ctc.train_path")
    return self._meta

  @property
  def n_mels(self) -> int:
    return int(self.meta["n_mels"])

  @property
  def inventory(self) -> list[str]:
    return json.loads(self.meta["phones"])

  def models(self) -> dict[str, Model]:
    pc = self.cfg.phone_ctc
    n_mels, phones = self.n_mels, len(self.inventory)
    return {"encoder": Model(lambda rngs: PhoneEncoder(pc.encoder, n_mels, phones, rngs=rngs),
                             optimizer=pc.optimizer)}

  def batch_fields(self) -> dict[str, BatchField]:
    pc, b = self.cfg.phone_ctc, self.cfg.train.batch_size
    return {
        "mel": BatchField((b, pc.max_frames, self.n_mels), np.float32, ("act_batch", None, None)),
        "frames": BatchField((b,), np.int32, ("act_batch",)),
        "phones": BatchField((b, pc.max_phones), np.int32, ("act_batch", None)),
        "n_phones": BatchField((b,), np.int32, ("act_batch",)),
    }

  def _forward(self, params, frozen, batch):
    logprobs, mask = self.merge("encoder", params, frozen)(batch["mel"], batch["frames"])
    return logprobs, mask.sum(1).astype(jnp.int32)

  def loss(self, params, frozen, batch, rng):
    logprobs, symbols = self._forward(params, frozen, batch)
    total = ctc_loss_sum(logprobs, symbols, batch["phones"], batch["n_phones"]).sum()
    return total, {"loss_sum": total, "phones": batch["n_phones"].sum().astype(jnp.float32)}

  def updates(self):
    return (Update(("encoder",), self.loss, denominator="phones"),)

  def metrics(self, sums, update):
    return {"loss": sums["loss_sum"] / jnp.maximum(sums["phones"], 1.0)}

  def eval_sums(self, params, frozen, batch, rng):
    logprobs, symbols = self._forward(params, frozen, batch)
    total = ctc_loss_sum(logprobs, symbols, batch["phones"], batch["n_phones"]).sum()
    hyp, n_hyp = greedy_phones(logprobs, symbols)
    edits = edit_distance(hyp, n_hyp, batch["phones"], batch["n_phones"])
    return {"loss_sum": total, "phones": batch["n_phones"].sum().astype(jnp.float32),
            "edits": edits.sum().astype(jnp.float32)}

  def eval_metrics(self, sums):
    phones = max(float(sums["phones"]), 1.0)
    return {"loss": float(sums["loss_sum"]) / phones, "per": float(sums["edits"]) / phones}

  def make_source(self, split: Split) -> PhoneSource:
    pc, tc = self.cfg.phone_ctc, self.cfg.train
    key = "phone_ctc.train_path" if split == Split.TRAIN else "phone_ctc.eval_path"
    if key not in self._data:
      data = read_phone_file(pc.train_path if split == Split.TRAIN else pc.eval_path, key)
      if data.inventory != self.inventory or data.n_mels != self.n_mels:
        raise ConfigError(f"{key}: its phone inventory or mel bins differ from "
                          "phone_ctc.train_path's; build both files in one run of the builder")
      check_fits(data, pc.max_frames, pc.max_phones, pc.encoder.ctc_per_frame, key)
      rows = tc.eval_batches * tc.batch_size
      if split == Split.EVAL and rows < len(data):
        log.warning("eval reads %d of the %d utterances of %s (train.eval_batches x "
                    "batch_size); raise train.eval_batches to %d for all", rows, len(data),
                    key, -(-len(data) // tc.batch_size))
      self._data[key] = data
    return PhoneSource(self._data[key], tc.batch_size, pc.max_frames, pc.max_phones,
                       split == Split.TRAIN, tc.seed)

  def items_per_step(self) -> float:
    """Mel frames (10 ms) per step, padding included."""
    return float(self.cfg.train.batch_size * self.cfg.phone_ctc.max_frames)
