"""The loop: feed batches to the jitted step until the last step or a preemption; hooks do the rest.

It knows no task, no checkpoint and no metric: eval, checkpoints, progress, TensorBoard and the
NaN stop are hooks (hooks.py), and so is whatever a caller adds (`Every(n, fn)`: fn of the
step, the state and the step's host metrics every n steps). After every step each hook's
`after_step` runs in order; at the end (last step or preemption) each hook's `end` runs under a
watchdog: if the ends (the final checkpoint) take longer than `shutdown_timeout` (a dead peer,
a hung filesystem), the process exits with EXIT_STUCK instead of hanging. An exception in a
hook (a NaN loss) ends the loop. Each hook is also a context manager around the whole loop,
left however it ends (an exception skips the ends): where a hook lets go of what it holds.

Preemption: in one process, SIGTERM sets the stop flag. In a multi-process job every process
must stop after the same step, or one enters the final (collective) save while another runs a
step: JAX's preemption sync relays any process's SIGTERM through the coordination service and
names one step for all (`reached_preemption_sync_point`). A second SIGTERM once stopping has
begun exits at once with EXIT_STUCK; the newest complete checkpoint stays the one to resume.
"""

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

import jax
from jax.experimental import multihost_utils

from stepaudio_jax.training.state import TrainState

EXIT_STUCK = 3  # shutdown cut short: second signal or watchdog; resume from the newest checkpoint


class Hook:
  phase = "step"  # what StepTimes counts the hook's after_step as (goodput.PHASES)

  def __enter__(self):
    return self

  def __exit__(self, *_):
    """After the loop, however it ended."""

  def start(self, step: int) -> None:
    """Before the first step of this process's run (`step` is where it resumes)."""

  def after_step(self, step: int, state: TrainState, metrics: dict, data_stats: dict) -> None:
    """After optimizer step `step` (1-based) was dispatched; metrics are still on device."""

  def end(self, step: int, state: TrainState) -> None:
    """After the last step this process ran."""


class Every(Hook):
  """Calls `fn(step, state, metrics)` after steps n, 2n, ..., with that step's metrics as host
  floats (fetching them waits for the step: keep n well above 1 in long runs)."""

  def __init__(self, n: int, fn: Callable[[int, TrainState, dict[str, float]], None]):
    if n <= 0:
      raise ValueError(f"Every(n, fn) needs n >= 1, got {n}")
    self.n, self.fn = n, fn

  def after_step(self, step, state, metrics, data_stats) -> None:
    if step % self.n == 0:
      self.fn(step, state, {k: float(v) for k, v in jax.device_get(metrics).items()})


def _exit_now(why: str) -> None:
  print(f"stepaudio: {why}; exiting with status {EXIT_STUCK} (resume from the newest complete "
        "checkpoint)", file=sys.stderr, flush=True)
  os._exit(EXIT_STUCK)


class StopFlag:
  """Whether to stop before the next step (see the module docstring). A context manager that
  owns SIGTERM while training and gives the previous handler back afterwards."""

  def __init__(self, exit_fn: Callable[[str], None] = _exit_now):
    self.exit_fn = exit_fn
    self.set = False

  def __enter__(self):
    self.set, self._previous = False, None
    # Multi-process: JAX's preemption notifier owns SIGTERM until the agreed step.
    self._multi = jax.process_count() > 1
    if not self._multi:
      self._install()
    return self

  def __exit__(self, *_):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _install(self) -> None:
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread; the caller handles signals
      pass

  def _handle(self, *_):
    if self.set:
      self.exit_fn("a second SIGTERM during shutdown")
    self.set = True

  def should_stop(self, step: int) -> bool:
    """Called once per step, with the number of steps done, by every process."""
    if self._multi and not self.set and multihost_utils.reached_preemption_sync_point(step):
      self.set = True
      self._install()  # from here a further SIGTERM cuts the shutdown short
    return self.set


class Watchdog:
  """Exits the process if the block it guards outlives `seconds` (0 = no limit)."""

  def __init__(self, seconds: float, what: str, exit_fn: Callable[[str], None] = _exit_now):
    self.seconds, self.what, self.exit_fn = seconds, what, exit_fn

  def __enter__(self):
    self._timer = None
    if self.seconds:
      self._timer = threading.Timer(
          self.seconds, self.exit_fn,
          (f"{self.what} did not finish within train.shutdown_timeout={self.seconds:g} s",))
      self._timer.daemon = True
      self._timer.start()
    return self

  def __exit__(self, *_):
    if self._timer is not None:
      self._timer.cancel()


def run(state: TrainState, train_step: Callable, batches: Iterator[tuple[dict, dict]],
        start: int, total: int, hooks: Sequence[Hook], stop: StopFlag,
        shutdown_timeout: float = 0, times=None) -> tuple[TrainState, int]:
  """Steps start+1..total; `batches` yields (global batch, data counters). Returns the state
  and the number of steps done. `times` (goodput.StepTimes) gets the time of each batch, step
  dispatch and hook by phase."""
  timed = times.phase if times is not None else lambda _: contextlib.nullcontext()
  with contextlib.ExitStack() as held:
    for hook in hooks:
      held.enter_context(hook)
    for hook in hooks:
      hook.start(start)
    step = start
    while step < total and not stop.should_stop(step):
      with timed("data"):
        batch, data_stats = next(batches)
      with timed("step"):
        state, metrics = train_step(state, batch)
      step += 1
      for hook in hooks:
        with timed(hook.phase):
          hook.after_step(step, state, metrics, data_stats)
    with Watchdog(shutdown_timeout, f"the shutdown after step {step} (final checkpoint)"):
      for hook in hooks:
        with timed(hook.phase):
          hook.end(step, state)
  return state, step
