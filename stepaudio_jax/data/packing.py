"""Segments -> one fixed-length row in the trainer's batch format.

Segments are laid end to end; segment_ids number them from 1 (0 = padding, which the model's
attention mask keeps apart), positions restart at 0 in every segment, and the n-th image of the
row goes with the n-th run of image placeholders (models/omni.py places features in order).
What goes in a row is `first_fit`; which task is drawn next is the caller's (the loader's
streams, and the share prediction of mixture.py, run the same rule).
"""

from collections.abc import Callable, Sequence

import numpy as np

from stepaudio_jax.config.model import TokenLayout, VisionConfig
from stepaudio_jax.data.templates import Segment
from stepaudio_jax.models.tokens import TokenType


def empty_row(seq_len: int, layout: TokenLayout, vision: VisionConfig) -> dict[str, np.ndarray]:
  row = {
      "tokens": np.full(seq_len, layout.pad_id, np.int32),
      "targets": np.full(seq_len, layout.pad_id, np.int32),
      "loss_mask": np.zeros(seq_len, np.float32),
      "target_types": np.zeros(seq_len, np.int32),
      "segment_ids": np.zeros(seq_len, np.int32),
      "positions": np.zeros(seq_len, np.int32),
  }
  if vision.enabled:
    row["images"] = np.zeros((vision.max_images_per_sequence, vision.image_size,
                              vision.image_size, vision.channels), np.float32)
  return row


def pack_row(
    segments: Sequence[Segment], seq_len: int, layout: TokenLayout, vision: VisionConfig
) -> dict[str, np.ndarray]:
  """Lay `segments` (which must fit: total length <= seq_len) into one row."""
  row = empty_row(seq_len, layout, vision)
  pos, images = 0, 0
  for i, seg in enumerate(segments, start=1):
    n = len(seg)
    if pos + n > seq_len:
      raise ValueError(f"segments need {pos + n} positions, the row has {seq_len}")
    sl = slice(pos, pos + n)
    row["tokens"][sl], row["targets"][sl] = seg.tokens, seg.targets
    row["target_types"][sl] = seg.types
    row["loss_mask"][sl] = seg.types != TokenType.PAD
    row["segment_ids"][sl] = i
    row["positions"][sl] = np.arange(n)
    if seg.image is not None:
      if images >= vision.max_images_per_sequence:
        raise ValueError(f"more than vision.max_images_per_sequence={images} images in a row")
      row["images"][images] = seg.image
      images += 1
    pos += n
  return row


def first_fit(waiting: Sequence[tuple], draw: Callable[[bool], tuple | None], seq_len: int,
              max_images: int, lookahead: int) -> tuple[list[tuple], list[tuple]]:
  """One row's (key, segment) pairs, first fit: the `waiting` ones in order, then `draw(full)`
  (full: the row holds max_images images, so draw no image) until the row is full, `lookahead`
  segments wait or `draw` returns None. Returns (placed, still waiting), in order.

  The first waiting segment always fits the empty row (segments are cut to seq_len), and new ones
  queue behind it, so a waiting segment is placed within `lookahead` rows.
  """
  placed, left, used, images = [], [], 0, 0

  def place(item: tuple) -> None:
    nonlocal used, images
    seg = item[1]
    if used + len(seg) <= seq_len and (seg.image is None or images < max_images):
      placed.append(item)
      used, images = used + len(seg), images + (seg.image is not None)
    else:
      left.append(item)

  for item in waiting:
    place(item)
  while used < seq_len and len(left) < lookahead:
    item = draw(images >= max_images)
    if item is None:
      break
    place(item)
  return placed, left


def truncate(seg: Segment, n: int) -> Segment:
  """The first n positions (an image segment keeps all its placeholders: n must cover them)."""
  return Segment(seg.tokens[:n], seg.targets[:n], seg.types[:n], seg.task, seg.image)
