"""Task sections: the options of one task, read only by that task (`task:` picks which runs)."""

import dataclasses
import enum

from stepaudio_jax.config.fields import coerce_enums
from stepaudio_jax.config.training import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """The `pretrain` section (tasks/pretrain.py)."""

  # Weight of the auxiliary loss mean(logsumexp(logits)^2) over target tokens (PaLM's z-loss):
  # keeps the softmax normaliser near 1, which keeps bf16 logits from drifting at scale.
  z_loss_weight: float = 0.0

  def __post_init__(self):
    if self.z_loss_weight < 0:
      raise ValueError(f"z_loss_weight must be >= 0, got {self.z_loss_weight}")


@dataclasses.dataclass(frozen=True)
class PairStageConfig:
  """One stage of reward-model training: preference-pair shards and passes over them."""

  shards: list[str] = dataclasses.field(default_factory=list)  # globs of `preference` records
  eval_shards: list[str] = dataclasses.field(default_factory=list)  # held-out pairs
  epochs: float = 1.0

  def __post_init__(self):
    if self.epochs <= 0:
      raise ValueError(f"reward stage epochs must be positive, got {self.epochs}")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """The `reward` section (tasks/reward.py): the report's two stages, text preference pairs
  then audio-question pairs, one epoch each, in one run."""

  stages: list[PairStageConfig] = dataclasses.field(default_factory=list)
  margin: float = 0.0  # every pair's Bradley-Terry margin, plus its record's metadata.margin
  # Deaf-hacking counter pairs: with a spoken question, this answer as the rejected side
  # (e.g. "Sorry, I didn't hear that clearly."); "" = off.
  counter_answer: str = ""


class KLEstimator(str, enum.Enum):
  K1 = "k1"  # log p - log q: unbiased, can be negative per token
  K3 = "k3"  # exp(q - p) - (q - p) - 1: unbiased, never negative (Schulman)


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """The `ppo` section (tasks/ppo.py); defaults are the report's and the reference RLHF
  implementations' (facts.md sections 4 and 7). The policy's optimizer is `optimizer:`."""

  prompts: list[str] = dataclasses.field(default_factory=list)  # preference shards (prompts)
  policy_from: str = ""  # run directory of the SFT policy (its model.lm); also the reference
  reward_from: str = ""  # run directory of the reward model; also the critic's start
  prompt_len: int = 128  # prompts are left-padded (or left-truncated) to this
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  kl_coef: float = 0.05
  kl_estimator: KLEstimator = KLEstimator.K1
  gamma: float = 1.0
  lam: float = 0.95
  clip_ratio: float = 0.2
  value_clip: float = 0.2
  score_clip: float = 5.0  # the normalised reward-model score is clipped to +-this
  truncation_penalty: float = 1.0  # subtracted from the score of a response cut without EOS
  rule_answer: str = ""  # rule-based reward: a response containing this to a spoken question...
  rule_penalty: float = 0.0  # ...loses this much (the report's planned fix for deaf hacking)
  critic_warmup_steps: int = 80  # the critic trains alone (policy frozen) for these steps
  epochs: int = 1  # passes over each rollout batch
  minibatches: int = 1  # optimizer updates per pass
  critic_optimizer: OptimizerConfig = dataclasses.field(
      default_factory=lambda: OptimizerConfig(learning_rate=1e-5, end_learning_rate=1e-6,
                                              schedule="cosine", embed_lr_multiplier=1.0,
                                              weight_decay=0.0))

  def __post_init__(self):
    coerce_enums(self)
    for name in ("prompt_len", "max_new_tokens", "epochs", "minibatches"):
      if getattr(self, name) <= 0:
        raise ValueError(f"ppo.{name} must be positive, got {getattr(self, name)}")
    for name in ("temperature", "kl_coef", "clip_ratio", "value_clip", "score_clip",
                 "truncation_penalty", "rule_penalty", "critic_warmup_steps", "top_k"):
      if getattr(self, name) < 0:
        raise ValueError(f"ppo.{name} must be >= 0, got {getattr(self, name)}")
    if not (0 < self.top_p <= 1 and 0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
      raise ValueError("need 0 < ppo.top_p <= 1 and 0 <= ppo.gamma, ppo.lam <= 1")
