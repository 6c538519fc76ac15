"""The reward model (report section 5.3): Bradley-Terry on preference pairs, in two stages.

One model, `reward`: the Step1 backbone with a scalar head (models/reward.py), its backbone
started from an SFT or pretrained run (`checkpoint.init_from`, its `model.lm` without the LM
head), its head as ScalarHead draws it (std 1/sqrt(D+1), bias 0). Each row of the batch is a
pair: the chosen and the rejected answer after the same prompt; the score is read at each
sequence's last real token, which must be the <|EOT|> ending the answer: a pair where either side
has no EOS there (cut by train.seq_len, or a record without one) is counted in `no_eos` and
left out of the loss. Loss: -log sigmoid(r_chosen - r_rejected - margin).

Stages (`reward.stages`, report: text pairs, then audio-question pairs, one epoch each) follow
each other in one run; their passes decide the run's length. train.steps and train.epochs do
not apply: a config that sets train.steps in the layer that sets reward.stages or a later one
(`train.steps=4` on the command line), or sets train.epochs, is refused naming the keys (a
train.steps inherited from a base below reward.stages' layer is overridden by the stages).
Pairs with equal answers are left out, and pairs cut to train.seq_len counted (data/pairs.py).
Eval reads every stage's held-out pairs and reports pair accuracy (a tie is not correct), mean
margin, and the mean and std of all scores, which PPO reads (read_score_stats) from
RUN_DIR/eval_metrics.json to normalise the score.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from stepaudio_jax.config import ConfigError
from stepaudio_jax.config.fields import input_path
from stepaudio_jax.data.pairs import PAIR_SIDES, PairSource, PairStage
from stepaudio_jax.data.source import BatchSource
from stepaudio_jax.data.templates import TemplateContext, template_context
from stepaudio_jax.models import flops
from stepaudio_jax.models.reward import RewardModel, last_token_index, score_at
from stepaudio_jax.tasks.base import (EVAL_METRICS, BatchField, Deliverable, Model, Split, Task,
                                      Update)
from stepaudio_jax.tasks.lm_config import check_lm_config

ROW = ("act_batch", "act_length")


@dataclasses.dataclass(frozen=True)
class PairStageConfig:
  """One stage of reward-model training: preference-pair shards and passes over them."""

  shards: list[str] = input_path(default_factory=list)  # globs of `preference` records
  eval_shards: list[str] = input_path(default_factory=list)  # held-out pairs
  epochs: float = 1.0

  def __post_init__(self):
    if self.epochs <= 0:
      raise ValueError(f"reward stage epochs must be positive, got {self.epochs}")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """The `reward` section: the report's two stages, text preference pairs
  then audio-question pairs, one epoch each, in one run."""

  stages: list[PairStageConfig] = dataclasses.field(default_factory=list)
  margin: float = 0.0  # every pair's Bradley-Terry margin, plus its record's metadata.margin
  # Deaf-hacking counter pairs: with a spoken question, this answer as the rejected side
  # (e.g. "Sorry, I didn't hear that clearly."); "" = off.
  counter_answer: str = ""


def bradley_terry(r_chosen: jax.Array, r_rejected: jax.Array, margin: jax.Array) -> jax.Array:
  """-log sigmoid(r_chosen - r_rejected - margin), per pair."""
  return -jax.nn.log_sigmoid(r_chosen - r_rejected - margin)


def read_score_stats(run_dir: str) -> tuple[float, float]:
  """(mean, std) of the held-out scores of the reward model trained in `run_dir`, from its
  newest eval; a ConfigError of one line for a file that is missing or cannot be used."""
  path = os.path.join(run_dir, EVAL_METRICS)
  if not os.path.isfile(path):
    raise ConfigError(f"{path} is missing: train the reward model with train.eval_every > 0 "
                      "so its score mean and std are there to normalise PPO's reward")
  try:
    with open(path) as f:
      stats = json.load(f)
    mean, std = float(stats["reward_mean"]), float(stats["reward_std"])
  except (ValueError, TypeError, KeyError) as e:
    raise ConfigError(f"{path} is not a reward model's eval (JSON with reward_mean and "
                      f"reward_std): {type(e).__name__}: {e}") from None
  if not std > 0:
    raise ConfigError(f"{path}: reward_std={std} must be positive (the reward model scores "
                      "every held-out answer alike); normalised by it, every score would be "
                      "clipped")
  return mean, std


class RewardTask(Task):
  progress_keys = ("loss", "accuracy", "margin", "grad_norm", "learning_rate")

  sections = {"reward": RewardConfig}
  deliverables = {"reward": Deliverable("reward", "reward")}
  scans_step1_layers = True

  @classmethod
  def length_keys(cls, cfg):
    return ("reward.stages",)

  @classmethod
  def check_config(cls, cfg):
    check_lm_config(cfg)
    if not cfg.reward.stages:
      raise ValueError("task=reward needs reward.stages (preference-pair shards per stage)")
    if cfg.train.eval_every and not any(s.eval_shards for s in cfg.reward.stages):
      raise ValueError("train.eval_every reads held-out pairs: give reward.stages "
                       "eval_shards, or set train.eval_every=0")

  def __init__(self, cfg, shard):
    super().__init__(cfg, shard)
    self._ctx = None
    self._counted: PairSource | None = None  # the train source total_steps read, unused yet

  @property
  def ctx(self) -> TemplateContext:
    if self._ctx is None:
      self._ctx = template_context(self.cfg.data, self.cfg.tokens, self.cfg.vision)
    return self._ctx

  def models(self):
    cfg = self.cfg
    return {"reward": Model(lambda rngs: RewardModel(cfg.model, self.shard, rngs=rngs),
                            optimizer=cfg.optimizer)}

  def batch_fields(self):
    b, t = self.cfg.train.batch_size, self.cfg.train.seq_len
    fields = {f"{side}_{k}": BatchField((b, t), np.int32, ROW)
              for side in PAIR_SIDES for k in ("tokens", "segment_ids", "positions")}
    fields["margin"] = BatchField((b,), np.float32, ("act_batch",))
    return fields

  def scores(self, params, frozen, batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(r_chosen, r_rejected, valid): scores at each side's last token; valid = both are EOS."""
    rm = self.merge("reward", params, frozen)
    eos = self.cfg.tokens.eos_id
    out, valid = [], True
    for side in PAIR_SIDES:
      tokens, seg = batch[f"{side}_tokens"], batch[f"{side}_segment_ids"]
      last = last_token_index(seg)
      out.append(score_at(rm(tokens, seg, batch[f"{side}_positions"]), last))
      valid = valid & (score_at(tokens, last) == eos)
    return out[0], out[1], valid

  def loss(self, params, frozen, batch, rng):
    r_c, r_r, valid = self.scores(params, frozen, batch)
    w = valid.astype(jnp.float32)
    diff = r_c - r_r
    per_pair = bradley_terry(r_c, r_r, batch["margin"] + self.cfg.reward.margin) * w
    sums = {
        "loss_sum": per_pair.sum(), "pairs": w.sum(), "rows": jnp.float32(w.size),
        "correct": ((diff > 0) * w).sum(), "margin_sum": (diff * w).sum(),
        "score_sum": ((r_c + r_r) * w).sum(), "score_sq_sum": ((r_c**2 + r_r**2) * w).sum(),
    }
    return sums["loss_sum"], sums

  def metrics(self, sums, update):
    pairs = jnp.maximum(sums[update.denominator], 1.0)
    mean = sums["score_sum"] / (2 * pairs)
    return {
        "loss": sums["loss_sum"] / pairs, "accuracy": sums["correct"] / pairs,
        "margin": sums["margin_sum"] / pairs, "pairs": sums["pairs"],
        "no_eos_fraction": 1.0 - sums["pairs"] / jnp.maximum(sums["rows"], 1.0),
        "reward_mean": mean,
        "reward_std": jnp.sqrt(jnp.maximum(sums["score_sq_sum"] / (2 * pairs) - mean**2, 0.0)),
    }

  def updates(self):
    return (Update(("reward",), self.loss, denominator="pairs"),)

  def items_per_step(self) -> float:
    """Tokens of both sides of every pair."""
    return 2 * self.cfg.train.batch_size * self.cfg.train.seq_len

  def flops_per_step(self) -> float:
    """The LM's training FLOPs on both sides of every pair (the head's are negligible)."""
    tc = self.cfg.train
    return self.items_per_step() * flops.train_flops_per_token(self.cfg.model, tc.seq_len,
                                                                lm_head=False)

  def _stages(self, split: Split) -> list[PairStage]:
    stages = self.cfg.reward.stages
    if split == Split.EVAL:
      return [PairStage(tuple(g for s in stages for g in s.eval_shards), 1.0,
                        "reward.stages[].eval_shards")]
    return [PairStage(tuple(s.shards), s.epochs, f"reward.stages[{i}].shards")
            for i, s in enumerate(stages)]

  def make_source(self, split: Split) -> BatchSource:
    if split == Split.TRAIN and self._counted is not None:  # read once, warned about once
      source, self._counted = self._counted, None
      return source
    tc, counter = self.cfg.train, self.cfg.reward.counter_answer
    answer = np.asarray(self.ctx.tokenizer.encode(counter), np.int32) if counter else None
    return PairSource(self._stages(split), self.ctx, tc.seq_len, tc.batch_size, tc.seed, answer)

  def total_steps(self) -> int:
    """The stages' passes over their pairs (tied pairs left out); see length_keys."""
    self._counted = self.make_source(Split.TRAIN)
    return self._counted.total_steps()

  def warm_start(self, params, frozen, load):
    """A reward model run continues as it is; an LM run (SFT, pretraining) gives the backbone
    (its `model.lm` without `lm_head`), and the head keeps its initialisation."""
    source = self.cfg.checkpoint.init_from
    if not source:
      return params, frozen
    got, tree = load(source, "checkpoint.init_from")
    if got.kind == "reward":
      return {**params, "reward": tree}, frozen
    if got.kind != "step1":
      raise ValueError(f"checkpoint.init_from={source!r} delivers a {got.kind} model, neither "
                       "a reward model nor a Step1 LM")
    lm = {k: v for k, v in tree.items() if k != "lm_head"}
    want = jax.tree.map(lambda x: x.shape, params["reward"]["lm"])
    got = jax.tree.map(lambda x: x.shape, lm)
    if want != got:
      raise ValueError(f"checkpoint.init_from={source!r} has LM shapes {got} but the model "
                       f"needs {want}; use the model config it was trained with")
    return {**params, "reward": {**params["reward"], "lm": lm}}, frozen
