"""Stage schedule, token-share mixing, and the start-up check that the shares are reachable.

Weights are shares of TOKENS. Each row stream picks its next example by a deficit rule: the
task whose emitted tokens in the current stage are furthest below its share (smallest
emitted / weight) goes next. Tokens are counted exactly as they are drawn, so the shares match
the configured ones to within one example per stream at every point of the run, with no need
to estimate mean example lengths; the rule is deterministic, so its state is a few counters.

One cap can override the rule: a row holding vision.max_images_per_sequence images draws no
more images, so an image share needing more images per row than that falls short (and every
other task takes a proportional part of the surplus). `predict_shares` packs rows of
sampled example lengths by the loader's own rule (`next_row`) to predict the shares a stage
delivers; `check_shares` stops a mixture whose images fall short before training starts.

Stages switch at a step: stage k ends at the first step whose cumulative training tokens
(step x batch x seq_len) reach the summed budgets of stages 0..k. Every row of a step therefore
belongs to the same stage, whichever process or worker builds it.
"""

import dataclasses
import math
from collections.abc import Sequence

from stepaudio_jax.config import ConfigError
from stepaudio_jax.config.data import TASKS, StageConfig
from stepaudio_jax.data.packing import first_fit

PREDICT_ROWS = 512  # rows packed per prediction: the sampled lengths cycle through them


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


def next_row(st: dict, stage: int, weights: dict[str, float], waiting: list[tuple], fetch,
             seq_len: int, max_images: int, lookahead: int) -> tuple[list[tuple], list[tuple]]:
  """One row of a row stream: first fit (packing.first_fit) of the `waiting` (key, segment)
  pairs, then of new draws by the deficit rule; returns (placed, still waiting). `st` holds the
  stream's stage, the tokens drawn in it (`emitted`) and its draws per task, and is updated.
  `fetch(task, n)` is the stream's n-th example of `task` (None: malformed, skipped). At a stage
  change the waiting segments count as drawn in the new stage, where they are delivered."""
  if stage != st["stage"]:
    st["stage"], st["emitted"] = stage, dict.fromkeys(TASKS, 0)
    for (task, _), seg in waiting:
      st["emitted"][task] += len(seg)

  def draw(images_full: bool) -> tuple | None:
    while True:
      task = pick_task(weights, st["emitted"], exclude=("image_text",) if images_full else ())
      if task is None:
        return None
      n = st["draws"][task]
      st["draws"][task] += 1
      seg = fetch(task, n)
      if seg is not None:
        st["emitted"][task] += len(seg)
        return (task, n), seg

  return first_fit(waiting, draw, seq_len, max_images, lookahead)


def new_stream() -> dict:
  """The state next_row keeps for a stream."""
  return {"stage": 0, "emitted": dict.fromkeys(TASKS, 0), "draws": dict.fromkeys(TASKS, 0)}


@dataclasses.dataclass(frozen=True)
class SegmentSize:
  """What the packing rule reads of a segment: its length and whether it holds an image (None
  when not, as Segment.image), enough to replay a stream without rendering."""

  n: int
  image: bool | None = None

  @classmethod
  def of(cls, task: str, n: int) -> "SegmentSize":
    return cls(n, True if task == "image_text" else None)

  def __len__(self) -> int:
    return self.n


def predict_shares(weights: dict[str, float], lengths: dict[str, Sequence[int]], seq_len: int,
                   max_images: int, lookahead: int, rows: int = PREDICT_ROWS) -> dict[str, float]:
  """Token shares one row stream delivers over `rows` rows when task t's segments have the
  lengths `lengths[t]` (cycled), packed by the loader's rule (next_row)."""
  st, waiting = new_stream(), []
  packed = dict.fromkeys(TASKS, 0)

  def fetch(task: str, n: int) -> SegmentSize:
    return SegmentSize.of(task, min(lengths[task][n % len(lengths[task])], seq_len))

  for _ in range(rows):
    placed, waiting = next_row(st, 0, weights, waiting, fetch, seq_len, max_images, lookahead)
    for (task, _), seg in placed:
      packed[task] += len(seg)
  total = sum(packed.values())
  return {t: packed[t] / total for t in TASKS}


def rows_to_place(schedule: StageSchedule, fetch, need: dict[str, int], step_of_row, seq_len: int,
                  max_images: int, lookahead: int) -> int:
  """Rows a stream packs (next_row, its stage by `step_of_row(row)`) until its first need[t]
  draws of every task t are placed in a row (or skipped as malformed)."""
  st, waiting, rows = new_stream(), [], 0
  while any(st["draws"][t] < k for t, k in need.items()) or any(
      n < need.get(t, 0) for (t, n), _ in waiting):
    stage = schedule.stage_at(step_of_row(rows))
    _, waiting = next_row(st, stage, schedule.weights[stage], waiting, fetch, seq_len,
                          max_images, lookahead)
    rows += 1
  return rows


def _fmt(shares: dict[str, float], weights: dict[str, float]) -> str:
  return ", ".join(f"{t} {shares[t]:.3f} ({weights[t]:.3f})" for t in TASKS if weights[t])


def check_shares(schedule: StageSchedule, lengths: dict[str, Sequence[int]], seq_len: int,
                 max_images: int, lookahead: int, tolerance: float) -> str:
  """Why some stage's predicted image share is more than `tolerance` below its target, and the
  fix; "" when none is. Only the image share has a row cap, so only stages mixing images with
  something else are packed (and only when every task they mix has sampled lengths)."""
  short = {}  # stage -> (weights, predicted shares, images per row that reach the target)
  for k, weights in enumerate(schedule.weights):
    target = weights["image_text"]
    live = {t: lengths.get(t) for t in TASKS if weights[t]}
    if not 0 < target < 1 or not all(live.values()):
      continue
    got = predict_shares(weights, live, seq_len, max_images, lookahead)
    if target - got["image_text"] <= tolerance:
      continue
    most = seq_len // min(lengths["image_text"])  # more images than this never fit a row
    need = next((cap for cap in range(max_images + 1, most + 1) if target - predict_shares(
        weights, live, seq_len, cap, lookahead)["image_text"] <= tolerance), None)
    short[k] = weights, got, need
  if not short:
    return ""
  mean = sum(lengths["image_text"]) / len(lengths["image_text"])
  what = ", ".join(f"stage {k + 1} (data.stages[{k}]) {got['image_text']:.3f} of its "
                   f"{w['image_text']:.3f}" for k, (w, got, _) in short.items())
  shares = "; ".join(f"stage {k + 1} {_fmt(got, w)}" for k, (w, got, _) in short.items())
  needs = [need for _, _, need in short.values()]
  fix = "lower the image weights"
  if None not in needs:
    fix = f"set vision.max_images_per_sequence={max(needs)} or {fix}"
  return (f"token shares out of reach: with vision.max_images_per_sequence={max_images} per "
          f"train.seq_len={seq_len} row (image segments average {mean:.0f} tokens) images get "
          f"only {what} share of the tokens (predicted shares, targets in brackets: {shares}). "
          f"To deliver them, {fix}")


def require_shares(problem: str, accept: bool, warn) -> None:
  """Stop on `problem` (check_shares), or with data.accept_share_shortfall pass it to `warn`."""
  if problem and not accept:
    raise ConfigError(f"{problem}; to train with the predicted shares, set "
                      "data.accept_share_shortfall=true")
  if problem:
    warn("training anyway (data.accept_share_shortfall=true): %s", problem)
