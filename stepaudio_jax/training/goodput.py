"""Where the loop's wall time goes (goodput), and a watchdog for a run that stops making steps.

StepTimes splits the loop's time into phases: waiting for the next batch (data), tracing,
lowering and compiling programs (compile, from JAX's monitoring events, wherever it happens:
the first step, an eval, a recompile), dispatching and waiting for steps (step: the metrics hook
blocks on the device one step late), writing checkpoints and evaluating. Goodput is the step
share of the wall time. A save step's checkpoint phase also waits for that step to finish
(its metrics are checked before saving), so it counts one step of device time. Phases do not
nest, and an interval may end inside a phase (the metrics hook logs from within its own): the
part of the open phase before that end counts in the interval that ends, the rest in the next,
so no second counts twice and goodput stays within [0, 1].

HangWatchdog: with async dispatch a hung collective or device never raises, the process just
stops returning from the loop's hooks. From the third step of a (re)start on (the first ones
wait for every process's compile), when no step has completed (and no compile phase ended;
XLA compiling itself is never a hang) for `timeout` seconds, it writes every thread's Python stack (faulthandler) to stderr and
RUN_DIR/hang_stacks_{process index}.txt and exits with EXIT_HUNG, so a scheduler restarts the job instead of
billing an idle slice.
"""

import contextlib
import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

import jax

from stepaudio_jax.training.loop import Hook

PHASES = ("data", "compile", "step", "checkpoint", "eval")
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
EXIT_HUNG = 4  # no step completed within train.hang_timeout
# The watchdog arms at the dispatch of the third step of a (re)start: by then the first step
# ran on every process, so no peer is still compiling it (on a loaded host a peer's compile
# can take minutes, and the others wait for it inside step 1 or 2, which is not a hang).
ARM_AT_STEP = 3
STACKS_FILE = "hang_stacks_{process}.txt"  # in the run directory, one per process


class StepTimes:
  """Seconds per phase since the last `interval()` and since the start. A context manager: it
  listens to JAX's compile events while open."""

  def __init__(self, clock: Callable[[], float] = time.perf_counter):
    self.clock = clock
    self._compiling = 0.0  # compile seconds reported, not yet moved out of a phase
    self._interval = dict.fromkeys(PHASES, 0.0)
    self._total = dict.fromkeys(PHASES, 0.0)
    self._interval_start = self._start = clock()
    self._open: list | None = None  # [name, begin] of the phase in progress
    self.compile_listeners: list[Callable[[str], None]] = []  # called with each event's name

  def _on_event(self, event: str, duration_secs: float, **_) -> None:
    if event in COMPILE_EVENTS:
      self._compiling += duration_secs
      for listener in self.compile_listeners:
        listener(event)

  def __enter__(self):
    self._interval_start = self._start = self.clock()
    jax.monitoring.register_event_duration_secs_listener(self._on_event)
    return self

  def __exit__(self, *_):
    jax.monitoring.unregister_event_duration_listener(self._on_event)

  def _add(self, phase: str, seconds: float) -> None:
    self._interval[phase] += seconds
    self._total[phase] += seconds

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    """Time the block as `name`, less the compiling that happened inside it."""
    if self._open is not None:
      raise RuntimeError(f"phase {name!r} inside phase {self._open[0]!r}: phases do not nest")
    self._compiling = 0.0
    self._open = [name, self.clock()]
    try:
      yield
    finally:
      self._count_open(self.clock())
      self._open = None

  def _count_open(self, now: float) -> None:
    """Count the open phase from its begin (or the last interval's end) to `now`."""
    name, begin = self._open
    compiling = min(self._compiling, now - begin)
    self._add("compile", compiling)
    self._add(name, now - begin - compiling)
    self._compiling = 0.0
    self._open[1] = now

  def _shares(self, seconds: dict, wall: float) -> dict[str, float]:
    out = {f"time/{p}_seconds": seconds[p] for p in PHASES}
    out["time/other_seconds"] = max(wall - sum(seconds.values()), 0.0)
    out["goodput"] = seconds["step"] / wall if wall > 0 else 0.0
    return out

  def interval(self) -> dict[str, float]:
    """Per-phase seconds since the last call, its goodput, and the goodput since the start."""
    now = self.clock()
    if self._open is not None:  # called from within a phase: its part so far ends here
      self._count_open(now)
    out = self._shares(self._interval, now - self._interval_start)
    out["goodput_total"] = self._total["step"] / max(now - self._start, 1e-9)
    self._interval = dict.fromkeys(PHASES, 0.0)
    self._interval_start = now
    return out


def dump_stacks(path: str | None) -> None:
  """Every thread's Python stack to stderr and, if given, to `path`."""
  faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
  if path:
    with open(path, "w") as f:
      faulthandler.dump_traceback(file=f, all_threads=True)


def _exit_hung(why: str) -> None:
  print(f"stepaudio: {why}; exiting with status {EXIT_HUNG}", file=sys.stderr, flush=True)
  os._exit(EXIT_HUNG)


class HangWatchdog(Hook):
  """Dumps all stacks and exits EXIT_HUNG when neither a step nor a compile phase completed
  for `timeout` seconds (not counting XLA compiling, with `times`), from the ARM_AT_STEP-th
  step of the loop to its end (the final checkpoint has its own limit,
  train.shutdown_timeout). Put it first among the hooks, so its end disarms it before the
  others' (the final save): a step that hangs on the device, in a hook or in the data keeps
  the next after_step from coming. Use it as a context manager around the loop."""

  def __init__(self, timeout: float, stacks_path: str | None,
               times: StepTimes | None = None,
               exit_fn: Callable[[str], None] = _exit_hung,
               clock: Callable[[], float] = time.monotonic):
    self.timeout, self.stacks_path, self.exit_fn, self.clock = timeout, stacks_path, exit_fn, clock
    self._last = (0, clock())
    self._backend_compiling = False
    self._done = threading.Event()
    if times is not None:
      times.compile_listeners.append(self._on_compile_event)

  def _on_compile_event(self, event: str) -> None:
    """Any compile phase that ends is progress; XLA's compile (after lowering, before the
    backend compile event) may take minutes and is never a hang, so the clock stops then."""
    self._backend_compiling = event == COMPILE_EVENTS[1]  # lowered: XLA compiles next
    self._last = (self._last[0], self.clock())

  def __enter__(self):
    return self

  def __exit__(self, *_):
    """Disarms it however the loop ended (an exception skips the hooks' ends)."""
    self._done.set()

  def start(self, step: int) -> None:
    self._last = (step, self.clock())
    self._armed_from = step + ARM_AT_STEP
    threading.Thread(target=self._watch, name="hang-watchdog", daemon=True).start()

  def after_step(self, step, state, metrics, data_stats) -> None:
    self._last = (step, self.clock())

  def end(self, step, state) -> None:
    self._done.set()

  def _watch(self) -> None:
    while not self._done.wait(min(self.timeout / 4, 5.0)):
      step, when = self._last
      idle = self.clock() - when
      if idle > self.timeout and step >= self._armed_from and not self._backend_compiling:
        print(f"stepaudio: no step completed for {idle:.0f} s after step {step} "
              f"(train.hang_timeout={self.timeout:g}); stacks of all threads follow"
              + (f" (also in {self.stacks_path})" if self.stacks_path else ""),
              file=sys.stderr, flush=True)
        dump_stacks(self.stacks_path)
        self.exit_fn(f"hang after step {step}")
        return
