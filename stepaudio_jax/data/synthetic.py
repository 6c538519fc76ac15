"""Deterministic synthetic batches in the trainer's batch format.

Every row is a pure function of (seed, split, step, global row index), so a batch does not
depend on how many processes load it and resuming needs only the step (the source's state is
None). Split 0 trains; split 1 is eval, read from its step 0 at every eval. The rows are packed
sequences of learnable segments: text (arithmetic progressions), dual-codebook audio (groups of
2 linguistic + 3 semantic codes, each stream a progression) and, with an image encoder, a
solid-colour image followed by a caption that names the colour.

Batch format (shared with the Grain loaders), all [B, T] unless noted:
  tokens, targets (int32), loss_mask (float32), target_types (int32 TokenType),
  segment_ids (int32, 0 = padding), positions (int32, restart at 0 per segment),
  images [B, I, S, S, C] float32 in [-1, 1] when the model has an image encoder.
"""

import numpy as np

from stepaudio_jax.config.data import SyntheticConfig
from stepaudio_jax.config.model import TokenLayout, VisionConfig
from stepaudio_jax.data.packing import empty_row
from stepaudio_jax.data.source import BatchSource, process_rows
from stepaudio_jax.models.tokens import TokenType

NUM_COLOURS = 8
TRAIN_SPLIT, EVAL_SPLIT = 0, 1


def _progression(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
  start, stride = rng.integers(0, size), rng.integers(1, min(size, 7))
  return (start + stride * np.arange(n)) % size


class SyntheticSource(BatchSource):
  def __init__(
      self,
      cfg: SyntheticConfig,
      layout: TokenLayout,
      vision: VisionConfig,
      seq_len: int,
      seed: int,
      global_batch: int = 1,
      split: int = TRAIN_SPLIT,
  ):
    self.cfg, self.layout, self.vision, self.seq_len, self.seed = cfg, layout, vision, seq_len, seed
    self.global_batch, self.split, self.step = global_batch, split, 0
    weights = np.array([cfg.audio_weight, cfg.text_weight, cfg.image_weight if vision.enabled else 0])
    self.probs = weights / weights.sum()

  def _text(self, rng, n):
    lo = 16  # above the special ids
    toks = lo + _progression(rng, n, self.layout.text_vocab_size - lo)
    return toks, np.full(n, TokenType.TEXT)

  def _audio(self, rng, n):
    groups = max(n // 5, 1)
    ling = self.layout.linguistic_offset + _progression(rng, 2 * groups, self.layout.linguistic_codes)
    sem = self.layout.semantic_offset + _progression(rng, 3 * groups, self.layout.semantic_codes)
    toks = np.concatenate([ling.reshape(groups, 2), sem.reshape(groups, 3)], axis=1).reshape(-1)
    types = np.tile([TokenType.AUDIO_LINGUISTIC] * 2 + [TokenType.AUDIO_SEMANTIC] * 3, groups)
    return toks, types

  def _image(self, rng):
    colour = int(rng.integers(0, NUM_COLOURS))
    p = self.vision.tokens_per_image
    caption = 16 + (colour * 97 + np.arange(4) * 13) % (self.layout.text_vocab_size - 16)
    toks = np.concatenate([np.full(p, self.layout.image_placeholder_id), caption])
    types = np.concatenate([np.full(p, TokenType.PAD), np.full(4, TokenType.IMAGE_CAPTION)])
    return toks, types, colour

  def row(self, split: int, step: int, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, split, step, index])
    t, lay = self.seq_len, self.layout
    out = empty_row(t, lay, self.vision)
    image = None
    pos, seg = 0, 0
    while pos < t - 4:
      kind = rng.choice(3, p=self.probs)
      n = int(rng.integers(self.cfg.min_segment, self.cfg.max_segment + 1))
      if kind == 2 and image is None and self.vision.tokens_per_image + 6 <= t - pos:
        body, types, image = self._image(rng)
      elif kind == 0:
        body, types = self._audio(rng, n)
      else:
        body, types = self._text(rng, n)
      seq = np.concatenate([[lay.bos_id], body, [lay.eos_id]])
      seq_types = np.concatenate([types, [TokenType.TEXT]])
      m = min(len(seq) - 1, t - pos)
      seg += 1
      sl = slice(pos, pos + m)
      out["tokens"][sl] = seq[:m]
      out["targets"][sl] = seq[1 : m + 1]
      out["target_types"][sl] = seq_types[:m]
      out["loss_mask"][sl] = (seq_types[:m] != TokenType.PAD).astype(np.float32)
      out["segment_ids"][sl] = seg
      out["positions"][sl] = np.arange(m)
      pos += m
    if image is not None:
      out["images"][0] = np.linspace(-1, 1, NUM_COLOURS)[image]
      out["images"][0, ..., image % self.vision.channels] = 1.0
    return out

  def batch(self, split: int, step: int, rows: range) -> dict[str, np.ndarray]:
    """Rows `rows` of the global batch at `step` (a process asks for its own rows)."""
    items = [self.row(split, step, i) for i in rows]
    return {k: np.stack([it[k] for it in items]) for k in items[0]}

  def next_local(self) -> dict[str, np.ndarray]:
    out = self.batch(self.split, self.step, process_rows(self.global_batch))
    self.step += 1
    return out

  def restore(self, step: int, state: dict | None) -> None:
    self.step = step

  def restart(self, at_step: int) -> None:
    self.step = 0
