"""Training sections: `optimizer`, `train` (the loop) and `checkpoint`."""

import dataclasses
import enum

from stepaudio_jax.config.fields import coerce_enums, input_path


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
    coerce_enums(self)
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
    if self.weight_decay < 0 or self.grad_clip_norm < 0:
      raise ValueError("weight_decay and grad_clip_norm must be >= 0 (grad_clip_norm 0 = off)")
    if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1) or self.eps <= 0:
      raise ValueError(f"need 0 <= b1, b2 < 1 and eps > 0, got b1={self.b1}, b2={self.b2}, "
                       f"eps={self.eps}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  run_dir: str = "runs/default"
  steps: int = 1000
  # Passes over the data instead of train.steps (tasks whose data is finite: SFT, reward model);
  # 0 = train.steps decides.
  epochs: float = 0.0
  batch_size: int = 8  # global, in sequences
  seq_len: int = 1024
  grad_accum_steps: int = 1  # the batch is split into this many microbatches
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0  # 0 = no periodic eval
  eval_batches: int = 2
  peak_flops_per_device: float = 0.0  # for MFU; 0 = known accelerator table or measured
  # Longest the final checkpoint may take after the last step or a preemption before the
  # process gives up with exit status 3 (a dead peer, a hung filesystem); 0 = no limit.
  shutdown_timeout: float = 900.0
  # Seconds without a completed step (or a finished compile) before the run dumps every
  # thread's stack to stderr and RUN_DIR/hang_stacks.txt and exits with status 4 (a hung
  # collective or device); above the longest compile, eval and checkpoint save. 0 = off.
  hang_timeout: float = 0.0

  def __post_init__(self):
    for name in ("steps", "batch_size", "seq_len", "grad_accum_steps", "log_every",
                 "eval_batches"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.epochs < 0:
      raise ValueError(f"epochs must be >= 0 (0 = use train.steps), got {self.epochs}")
    if self.eval_every < 0 or self.peak_flops_per_device < 0 or self.shutdown_timeout < 0:
      raise ValueError("eval_every, peak_flops_per_device and shutdown_timeout must be >= 0 "
                       "(0 = off / auto / no limit)")
    if self.hang_timeout < 0:
      raise ValueError(f"hang_timeout must be >= 0 (0 = off), got {self.hang_timeout}")
    if self.batch_size % self.grad_accum_steps:
      raise ValueError(
          f"batch_size={self.batch_size} is not divisible by grad_accum_steps="
          f"{self.grad_accum_steps}"
      )


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 100  # save every N steps (and at the end, and on SIGTERM)
  keep: int = 3  # newest K complete checkpoints are kept
  async_save: bool = True  # training continues while a save is written
  resume: bool = True  # resume from the newest checkpoint in the run directory
  # run directory of a model whose params start step 0 (the task says which it takes)
  init_from: str = input_path(default="")

  def __post_init__(self):
    if self.every <= 0 or self.keep <= 0:
      raise ValueError("checkpoint.every and checkpoint.keep must be positive")
