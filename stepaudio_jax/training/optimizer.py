"""AdamW with the report's parameter groups (facts.md section 4).

Groups: the backbone, and the embedding + LM head, which run at `embed_lr_multiplier` times the
backbone rate (5x in pretraining stages 1-2 so the new audio tokens converge, 1x in stage 3).
The frozen image encoder is not in the trainable tree at all, so it has no optimizer state.
Norm scales get no weight decay.
"""

import dataclasses
import enum

import jax
import optax

EMBED_GROUP_PARAMS = ("embed", "lm_head")


class Schedule(str, enum.Enum):
  CONSTANT = "constant"
  COSINE = "cosine"  # warmup, then cosine from learning_rate down to end_learning_rate


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 2e-5  # backbone peak
  end_learning_rate: float = 5e-6  # cosine floor
  schedule: Schedule = Schedule.CONSTANT
  warmup_steps: int = 0
  decay_steps: int = 0  # cosine length after warmup; 0 = until the end of training
  embed_lr_multiplier: float = 5.0
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip_norm: float = 1.0  # 0 disables clipping

  def __post_init__(self):
    object.__setattr__(self, "schedule", Schedule(self.schedule))
    if self.learning_rate <= 0 or self.end_learning_rate < 0:
      raise ValueError("learning_rate must be positive and end_learning_rate non-negative")
    if self.end_learning_rate > self.learning_rate:
      raise ValueError(
          f"end_learning_rate={self.end_learning_rate} exceeds learning_rate={self.learning_rate}"
      )
    if self.warmup_steps < 0 or self.decay_steps < 0:
      raise ValueError("warmup_steps and decay_steps must be >= 0")
    if self.embed_lr_multiplier <= 0:
      raise ValueError(f"embed_lr_multiplier must be positive, got {self.embed_lr_multiplier}")


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int, scale: float = 1.0):
  peak, floor = cfg.learning_rate * scale, cfg.end_learning_rate * scale
  if cfg.schedule == Schedule.CONSTANT:
    if cfg.warmup_steps:
      return optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.constant_schedule(peak)
  decay = cfg.decay_steps or max(total_steps - cfg.warmup_steps, 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if cfg.warmup_steps else peak,
      peak_value=peak,
      warmup_steps=cfg.warmup_steps,
      decay_steps=cfg.warmup_steps + decay,
      end_value=floor,
  )


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_labels(params) -> dict:
  def label(path, _):
    return "embed" if _path_names(path)[-1] in EMBED_GROUP_PARAMS else "backbone"

  return jax.tree_util.tree_map_with_path(label, params)


def decay_mask(params) -> dict:
  return jax.tree_util.tree_map_with_path(lambda p, _: "norm" not in "/".join(_path_names(p)),
                                          params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  """clip -> adam moments -> decoupled decay -> per-group learning rate."""
  groups = optax.multi_transform(
      {
          "backbone": optax.scale_by_learning_rate(learning_rate_schedule(cfg, total_steps)),
          "embed": optax.scale_by_learning_rate(
              learning_rate_schedule(cfg, total_steps, cfg.embed_lr_multiplier)
          ),
      },
      param_labels,
  )
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm else optax.identity(),
      optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
      optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
      groups,
  )
