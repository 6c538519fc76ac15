"""Synthetic captioned images: coloured shapes drawn with numpy.

Image-text pairs need captions that are exactly right, so images are generated from their
description: one to three shapes (circle, square, triangle) in the grammar's colours, at a
position (left / middle / right), on a plain background; the caption is written in English and
Mandarin from the same description.
"""

import dataclasses
import random

import numpy as np

from data_pipelines.grammar import COLOURS

RGB = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60),
       "yellow": (235, 215, 30), "black": (15, 15, 15), "white": (250, 250, 250)}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
PLACES = {"left": "左边", "middle": "中间", "right": "右边"}
BACKGROUND = (128, 128, 128)  # grey, distinct from every shape colour
_NUMS_ZH = {1: "一", 2: "两", 3: "三"}


@dataclasses.dataclass(frozen=True)
class Item:
  shape: str
  colour: str
  place: str


def draw(items: list[Item], size: int) -> np.ndarray:
  """Render items into a uint8 [size, size, 3] image; each item fills one third of the width."""
  img = np.empty((size, size, 3), np.uint8)
  img[:] = BACKGROUND
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  third = size / 3
  for it in items:
    cx, cy, r = (list(PLACES).index(it.place) + 0.5) * third, size / 2, third * 0.42
    if it.shape == "circle":
      mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    elif it.shape == "square":
      mask = (abs(xx - cx) <= r * 0.85) & (abs(yy - cy) <= r * 0.85)
    else:  # triangle, apex up
      mask = (yy >= cy - r) & (yy <= cy + r) & (abs(xx - cx) <= (yy - (cy - r)) / 2)
    img[mask] = RGB[it.colour]
  return img


def caption(items: list[Item], language: str) -> str:
  """Left-to-right description of the items."""
  items = sorted(items, key=lambda it: list(PLACES).index(it.place))
  zh_colour = {en: zh for en, zh, _, _ in COLOURS}
  if language == "english":
    parts = [f"a {it.colour} {it.shape} on the {it.place}" if it.place != "middle"
             else f"a {it.colour} {it.shape} in the middle" for it in items]
    head = f"{len(items)} shape{'s' if len(items) > 1 else ''}: "
    return head + ", ".join(parts) + "."
  parts = [f"{PLACES[it.place]}是一个{zh_colour[it.colour]}的{SHAPES[it.shape]}" for it in items]
  return f"{_NUMS_ZH[len(items)]}个图形：" + "，".join(parts) + "。"


def sample(rng: random.Random) -> list[Item]:
  """One to three items at distinct places."""
  places = rng.sample(list(PLACES), rng.randint(1, 3))
  return [Item(rng.choice(list(SHAPES)), rng.choice(list(RGB)), p) for p in places]
