"""train(cfg): setup, resume or start, then the loop with its hooks, for any task.

The hooks are the built-in ones (builtin_hooks: hang watchdog, metrics and progress,
checkpoints, eval), then the caller's (`train(cfg, hooks=[loop.Every(100, fn)])`), in that
order after every step: a caller's hook at a save or eval step runs after that save and eval.

One run per run directory: the whole run, from before its data is opened to after the final
checkpoint, holds RUN_DIR's lock (run_lock.py); a second trainer on the same directory is
refused naming the first one's pid and host, and a killed run's lock is taken over.

Resume order: the newest complete checkpoint in RUN_DIR/checkpoints restores the step, every
model's parameters and frozen parameters, the optimizer states, the RNG and the data source's
position onto the current mesh; without one the state is initialised from the seed (and, with
checkpoint.init_from, the task takes another run's parameters). A checkpoint that exists but
cannot be read stops the run: it never falls back to step 0.
"""

import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from stepaudio_jax.config import RunConfig, dump_config
from stepaudio_jax.data.source import BatchSource, LoaderStateError, next_global_batch
from stepaudio_jax.tasks.base import EVAL_METRICS, Split
from stepaudio_jax.training import loop
from stepaudio_jax.training.checkpoint import (
  Checkpointer,
  CheckpointError,
  restore_deliverable,
)
from stepaudio_jax.training.goodput import STACKS_FILE, HangWatchdog, StepTimes
from stepaudio_jax.training.hooks import CheckpointHook, EvalHook, MetricsHook
from stepaudio_jax.training.progress import Progress, device_peak_flops
from stepaudio_jax.training.run_lock import hold_run_dir
from stepaudio_jax.training.setup import Setup, TaskFactory, setup
from stepaudio_jax.training.state import TrainState

# RUN_DIR/done.json, written when every step ran (not on a preemption): how a sweep, or a
# cluster job's wrapper, tells a finished run from one to resume.
DONE = "done.json"


def _unaliased(tree):
  """The tree with any array that appears twice copied: a warm start may put one array in two
  models (a PPO policy and its frozen reference), and the donated state must not hold a buffer
  twice."""
  seen = set()

  def once(x):
    if isinstance(x, jax.Array) and id(x) in seen:
      return jnp.copy(x)
    seen.add(id(x))
    return x

  return jax.tree.map(once, tree)


def initial_state(run: Setup, ckpt: Checkpointer, source: BatchSource, say=print
                  ) -> TrainState:
  """The state to continue from (resumed, or fresh at step 0), with the source positioned."""
  cfg = run.cfg
  latest = ckpt.latest_step()
  if latest is not None and not cfg.checkpoint.resume:
    raise CheckpointError(
        f"{ckpt.directory} already holds checkpoints (newest step {latest}) and "
        "checkpoint.resume=false; choose a new train.run_dir so nothing is overwritten")
  if latest is None:
    with jax.set_mesh(run.mesh):
      state = run.init()
    try:
      params, frozen = run.task.warm_start(state.params, state.frozen, restore_deliverable)
    except ValueError as e:
      raise CheckpointError(str(e)) from e
    params, frozen = _unaliased((params, frozen))
    state = state.replace(params=jax.device_put(params, run.state_shardings.params),
                          frozen=jax.device_put(frozen, run.state_shardings.frozen))
    say(f"no checkpoint in {ckpt.directory}: starting at step 0")
    return state
  state, data_state = ckpt.restore(latest, run.abstract_state)
  say(f"resumed from {ckpt.directory} at step {latest}")
  start = int(jax.device_get(state.step))
  if data_state["step"] != start:
    raise CheckpointError(
        f"checkpoint step {start} carries data iterator state for step {data_state['step']}")
  saved_steps = data_state.get("train_steps", run.total_steps)
  if start and saved_steps != run.total_steps and not cfg.optimizer.decay_steps:
    say(f"WARNING: this run was saved with train.steps={saved_steps} and resumes with "
        f"{run.total_steps}: schedules that end with the run (optimizer.decay_steps=0) change "
        "shape from here; set optimizer.decay_steps to keep the old one")
  if start:
    try:
      source.restore(start, data_state.get("iterator"))
    except LoaderStateError as e:
      raise CheckpointError(f"checkpoint step {start}: {e}") from e
  return state


