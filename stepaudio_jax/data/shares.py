"""Delivered token shares counted from the packed batches themselves, not the loader's counters.

Each packed segment is classified by its token ids alone: a run of image placeholders is
image_text; a chat segment (`<bos><|BOT|>system ...`) is asr or aqta when its system turn is that
task's prompt, else tts; any other segment is text, audio_continuation or
audio_text_interleaved by whether it holds text ids, audio ids or both. The per-stage table is
what `stepaudio shares CONFIG [key=value ...] --steps N` prints.
"""

import collections

import numpy as np

from stepaudio_jax.config.data import DataConfig, TASKS
from stepaudio_jax.config.model import TokenLayout
from stepaudio_jax.data.mixture import StageSchedule
from stepaudio_jax.data.tokenizer import make_tokenizer


class SegmentClassifier:
  """The record task of one packed segment (its input tokens), from its ids."""

  def __init__(self, data: DataConfig, layout: TokenLayout):
    tok = make_tokenizer(data.tokenizer_model, layout)
    system = tok.encode("system\n")
    self.layout = layout
    self.prompts = {"asr": system + tok.encode(data.asr_prompt),
                    "aqta": system + tok.encode(data.aqta_prompt)}

  def __call__(self, tokens: np.ndarray) -> str:
    lay = self.layout
    if (tokens == lay.image_placeholder_id).any():
      return "image_text"
    if len(tokens) > 1 and tokens[1] == lay.bot_id:
      system_turn = tokens[2:].tolist()
      for task, prompt in self.prompts.items():
        if system_turn[: len(prompt) + 1] == prompt + [lay.eos_id]:
          return task
      return "tts"
    body = tokens[1:]
    if not (body >= lay.linguistic_offset).any():
      return "text"
    text = (body < lay.linguistic_offset).any()
    return "audio_text_interleaved" if text else "audio_continuation"


def count_tokens(batch: dict[str, np.ndarray], classify: SegmentClassifier) -> dict[str, int]:
  """Packed tokens per task in `batch` (rows x positions), segment by segment."""
  out = collections.Counter()
  for tokens, seg_ids in zip(batch["tokens"], batch["segment_ids"]):
    for s in np.unique(seg_ids[seg_ids > 0]):
      mine = seg_ids == s
      out[classify(tokens[mine])] += int(mine.sum())
  return out


def share_of(counts: dict[str, int]) -> dict[str, float]:
  """Each task's fraction of the counted tokens."""
  total = sum(counts.values())
  return {t: counts.get(t, 0) / total for t in TASKS}


def measure(cfg, steps: int) -> list[dict]:
  """Per stage reached in `steps` steps of cfg's training loader: its first step, packed tokens
  by task counted here, the configured shares, and the loader's own `share/<task>` stats at the
  stage's last step."""
  from stepaudio_jax.data.loader import GrainLoader  # jax and grain only when measuring

  tc = cfg.train
  loader = GrainLoader(cfg.data, cfg.tokens, cfg.vision, tc.seq_len, tc.batch_size, tc.seed)
  schedule = StageSchedule(cfg.data.stages, tc.batch_size * tc.seq_len)
  classify = SegmentClassifier(cfg.data, cfg.tokens)
  stages: list[dict] = []
  for step in range(steps):
    k = schedule.stage_at(step)
    if not stages or stages[-1]["stage"] != k:
      stages.append({"stage": k, "first_step": step, "counts": collections.Counter(),
                     "target": schedule.weights[k]})
    stages[-1]["counts"].update(count_tokens(loader.next_local(), classify))
    stats = loader.stats()
    stages[-1]["loader"] = {t: stats.get(f"share/{t}", 0.0) for t in TASKS}
  return stages


def table(stages: list[dict]) -> str:
  """One block per stage: task, configured share, delivered share (counted here), difference,
  and the share the loader's own counters report."""
  lines = []
  for s in stages:
    total = sum(s["counts"].values())
    lines.append(f"stage {s['stage'] + 1} (from step {s['first_step']}, {total:,} tokens)")
    lines.append(f"  {'task':24} {'target':>7} {'delivered':>9} {'diff':>7} {'loader':>7}")
    got = share_of(s["counts"])
    for t in TASKS:
      if s["target"][t] or got[t]:
        lines.append(f"  {t:24} {s['target'][t]:7.3f} {got[t]:9.3f} "
                     f"{got[t] - s['target'][t]:+7.3f} {s['loader'][t]:7.3f}")
  return "\n".join(lines)
