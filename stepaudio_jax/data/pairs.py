"""Preference pairs and prompts for the reward model and PPO (report section 5).

A `preference` record is a dialogue with two candidate answers: text chunks
[history turns (human, assistant, ...)..., question, chosen, rejected]. The question is text
(TQTA, the reward model's first stage) or audio with empty text (AQTA, the second stage); the
answers are text. `metadata.margin` (optional) is the pair's Bradley-Terry margin.

Both answers render after the same prompt, as the AQTA SFT format does:
  <bos> system: {aqta_prompt}  history turns  human: {question}  assistant: {answer}<|EOT|>
so the reward model reads its score at the <|EOT|> that ends the answer. Rows are right-padded
(segment id 0); a pair too long for a row keeps its end (the answer) and drops the prompt's
beginning: such pairs are counted (data stats `truncated_pairs`, the pairs drawn so far that were
cut) and warned about once per stage. A pair whose chosen answer equals its rejected one teaches
nothing (its loss is ln 2 whatever the model): it is left out of the stage, counted
(`tied_pairs`) and warned about once. PPO's prompts are the same prompts without an answer,
left-padded for the sampler.

"Deaf hacking" (report 5.3): a reward model trained only on human AQTA pairs learns to reward
"I didn't hear clearly" whatever the audio. `counter_pairs` adds, for every pair with a spoken
question, a pair whose rejected answer is that phrase (its chosen answer the real one).
"""

import bisect
import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np

from stepaudio_jax.data.loader import RecordSource, resolve_shards
from stepaudio_jax.data.records import PREFERENCE, Example, ShardError, decode_checked
from stepaudio_jax.data.source import BatchSource, process_rows
from stepaudio_jax.data.templates import TemplateContext, dialogue_prompt

log = logging.getLogger(__name__)
PAIR_SIDES = ("chosen", "rejected")
ROW_FIELDS = ("tokens", "segment_ids", "positions")


def spoken_question(ex: Example) -> bool:
  return bool(ex.linguistic[-3].size or ex.semantic[-3].size)


def prompt_ids(ex: Example, ctx: TemplateContext) -> np.ndarray:
  audio = (ex.linguistic[-3], ex.semantic[-3]) if spoken_question(ex) else None
  return dialogue_prompt(ctx, ex.text[:-3], ex.text[-3], audio)


def answer_ids(answer: np.ndarray, ctx: TemplateContext) -> np.ndarray:
  return np.concatenate([answer, [ctx.layout.eos_id]]).astype(np.int32)


def right_padded(ids: np.ndarray, length: int) -> dict[str, np.ndarray]:
  """One row: the last `length` ids if longer (keep the answer), padded with segment id 0."""
  ids = ids[-length:]
  n = len(ids)
  row = {"tokens": np.zeros(length, np.int32), "segment_ids": np.zeros(length, np.int32),
         "positions": np.zeros(length, np.int32)}
  row["tokens"][:n], row["segment_ids"][:n], row["positions"][:n] = ids, 1, np.arange(n)
  return row


def left_padded(ids: np.ndarray, length: int) -> dict[str, np.ndarray]:
  """One prompt row right-aligned for the sampler (its last `length` ids if longer)."""
  ids = ids[-length:]
  n = len(ids)
  row = {"tokens": np.zeros(length, np.int32), "segment_ids": np.zeros(length, np.int32),
         "positions": np.zeros(length, np.int32)}
  row["tokens"][length - n:], row["segment_ids"][length - n:] = ids, 1
  row["positions"][length - n:] = np.arange(n)
  return row


@dataclasses.dataclass(frozen=True)
class PairStage:
  """The records of one stage and how many passes over them it makes; `key` names the setting
  that gave the globs in errors and warnings."""

  globs: tuple[str, ...]
  epochs: float = 1.0
  key: str = "reward.stages"


class _Items:
  """A stage's pairs: (record index, counter?) for every record, plus a counter pair for every
  spoken question when `counter_answer` is given; read through one RecordSource. With
  `seq_len` (pairs, not prompts) every pair is read once: pairs whose answers are equal are left
  out (`tied`), and `cut[item]` says whether a side of it is longer than a row."""

  def __init__(self, globs: Sequence[str], ctx: TemplateContext, counter_answer: np.ndarray | None,
               key: str, seq_len: int | None = None):
    self.records = RecordSource(resolve_shards(list(globs), key))
    self.ctx, self.key = ctx, key
    self.counter_answer = counter_answer
    items = [(i, False) for i in range(len(self.records))]
    if counter_answer is not None:
      items += [(i, True) for i in range(len(self.records)) if spoken_question(self[i])]
    self.items, self.tied, cut = items, 0, []
    if seq_len is not None:
      self.items, ties, longest = [], [], 0
      for item in items:
        ex, chosen, rejected, _ = self._pair(item)
        if np.array_equal(chosen, rejected):
          ties.append(item)
          continue
        prompt = len(prompt_ids(ex, ctx))
        length = prompt + 1 + max(len(chosen), len(rejected))
        self.items.append(item)
        cut.append(length > seq_len)
        longest = max(longest, length)
      self.tied = len(ties)
      if ties:
        log.warning("%s: %d of %d pairs have the same chosen and rejected answer (first: %s); "
                    "they are left out (data/tied_pairs)", key, len(ties), len(items),
                    self._where(ties[0]))
      if any(cut):
        log.warning("%s: %d of %d pairs are longer than train.seq_len=%d (the longest %d "
                    "tokens): their rows keep the answers and drop the prompt's beginning "
                    "(data/truncated_pairs counts those drawn); raise train.seq_len to keep "
                    "them whole", key, sum(cut), len(self.items), seq_len, longest)
      if not self.items:
        raise ShardError(f"{key}: every one of the {len(items)} pairs has the same chosen and "
                         "rejected answer; nothing to learn from")
    self.cut = np.asarray(cut, bool)

  def _where(self, item: tuple[int, bool]) -> str:
    where = self.records[item[0]][0]
    return where + (" (its counter pair)" if item[1] else "")

  def __getitem__(self, record: int) -> Example:
    where, data = self.records[record]
    ex = decode_checked(data, self.ctx.layout, where)
    if ex.task != PREFERENCE:
      raise ValueError(f"{where}: task {ex.task!r} is not a {PREFERENCE} record")
    return ex

  def _pair(self, item: tuple[int, bool]) -> tuple[Example, np.ndarray, np.ndarray, float]:
    record, counter = item
    ex = self[record]
    rejected = self.counter_answer if counter else ex.text[-1]
    return ex, ex.text[-2], rejected, float(ex.metadata.get("margin", 0.0))

  def pair(self, item: int) -> tuple[Example, np.ndarray, np.ndarray, float]:
    """(example, chosen answer ids, rejected answer ids, margin) of item `item`."""
    return self._pair(self.items[item % len(self.items)])


