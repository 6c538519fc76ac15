"""Examples -> training segments: each task's prompt format and the tokens it learns.

A segment is one packed document: `tokens` (inputs), `targets` (next tokens) and `types`, the
TokenType of each target, PAD where the target is not learned (so loss_mask = types != PAD).

  text                   <bos> text <eos>                                    loss: all
  audio_continuation     <bos> audio <eos>                                   loss: audio, eos
  audio_text_interleaved <bos> text_0 audio_0 text_1 audio_1 ... <eos>       loss: all
  asr    <bos><|BOT|>system\\n{asr_prompt}<|EOT|><|BOT|>human\\n{audio}<|EOT|>
         <|BOT|>assistant\\n{transcript}<|EOT|>                               loss: transcript, EOT
  tts    <bos><|BOT|>system\\n{tts_prompt}<|EOT|><|BOT|>human\\n({tag})...{text}<|EOT|>
         <|BOT|>assistant\\n{audio}<|EOT|>                                    loss: audio, EOT
  image_text  <bos> <image placeholder> x tokens_per_image caption <eos>     loss: caption, eos
"""

import dataclasses

import numpy as np
from jaxtyping import Float, Int

from stepaudio_jax.data.interleave import interleave
from stepaudio_jax.data.records import Example
from stepaudio_jax.data.tokenizer import Tokenizer
from stepaudio_jax.models.tokens import TokenLayout, TokenType
from stepaudio_jax.models.vision import VisionConfig

# Metadata keys whose values become TTS instruction tags, in this order, e.g. "(happy 1)".
TAG_KEYS = ("emotion", "language", "dialect", "style", "speed", "instruction")


@dataclasses.dataclass
class Segment:
  tokens: Int[np.ndarray, " N"]
  targets: Int[np.ndarray, " N"]
  types: Int[np.ndarray, " N"]  # TokenType of each target; PAD = no loss
  task: str
  image: Float[np.ndarray, "S S C"] | None = None

  def __len__(self) -> int:
    return len(self.tokens)


@dataclasses.dataclass(frozen=True)
class TemplateContext:
  layout: TokenLayout
  vision: VisionConfig
  tokenizer: Tokenizer
  codebooks: str = "dual"
  asr_prompt: str = "Transcribe the speech."
  tts_prompt: str = "Speaker {speaker}; tags: emotion, language, dialect, style, speed."


class _Builder:
  """Accumulates (ids, learned type) parts; ids of a part with type PAD are context only."""

  def __init__(self, ctx: TemplateContext):
    self.ctx, self.ids, self.types = ctx, [], []
    self.add([ctx.layout.bos_id], TokenType.PAD)

  def add(self, ids, learn):
    ids = np.asarray(ids, np.int32).reshape(-1)
    self.ids.append(ids)
    self.types.append(np.broadcast_to(np.asarray(learn, np.int32), ids.shape))

  def text(self, s: str, learn=TokenType.PAD):
    self.add(self.ctx.tokenizer.encode(s), learn)

  def turn(self, role: str, body, learn_body: bool):
    """<|BOT|>{role}\\n{body}<|EOT|>; body is a callable adding parts, learned with the EOT."""
    lay = self.ctx.layout
    self.add([lay.bot_id], TokenType.PAD)
    self.text(f"{role}\n")
    body()
    self.add([lay.eos_id], TokenType.TEXT if learn_body else TokenType.PAD)

  def audio(self, ling, sem, learn: bool):
    ids, types = interleave(ling, sem, self.ctx.layout, self.ctx.codebooks)
    self.add(ids, types if learn else TokenType.PAD)

  def segment(self, task: str, image=None) -> Segment:
    ids, types = np.concatenate(self.ids), np.concatenate(self.types)
    return Segment(ids[:-1], ids[1:], types[1:].astype(np.int32), task, image)


def _image_pixels(image: np.ndarray, vision: VisionConfig) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [S, S, C] in [-1, 1] (nearest-neighbour resize)."""
  s = vision.image_size
  rows = np.arange(s) * image.shape[0] // s
  cols = np.arange(s) * image.shape[1] // s
  px = image[rows][:, cols].astype(np.float32) / 127.5 - 1.0
  if vision.channels == 1:
    return px.mean(-1, keepdims=True)
  if vision.channels != 3:
    raise ValueError(f"images are RGB; vision.channels={vision.channels} is not 1 or 3")
  return px


def tts_tags(metadata: dict) -> str:
  return "".join(f"({metadata[k]})" for k in TAG_KEYS if metadata.get(k) not in (None, ""))


def render(ex: Example, ctx: TemplateContext) -> Segment:
  """One example in its task's format (module docstring), with the loss it needs."""
  b, lay = _Builder(ctx), ctx.layout
  text, ling, sem = ex.text, ex.linguistic, ex.semantic
  if ex.task == "text":
    b.add(text[0], TokenType.TEXT)
  elif ex.task == "audio_continuation":
    b.audio(ling[0], sem[0], learn=True)
  elif ex.task == "audio_text_interleaved":
    for t, l, s in zip(text, ling, sem):
      b.add(t, TokenType.TEXT)
      b.audio(l, s, learn=True)
  elif ex.task == "asr":
    b.turn("system", lambda: b.text(ctx.asr_prompt), learn_body=False)
    b.turn("human", lambda: b.audio(ling[0], sem[0], learn=False), learn_body=False)
    b.turn("assistant", lambda: b.add(text[0], TokenType.TEXT), learn_body=True)
    return b.segment(ex.task)
  elif ex.task == "tts":
    speaker = str(ex.metadata.get("speaker", "default"))
    b.turn("system", lambda: b.text(ctx.tts_prompt.format(speaker=speaker)), learn_body=False)
    b.turn("human", lambda: (b.text(tts_tags(ex.metadata)), b.add(text[0], TokenType.PAD)),
           learn_body=False)
    b.turn("assistant", lambda: b.audio(ling[0], sem[0], learn=True), learn_body=True)
    return b.segment(ex.task)
  elif ex.task == "image_text":
    if not ctx.vision.enabled:
      raise ValueError("image_text examples need vision.enabled=true")
    b.add(np.full(ctx.vision.tokens_per_image, lay.image_placeholder_id), TokenType.PAD)
    b.add(text[0], TokenType.IMAGE_CAPTION)
    b.add([lay.eos_id], TokenType.TEXT)
    return b.segment(ex.task, _image_pixels(ex.image, ctx.vision))
  else:
    raise ValueError(f"unknown task {ex.task!r}")
  b.add([lay.eos_id], TokenType.TEXT)
  return b.segment(ex.task)
