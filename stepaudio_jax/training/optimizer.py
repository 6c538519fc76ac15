"""AdamW with the report's parameter groups (facts.md section 4), one per trained model.

Groups: the backbone, and the embedding + LM head, which run at `embed_lr_multiplier` times the
backbone rate (5x in pretraining stages 1-2 so the new audio tokens converge, 1x in stage 3).
The frozen image encoder is not in the trainable tree at all, so it has no optimizer state.
Norm scales get no weight decay.
"""

import dataclasses
from collections.abc import Callable

import jax
import optax

from stepaudio_jax.config.training import OptimizerConfig, Schedule

EMBED_GROUP_PARAMS = ("embed", "lm_head")


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


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """One trained model's update rule and the (backbone) learning rate it reports."""

  tx: optax.GradientTransformation
  schedule: Callable

  @classmethod
  def create(cls, cfg: OptimizerConfig, total_steps: int) -> "Optimizer":
    return cls(make_optimizer(cfg, total_steps), learning_rate_schedule(cfg, total_steps))
