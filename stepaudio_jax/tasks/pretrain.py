"""Pretraining (report section 4): next-token loss of Step-Omni over packed mixed-modality rows.

One model, `model`: a Step-Omni (Step1 LM + image projector trainable, image encoder frozen)
with the report's optimizer groups (optimizer.py). The batch is the packed-row format of
data/packing.py; the loss is the masked next-token cross-entropy, reported per token type, plus
the optional z-loss of the `pretrain` section. Data
comes from the synthetic source or the Grain stage mixture (`data.source`), eval from split 1 or
the held-out shards. `checkpoint.init_from` takes another run's LM and grows its vocabulary.
"""

import dataclasses
import logging

import jax
import numpy as np

from stepaudio_jax.config.data import DataSource
from stepaudio_jax.data.loader import GrainLoader
from stepaudio_jax.data.source import BatchSource
from stepaudio_jax.data.synthetic import EVAL_SPLIT, SyntheticSource, TRAIN_SPLIT
from stepaudio_jax.models import flops
from stepaudio_jax.models.omni import StepOmni, TRAINABLE, expand_vocabulary
from stepaudio_jax.tasks import lm_loss
from stepaudio_jax.tasks.base import BatchField, Deliverable, Model, Split, Task
from stepaudio_jax.tasks.lm_config import check_lm_config

log = logging.getLogger(__name__)
ROW = ("act_batch", "act_length")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """The `pretrain` section: LM loss options of pretraining and SFT."""

  # Weight of the auxiliary loss mean(logsumexp(logits)^2) over target tokens (PaLM's z-loss):
  # keeps the softmax normaliser near 1, which keeps bf16 logits from drifting at scale.
  z_loss_weight: float = 0.0

  def __post_init__(self):
    if self.z_loss_weight < 0:
      raise ValueError(f"z_loss_weight must be >= 0, got {self.z_loss_weight}")


class PretrainTask(Task):
  sections = {"pretrain": PretrainConfig}
  deliverables = {"lm": Deliverable("model", "step1", ("lm",))}
  scans_step1_layers = True

  @classmethod
  def check_config(cls, cfg):
    check_lm_config(cfg)

  def models(self) -> dict[str, Model]:
    cfg = self.cfg
    return {"model": Model(
        build=lambda rngs: StepOmni(cfg.model, cfg.vision, cfg.tokens, self.shard, rngs=rngs),
        trainable=TRAINABLE, optimizer=cfg.optimizer)}

  def batch_fields(self) -> dict[str, BatchField]:
    b, t, v = self.cfg.train.batch_size, self.cfg.train.seq_len, self.cfg.vision
    fields = {name: BatchField((b, t), np.int32, ROW)
              for name in ("tokens", "targets", "target_types", "segment_ids", "positions")}
    fields["loss_mask"] = BatchField((b, t), np.float32, ROW)
    if v.enabled:
      fields["images"] = BatchField(
          (b, v.max_images_per_sequence, v.image_size, v.image_size, v.channels), np.float32,
          ("act_batch", None, None, None, None))
    return fields

  def loss(self, params, frozen, batch, rng):
    """Cross-entropy (reported as `loss`), plus pretrain.z_loss_weight x the z-loss when set."""
    model = self.merge("model", params, frozen)
    logits = model(batch["tokens"], batch["segment_ids"], batch["positions"], batch.get("images"))
    z_weight = self.cfg.pretrain.z_loss_weight
    sums = lm_loss.loss_sums(logits, batch["targets"], batch["loss_mask"], batch["target_types"],
                             with_z_loss=z_weight > 0)
    if z_weight > 0:
      return sums["loss_sum"] + z_weight * sums["z_loss_sum"], sums
    return sums["loss_sum"], sums

  def metrics(self, sums, update):
    return lm_loss.finalize(sums)

  def make_source(self, split: Split) -> BatchSource:
    cfg, tc = self.cfg, self.cfg.train
    if cfg.data.source == DataSource.GRAIN:
      return GrainLoader(cfg.data, cfg.tokens, cfg.vision, tc.seq_len, tc.batch_size, tc.seed,
                         held_out=split == Split.EVAL)
    return SyntheticSource(cfg.synthetic, cfg.tokens, cfg.vision, tc.seq_len, tc.seed,
                           tc.batch_size, EVAL_SPLIT if split == Split.EVAL else TRAIN_SPLIT)

  def items_per_step(self) -> float:
    return self.cfg.train.batch_size * self.cfg.train.seq_len

  def flops_per_step(self) -> float:
    return flops.train_step_flops(self.cfg, self.cfg.train.batch_size)

  def analytic_bytes(self, micro_batch: int, devices: int) -> float:
    """One Step1 LM trained with Adam (models/flops.py train_memory_estimate)."""
    return flops.train_memory_estimate(self.cfg, micro_batch, devices).total

  def warm_start(self, params, frozen, load):
    """The LM of checkpoint.init_from (e.g. a text-only run), its vocabulary grown to
    model.vocab_size."""
    source = self.cfg.checkpoint.init_from
    if not source:
      return params, frozen
    got, tree = load(source, "checkpoint.init_from")
    if got.kind != "step1":
      raise ValueError(f"checkpoint.init_from={source!r} delivers a {got.kind} model, not a "
                       "Step1 LM; point it at a pretraining, SFT or PPO run")
    lm = {"lm": tree}
    old_vocab = lm["lm"]["embed"].shape[0]
    if old_vocab != self.cfg.model.vocab_size:
      lm = expand_vocabulary(lm, self.cfg.model.vocab_size,
                             jax.random.key(self.cfg.train.seed + 7))
      log.warning("expanded vocabulary of %s from %d to %d", source, old_vocab,
                  self.cfg.model.vocab_size)
    want = jax.tree.map(lambda x: x.shape, params["model"]["lm"])
    got = jax.tree.map(lambda x: x.shape, lm["lm"])
    if want != got:
      raise ValueError(
          f"checkpoint.init_from={source!r} has LM shapes {got} but the model config needs "
          f"{want}; use a model config that matches it")
    return {**params, "model": {**params["model"], "lm": lm["lm"]}}, frozen
