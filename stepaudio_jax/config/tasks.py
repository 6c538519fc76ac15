"""Task sections: the options of one task, read only by that task (`task:` picks which runs)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """The `pretrain` section (tasks/pretrain.py)."""

  # Weight of the auxiliary loss mean(logsumexp(logits)^2) over target tokens (PaLM's z-loss):
  # keeps the softmax normaliser near 1, which keeps bf16 logits from drifting at scale.
  z_loss_weight: float = 0.0

  def __post_init__(self):
    if self.z_loss_weight < 0:
      raise ValueError(f"z_loss_weight must be >= 0, got {self.z_loss_weight}")
