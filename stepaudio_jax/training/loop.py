"""The loop: feed batches to the jitted step until the last step or SIGTERM; hooks do the rest.

It knows no task, no checkpoint and no metric: eval, checkpoints, progress, TensorBoard and the
NaN stop are hooks (hooks.py). After every step each hook's `after_step` runs in order; at the
end (last step or SIGTERM) each hook's `end` runs, still under the SIGTERM handler so a second
signal cannot cut the final checkpoint short. An exception in a hook (a NaN loss) ends the loop.
"""

import signal
from collections.abc import Callable, Iterator, Sequence

from stepaudio_jax.training.state import TrainState


class Hook:
  def start(self, step: int) -> None:
    """Before the first step of this process's run (`step` is where it resumes)."""

  def after_step(self, step: int, state: TrainState, metrics: dict, data_stats: dict) -> None:
    """After optimizer step `step` (1-based) was dispatched; metrics are still on device."""

  def end(self, step: int, state: TrainState) -> None:
    """After the last step this process ran."""


class StopFlag:
  """Set by SIGTERM (preemption): the loop stops after the step in flight and the hooks end.

  A context manager, so the caller's own SIGTERM handler is back once training returns or fails.
  """

  def __enter__(self):
    self.set, self._previous = False, None
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread; the caller handles signals
      pass
    return self

  def __exit__(self, *_):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, *_):
    self.set = True


def run(state: TrainState, train_step: Callable, batches: Iterator[tuple[dict, dict]],
        start: int, total: int, hooks: Sequence[Hook], stop: StopFlag) -> tuple[TrainState, int]:
  """Steps start+1..total; `batches` yields (global batch, data counters). Returns the state
  and the number of steps done."""
  for hook in hooks:
    hook.start(start)
  step = start
  while step < total and not stop.set:
    batch, data_stats = next(batches)
    state, metrics = train_step(state, batch)
    step += 1
    for hook in hooks:
      hook.after_step(step, state, metrics, data_stats)
  for hook in hooks:
    hook.end(step, state)
  return state, step