def builtin_hooks(run: Setup, ckpt: Checkpointer, source: BatchSource,
                  eval_source: BatchSource | None, times: StepTimes, print_fn=print
                  ) -> tuple[MetricsHook, list[loop.Hook]]:
  """(the metrics hook, whose history train returns; every built-in hook in the order they
  run): the hang watchdog first (train.hang_timeout), metrics and progress, checkpoints, and
  eval on `eval_source` (with train.eval_every)."""
  tc, task = run.cfg.train, run.task
  lead = jax.process_index() == 0
  total = run.total_steps

  def data_state(step: int) -> dict:
    out = {"step": step, "train_steps": total}
    position = source.get_state()
    return out if position is None else {**out, "iterator": position}

  progress = Progress(tc.run_dir, total, task.items_per_step(), task.throughput_unit,
                      task.flops_per_step(),
                      device_peak_flops(tc.peak_flops_per_device) * jax.device_count(),
                      task.progress_keys, lead, print_fn, times)
  metrics = MetricsHook(progress, tc.log_every, total, ckpt.manager.latest_step, print_fn,
                        lead, task.stop_reason, task.optimizer_keys)
  hooks = []
  if tc.hang_timeout:
    hooks.append(HangWatchdog(tc.hang_timeout, os.path.join(
        tc.run_dir, STACKS_FILE.format(process=jax.process_index())), times))
  hooks += [metrics, CheckpointHook(ckpt, data_state, task.stop_reason, task.optimizer_keys)]
  if eval_source is not None:
    hooks.append(EvalHook(tc.eval_every, tc.eval_batches, run.eval, eval_source, run.batch,
                          task.eval_metrics, progress,
                          os.path.join(tc.run_dir, EVAL_METRICS) if lead else None))
  return metrics, hooks


def train(cfg: RunConfig, print_fn=print, task: TaskFactory | None = None,
          hooks: Sequence[loop.Hook] = ()) -> list[dict]:
  """Run training per `cfg` (its `task:`, or `task` if given), with `hooks` after the built-in
  ones, holding the run directory's lock throughout; returns the per-step metrics."""
  lead = jax.process_index() == 0

  def say(text: str) -> None:
    if lead:
      print_fn(text, flush=True)

  with hold_run_dir(cfg.train.run_dir, say):
    return _train(cfg, say, print_fn, task, hooks)


def _train(cfg: RunConfig, say, print_fn, task: TaskFactory | None,
           hooks: Sequence[loop.Hook]) -> list[dict]:
  tc = cfg.train
  run = setup(cfg, task=task)
  lead = jax.process_index() == 0
  source = run.task.make_source(Split.TRAIN)
  eval_source = run.task.make_source(Split.EVAL) if tc.eval_every else None
  ckpt = Checkpointer(tc.run_dir, cfg.checkpoint)
  try:
    state = initial_state(run, ckpt, source, say)
  except BaseException:
    ckpt.close()
    raise
  start, total = int(jax.device_get(state.step)), run.total_steps
  if lead:  # only now: a refused run leaves the run directory's config as it was
    dump_config(cfg, os.path.join(tc.run_dir, "config.yaml"))

  def batches():
    while True:
      batch = next_global_batch(source, run.batch)
      yield batch, source.stats()

  times = StepTimes()
  try:
    metrics, builtin = builtin_hooks(run, ckpt, source, eval_source, times, print_fn)
    with jax.set_mesh(run.mesh), loop.StopFlag() as stop, times:
      _, step = loop.run(state, run.train, batches(), start, total, [*builtin, *hooks], stop,
                         tc.shutdown_timeout, times)
  except BaseException:
    try:
      ckpt.close()  # let earlier saves complete; the error in flight is the one to report
    except CheckpointError:
      pass
    raise
  ckpt.close()
  if stop.set:
    say(f"preempted (SIGTERM): saved step {step} to {ckpt.directory}; exiting")
  elif lead and step == total:
    with open(os.path.join(tc.run_dir, DONE), "w") as f:
      json.dump({"task": cfg.task, "step": step}, f)
  return metrics.history
