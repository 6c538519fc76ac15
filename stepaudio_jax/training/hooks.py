"""The loop's built-in hooks: metrics (progress, TensorBoard, the stop checks), checkpoints, eval.

A step whose metrics are not all finite (loss, gradient norm, the updated parameters' norm), or
that meets its task's stop condition (Task.stop_reason), stops the run, and its state is never
checkpointed: the checkpoint hook waits for the metrics of a step it saves and checks them
first, so the newest checkpoint is always one the run could go on from.
"""

import json
import math
from collections.abc import Callable

import jax
import numpy as np

from stepaudio_jax.data.source import BatchSource, next_global_batch
from stepaudio_jax.training.checkpoint import Checkpointer
from stepaudio_jax.training.loop import Hook
from stepaudio_jax.training.progress import Progress


StopReason = Callable[[dict[str, float]], str | None]  # Task.stop_reason


def check_finite(step: int, metrics: dict, newest_checkpoint: int | None,
                 stop_reason: StopReason | None = None,
                 optimizer_keys: tuple[str, ...] = ("optimizer",)) -> None:
  """Raise FloatingPointError naming the first non-finite metric of `step` and the optimizers
  to change (`optimizer_keys`, Task.optimizer_keys), or the reason `stop_reason` gives for its
  host metrics."""
  where = (f"the newest checkpoint is step {newest_checkpoint}"
           if newest_checkpoint is not None else "no checkpoint was written")
  keys = optimizer_keys
  lower = (f"{keys[0]}.learning_rate or {keys[0]}.grad_clip_norm" if len(keys) == 1
           else f"learning_rate or grad_clip_norm in {' or '.join(keys)}")
  metrics = {k: float(v) for k, v in metrics.items()}
  for key, value in metrics.items():
    if not math.isfinite(value):
      raise FloatingPointError(
          f"{key} became {value} at step {step}; stopping without checkpointing it "
          f"({where}: resume from it with a lower {lower}, or look at the data of that "
          "step)")
  reason = stop_reason(metrics) if stop_reason is not None else None
  if reason:
    raise FloatingPointError(f"step {step}: {reason}; stopping without checkpointing it "
                             f"({where})")


class MetricsHook(Hook):
  """Fetches each step's metrics one step late (dispatch stays ahead), stops on a non-finite
  metric or the task's stop condition, keeps the history and logs every `log_every` steps and
  the last. It owns `progress` and closes it when the loop is left."""

  def __init__(self, progress: Progress, log_every: int, total: int,
               newest_checkpoint: Callable[[], int | None], print_fn=print,
               is_lead: bool = True, stop_reason: StopReason | None = None,
               optimizer_keys: tuple[str, ...] = ("optimizer",)):
    self.progress, self.log_every, self.total = progress, log_every, total
    self.newest_checkpoint, self.stop_reason = newest_checkpoint, stop_reason
    self.optimizer_keys = optimizer_keys
    self.print, self.is_lead = print_fn, is_lead
    self.history: list[dict] = []
    self._pending = None
    self._malformed = 0

  def __exit__(self, *_):
    self.progress.close()

  def start(self, step: int) -> None:
    self.progress.start(step)

  def _fetch(self) -> None:
    step, metrics, data_stats = self._pending
    self._pending = None
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    check_finite(step, metrics, self.newest_checkpoint(), self.stop_reason, self.optimizer_keys)
    metrics |= {f"data/{k.replace('/', '_')}": float(v) for k, v in data_stats.items()}
    self.history.append({"step": step, **metrics})
    if step % self.log_every == 0 or step == self.total:
      self.progress.log_train(step, metrics)

  def after_step(self, step, state, metrics, data_stats) -> None:
    if self.is_lead and data_stats.get("malformed", 0) > self._malformed:
      self._malformed = int(data_stats["malformed"])
      self.print(f"data: {self._malformed} malformed records skipped so far (this process)",
                 flush=True)
    if self._pending is not None:
      self._fetch()
    self._pending = (step, metrics, data_stats)

  def end(self, step, state) -> None:
    if self._pending is not None:
      self._fetch()


class CheckpointHook(Hook):
  """Saves every checkpoint.every steps and at the end (also after SIGTERM), with the data
  source's position, once the step's metrics pass check_finite; `data_state(step)` may be a
  collective, so it runs only on save steps."""

  phase = "checkpoint"

  def __init__(self, ckpt: Checkpointer, data_state: Callable[[int], dict],
               stop_reason: StopReason | None = None,
               optimizer_keys: tuple[str, ...] = ("optimizer",)):
    self.ckpt, self.data_state, self.stop_reason = ckpt, data_state, stop_reason
    self.optimizer_keys = optimizer_keys

  def after_step(self, step, state, metrics, data_stats) -> None:
    if self.ckpt.manager.should_save(step):
      check_finite(step, jax.device_get(metrics), self.ckpt.manager.latest_step(),
                   self.stop_reason, self.optimizer_keys)
      self.ckpt.save(step, state, self.data_state(step))

  def end(self, step, state) -> None:
    if self.ckpt.manager.latest_step() != step:
      self.ckpt.save(step, state, self.data_state(step), force=True)
    self.ckpt.wait()


class EvalHook(Hook):
  """Every `every` steps and after the last: the eval step over the first `batches` batches of
  the held-out source (the same batches each time), summed, turned into metrics by the task,
  logged, and written to
  `json_path` (the newest eval, for later phases and reports: e.g. PPO reads the reward model's
  reward mean and std there)."""

  phase = "eval"

  def __init__(self, every: int, batches: int, eval_step: Callable, source: BatchSource,
               fields: dict, metrics: Callable, progress: Progress, json_path: str | None):
    self.every, self.batches, self.eval_step = every, batches, eval_step
    self.source, self.fields, self.metrics, self.progress = source, fields, metrics, progress
    self.json_path = json_path

  def after_step(self, step, state, metrics, data_stats) -> None:
    if step % self.every == 0:
      self._evaluate(step, state)

  def end(self, step, state) -> None:
    """The final state is evaluated too (what later phases read from json_path)."""
    if step % self.every:
      self._evaluate(step, state)

  def _evaluate(self, step, state) -> None:
    self.source.restart(step)
    sums = None
    for _ in range(self.batches):
      out = self.eval_step(state, next_global_batch(self.source, self.fields))
      sums = out if sums is None else jax.tree.map(np.add, sums, out)
    metrics = {k: float(v) for k, v in self.metrics(sums).items()}
    self.progress.log_eval(step, metrics)
    if self.json_path:
      with open(self.json_path, "w") as f:
        json.dump({"step": step, **metrics}, f, indent=1)
