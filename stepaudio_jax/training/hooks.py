"""The loop's hooks: metrics (progress, TensorBoard, NaN stop), checkpoints, eval."""

import math
from collections.abc import Callable

import jax
import numpy as np

from stepaudio_jax.data.source import BatchSource, next_global_batch
from stepaudio_jax.training.checkpoint import Checkpointer
from stepaudio_jax.training.loop import Hook
from stepaudio_jax.training.progress import Progress


class MetricsHook(Hook):
  """Fetches each step's metrics one step late (dispatch stays ahead), stops on a NaN loss,
  keeps the history and logs every `log_every` steps and the last."""

  def __init__(self, progress: Progress, log_every: int, total: int, nan_key: str,
               print_fn=print, is_lead: bool = True):
    self.progress, self.log_every, self.total, self.nan_key = progress, log_every, total, nan_key
    self.print, self.is_lead = print_fn, is_lead
    self.history: list[dict] = []
    self._pending = None
    self._malformed = 0

  def start(self, step: int) -> None:
    self.progress.start(step)

  def _fetch(self) -> None:
    step, metrics, data_stats = self._pending
    self._pending = None
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    metrics |= {f"data/{k.replace('/', '_')}": float(v) for k, v in data_stats.items()}
    value = metrics[self.nan_key]
    if not math.isfinite(value):
      raise FloatingPointError(f"{self.nan_key} became {value} at step {step}; stopping")
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
  source's position; `data_state(step)` may be a collective, so it runs only on save steps."""

  def __init__(self, ckpt: Checkpointer, data_state: Callable[[int], dict]):
    self.ckpt, self.data_state = ckpt, data_state

  def after_step(self, step, state, metrics, data_stats) -> None:
    if self.ckpt.manager.should_save(step):
      self.ckpt.save(step, state, self.data_state(step))

  def end(self, step, state) -> None:
    if self.ckpt.manager.latest_step() != step:
      self.ckpt.save(step, state, self.data_state(step), force=True)
    self.ckpt.wait()


class EvalHook(Hook):
  """Every `every` steps: the eval step over the first `batches` batches of the held-out source
  (the same batches each time), summed, turned into metrics by the task, logged."""

  def __init__(self, every: int, batches: int, eval_step: Callable, source: BatchSource,
               fields: dict, metrics: Callable, progress: Progress):
    self.every, self.batches, self.eval_step = every, batches, eval_step
    self.source, self.fields, self.metrics, self.progress = source, fields, metrics, progress

  def after_step(self, step, state, metrics, data_stats) -> None:
    if step % self.every:
      return
    self.source.restart(step)
    sums = None
    for _ in range(self.batches):
      out = self.eval_step(state, next_global_batch(self.source, self.fields))
      sums = out if sums is None else jax.tree.map(np.add, sums, out)
    self.progress.log_eval(step, {k: float(v) for k, v in self.metrics(sums).items()})