class PairSource(BatchSource):
  """Pairs for the reward model, stage after stage (each stage `epochs` passes over its pairs in
  a shuffled order), this process's rows of every global batch. Row r of step s is a pure
  function of (seed, stage, s, r), so the state is the step alone."""

  def __init__(self, stages: Sequence[PairStage], ctx: TemplateContext, seq_len: int,
               global_batch: int, seed: int, counter_answer: np.ndarray | None = None):
    self.ctx, self.seq_len, self.global_batch, self.seed = ctx, seq_len, global_batch, seed
    self.stages = [_Items(s.globs, ctx, counter_answer, s.key, seq_len) for s in stages]
    self.steps = [math.ceil(s.epochs * len(items.items) / global_batch)
                  for s, items in zip(stages, self.stages)]
    self.starts = np.cumsum([0] + self.steps).tolist()
    self.step = 0
    self._cut_before = 0  # cut pairs this process drew before self.step

  def total_steps(self) -> int:
    return self.starts[-1]

  def _order(self, stage: int) -> np.ndarray:
    return np.random.default_rng([self.seed, stage]).permutation(len(self.stages[stage].items))

  def row(self, step: int, r: int) -> dict[str, np.ndarray]:
    stage = min(bisect.bisect_right(self.starts, step) - 1, len(self.stages) - 1)
    items = self.stages[stage]
    order = self._order(stage)
    draw = (step - self.starts[stage]) * self.global_batch + r
    ex, chosen, rejected, margin = items.pair(int(order[draw % len(order)]))
    prompt = prompt_ids(ex, self.ctx)
    out = {"margin": np.float32(margin)}
    for side, answer in zip(PAIR_SIDES, (chosen, rejected)):
      row = right_padded(np.concatenate([prompt, answer_ids(answer, self.ctx)]), self.seq_len)
      out |= {f"{side}_{k}": v for k, v in row.items()}
    return out

  def _cut_at(self, step: int) -> int:
    """How many of this process's pairs of `step` have a side longer than a row."""
    stage = min(bisect.bisect_right(self.starts, step) - 1, len(self.stages) - 1)
    items, order = self.stages[stage], self._order(stage)
    draws = (step - self.starts[stage]) * self.global_batch + np.asarray(
        process_rows(self.global_batch))
    return int(items.cut[order[draws % len(order)] % len(items.items)].sum())

  def next_local(self) -> dict[str, np.ndarray]:
    rows = [self.row(self.step, r) for r in process_rows(self.global_batch)]
    self._cut_before += self._cut_at(self.step)
    self.step += 1
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

  def stats(self) -> dict[str, float]:
    """The stage, the pairs drawn so far (this process) that were cut to a row, and the pairs
    left out for equal answers (all stages)."""
    return {"stage": float(min(bisect.bisect_right(self.starts, self.step) - 1,
                               len(self.stages) - 1)),
            "truncated_pairs": float(self._cut_before),
            "tied_pairs": float(sum(items.tied for items in self.stages))}

  def restore(self, step: int, state: dict | None) -> None:
    self.step = step
    self._cut_before = sum(self._cut_at(s) for s in range(step))

  def restart(self, at_step: int) -> None:
    self.step, self._cut_before = 0, 0


class PromptSource(BatchSource):
  """PPO's prompts: the prompts of preference records (the reward model's), left-padded to
  `prompt_len`, in a shuffled endless order; row r of step s is a pure function of the step."""

  def __init__(self, globs: Sequence[str], ctx: TemplateContext, prompt_len: int,
               global_batch: int, seed: int):
    self.items = _Items(globs, ctx, None, "ppo.prompts")
    self.ctx, self.prompt_len, self.global_batch, self.seed = ctx, prompt_len, global_batch, seed
    self.order = np.random.default_rng(seed).permutation(len(self.items.items))
    self.step = 0

  def next_local(self) -> dict[str, np.ndarray]:
    rows = []
    for r in process_rows(self.global_batch):
      draw = self.step * self.global_batch + r
      ex = self.items[self.items.items[int(self.order[draw % len(self.order)])][0]]
      row = left_padded(prompt_ids(ex, self.ctx), self.prompt_len)
      rows.append({f"prompt_{k}": v for k, v in row.items()}
                  | {"spoken": np.int32(spoken_question(ex))})
    self.step += 1
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

  def restore(self, step: int, state: dict | None) -> None:
    self.step = step

  def restart(self, at_step: int) -> None:
    self.step = 0
