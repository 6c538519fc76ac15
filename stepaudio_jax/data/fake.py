"""Random but valid example shards, for tests and the loader benchmark (no real corpus needed)."""

import os

import numpy as np

from stepaudio_jax.config.data import TASKS
from stepaudio_jax.config.model import TokenLayout
from stepaudio_jax.data.records import Example, write_shard


def random_example(task: str, rng: np.random.Generator, layout: TokenLayout,
                   min_len: int = 4, max_len: int = 40) -> Example:
  """An example of `task` with lengths in [min_len, max_len) per stream (audio at 2:3 rates)."""
  n = int(rng.integers(min_len, max_len))

  def codes(size, count):
    return rng.integers(0, size, count).astype(np.int32)

  empty = np.zeros(0, np.int32)
  chunks = {"audio_text_interleaved": 2, "aqta": 4}.get(task, 1)
  text = [codes(layout.text_vocab_size - 16, n) + 16 for _ in range(chunks)]
  ling = [codes(layout.linguistic_codes, 2 * n // 3) for _ in range(chunks)]
  sem = [codes(layout.semantic_codes, n) for _ in range(chunks)]
  if task == "text":
    ling, sem = [empty], [empty]
  if task in ("audio_continuation", "image_text"):
    text = [empty] if task == "audio_continuation" else text
    ling, sem = ([empty], [empty]) if task == "image_text" else (ling, sem)
  if task == "aqta":  # a text exchange, then the spoken question and the text answer
    text[2] = empty
    ling, sem = [empty, empty, ling[2], empty], [empty, empty, sem[2], empty]
  image = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8) if task == "image_text" else None
  meta = {"speaker": "spk0", "emotion": "happy 1", "speed": "slow 1"} if task == "tts" else {}
  return Example(task, text, ling, sem, image, meta)


def write_fake_shards(directory: str, layout: TokenLayout, per_task: int = 32, shards: int = 2,
                      seed: int = 0, tasks=TASKS, **lengths) -> dict[str, list[str]]:
  """`shards` ArrayRecord files per task under `directory`; returns data.shards (task -> globs)."""
  rng = np.random.default_rng(seed)
  out = {}
  for task in tasks:
    for s in range(shards):
      path = os.path.join(directory, f"{task}-{s:05d}-of-{shards:05d}.arrayrecord")
      write_shard(path, (random_example(task, rng, layout, **lengths)
                         for _ in range(per_task // shards)))
    out[task] = [os.path.join(directory, f"{task}-*.arrayrecord")]
  return out
