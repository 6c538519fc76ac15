"""Stage schedule and token-share mixing.

Weights are shares of TOKENS. Each row stream picks its next example by a deficit rule: the
task whose emitted tokens in the current stage are furthest below its share (smallest
emitted / weight) goes next. Tokens are counted exactly as they are drawn, so the shares match
the configured ones to within one example per stream at every point of the run, with no need
to estimate mean example lengths; the rule is deterministic, so its state is a few counters.

Stages switch at a step: stage k ends at the first step whose cumulative training tokens
(step x batch x seq_len) reach the summed budgets of stages 0..k. Every row of a step therefore
belongs to the same stage, whichever process or worker builds it.
"""

import math
from collections.abc import Sequence

from stepaudio_jax.config.data import TASKS, StageConfig


class StageSchedule:
  def __init__(self, stages: Sequence[StageConfig], tokens_per_step: int):
    self.weights = [s.task_weights() for s in stages]
    self.boundaries = []  # first step of stage k+1
    total = 0.0
    for s in stages[:-1]:
      if s.tokens <= 0:
        raise ValueError("only the last stage may have tokens: 0 (run to the end)")
      total += s.tokens
      self.boundaries.append(math.ceil(total / tokens_per_step))

  def stage_at(self, step: int) -> int:
    return sum(step >= b for b in self.boundaries)


def pick_task(weights: dict[str, float], emitted: dict[str, int], exclude=()) -> str | None:
  """The task with the largest token deficit (ties: the order of records.TASKS), or None when
  every task with a share is excluded (e.g. images when the row holds its maximum)."""
  live = [t for t in TASKS if weights.get(t, 0) > 0 and t not in exclude]
  if not live:
    return None
  return min(live, key=lambda t: (emitted.get(t, 0) / weights[t], TASKS.index(t)))
