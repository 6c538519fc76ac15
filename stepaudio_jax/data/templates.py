"""Examples -> training segments: each task's prompt format and the tokens it learns.

A segment is one packed document: `tokens` (inputs), `targets` (next tokens) and `types`, the
TokenType of each target, PAD where the target is not learned (so loss_mask = types != PAD).
Turns are `<|BOT|>{role}\\n{body}<|EOT|>`; a learned body is learned with its <|EOT|>.

  text                   <bos> text <eos>                                    loss: all
  audio_continuation     <bos> audio <eos>                                   loss: audio, eos
  audio_text_interleaved <bos> text_0 audio_0 text_1 audio_1 ... <eos>       loss: all
  asr   <bos> system: {asr_prompt}  human: {audio}  assistant: {transcript}  loss: transcript
  tts   <bos> system: {tts_prompt}  human: ({tag})...{text}  assistant: {audio}
                                                                             loss: audio
  tts with a voice prompt (two chunks; report section 5.1.2):
        <bos> system: {tts_prompt}  human: {prompt text}  assistant: {prompt audio}
              human: ({tag})...{target text}  assistant: {target audio}       loss: target audio
  aqta  <bos> system: {aqta_prompt}  human: {text}  assistant: {text} ...  (history, as text)
              human: {question audio}  assistant: {answer}                   loss: answer
  image_text  <bos> <image placeholder> x tokens_per_image caption <eos>     loss: caption, eos
"""

import dataclasses

import numpy as np
from jaxtyping import Float, Int

from stepaudio_jax.config.data import DataConfig
from stepaudio_jax.config.model import TokenLayout, VisionConfig
from stepaudio_jax.data.interleave import interleave
from stepaudio_jax.data.records import Example, task_of
from stepaudio_jax.data.tokenizer import Tokenizer, make_tokenizer
from stepaudio_jax.models.tokens import TokenType

# Metadata keys whose values become TTS instruction tags, in this order, e.g. "(happy 1)", when
# the example has no ready-made `instruction` prefix such as "(Cantonese)(fast 1)".
TAG_KEYS = ("emotion", "language", "dialect", "style", "speed")


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
  aqta_prompt: str = "You are a helpful voice assistant. Answer the user in text."


def template_context(data: DataConfig, layout: TokenLayout, vision: VisionConfig
                     ) -> TemplateContext:
  """The formats a run's data section configures (tokenizer, codebooks, system prompts)."""
  return TemplateContext(layout, vision, make_tokenizer(data.tokenizer_model, layout),
                         data.codebooks, data.asr_prompt, data.tts_prompt, data.aqta_prompt)


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
  """The instruction prefix of a TTS target: metadata["instruction"] when present (the corpus
  writes the whole prefix, e.g. "(English)(slow 1)"; a bare "RAP" becomes "(RAP)"), else one
  "(value)" per TAG_KEYS entry; normal speed and a dialect repeating the language are no tags."""
  instruction = str(metadata.get("instruction", ""))
  if instruction:
    return instruction if instruction.startswith("(") else f"({instruction})"
  tags = []
  for k in TAG_KEYS:
    v = str(metadata.get(k, ""))
    if v and v != "normal" and v.lower() not in (t.lower() for t in tags):
      tags.append(v)
  return "".join(f"({t})" for t in tags)


def _tts(b: _Builder, ex: Example, ctx: TemplateContext) -> None:
  """System prompt, then an optional voice prompt exchange (not learned), then the target."""
  speaker = str(ex.metadata.get("speaker", "default"))
  b.turn("system", lambda: b.text(ctx.tts_prompt.format(speaker=speaker)), learn_body=False)
  if len(ex.text) == 2:
    b.turn("human", lambda: b.add(ex.text[0], TokenType.PAD), learn_body=False)
    b.turn("assistant", lambda: b.audio(ex.linguistic[0], ex.semantic[0], learn=False),
           learn_body=False)
  b.turn("human", lambda: (b.text(tts_tags(ex.metadata)), b.add(ex.text[-1], TokenType.PAD)),
         learn_body=False)
  b.turn("assistant", lambda: b.audio(ex.linguistic[-1], ex.semantic[-1], learn=True),
         learn_body=True)


def _aqta(b: _Builder, ex: Example, ctx: TemplateContext) -> None:
  """Text history turns, the spoken question, then the answer: the only learned turn."""
  b.turn("system", lambda: b.text(ctx.aqta_prompt), learn_body=False)
  for i, said in enumerate(ex.text[:-2]):
    b.turn(("human", "assistant")[i % 2], lambda t=said: b.add(t, TokenType.PAD), learn_body=False)
  b.turn("human", lambda: b.audio(ex.linguistic[-2], ex.semantic[-2], learn=False),
         learn_body=False)
  b.turn("assistant", lambda: b.add(ex.text[-1], TokenType.TEXT), learn_body=True)


def dialogue_prompt(ctx: TemplateContext, history: list[np.ndarray], question_text: np.ndarray,
                    question_audio: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
  """The ids before an AQTA answer (as _aqta renders them): <bos>, system, the text history,
  the question (audio if given, else text), and the assistant turn's opening; the reward
  model's prompt and PPO's."""
  b = _Builder(ctx)
  b.turn("system", lambda: b.text(ctx.aqta_prompt), learn_body=False)
  for i, said in enumerate(history):
    b.turn(("human", "assistant")[i % 2], lambda t=said: b.add(t, TokenType.PAD), learn_body=False)
  if question_audio is not None:
    b.turn("human", lambda: b.audio(*question_audio, learn=False), learn_body=False)
  else:
    b.turn("human", lambda: b.add(question_text, TokenType.PAD), learn_body=False)
  b.add([ctx.layout.bot_id], TokenType.PAD)
  b.text("assistant\n")
  return np.concatenate(b.ids).astype(np.int32)


def asr_prompt(ctx: TemplateContext, linguistic: np.ndarray, semantic: np.ndarray) -> np.ndarray:
  """The ids before an ASR transcript (as `render` writes an asr example): <bos>, the system
  turn, the spoken turn and the assistant turn's opening; greedy decoding from here to the
  turn's end is the model's transcript."""
  b = _Builder(ctx)
  b.turn("system", lambda: b.text(ctx.asr_prompt), learn_body=False)
  b.turn("human", lambda: b.audio(linguistic, semantic, learn=False), learn_body=False)
  b.add([ctx.layout.bot_id], TokenType.PAD)
  b.text("assistant\n")
  return np.concatenate(b.ids).astype(np.int32)


def render(ex: Example, ctx: TemplateContext) -> Segment:
  """One example in its task's format (module docstring), with the loss it needs."""
  b, lay, task = _Builder(ctx), ctx.layout, task_of(ex)
  text, ling, sem = ex.text, ex.linguistic, ex.semantic
  if task == "text":
    b.add(text[0], TokenType.TEXT)
  elif task == "audio_continuation":
    b.audio(ling[0], sem[0], learn=True)
  elif task == "audio_text_interleaved":
    for t, l, s in zip(text, ling, sem):
      b.add(t, TokenType.TEXT)
      b.audio(l, s, learn=True)
  elif task == "asr":
    b.turn("system", lambda: b.text(ctx.asr_prompt), learn_body=False)
    b.turn("human", lambda: b.audio(ling[0], sem[0], learn=False), learn_body=False)
    b.turn("assistant", lambda: b.add(text[0], TokenType.TEXT), learn_body=True)
    return b.segment(task)
  elif task == "tts":
    _tts(b, ex, ctx)
    return b.segment(task)
  elif task == "aqta":
    _aqta(b, ex, ctx)
    return b.segment(task)
  elif task == "image_text":
    if not ctx.vision.enabled:
      raise ValueError("image_text examples need vision.enabled=true")
    b.add(np.full(ctx.vision.tokens_per_image, lay.image_placeholder_id), TokenType.PAD)
    b.add(text[0], TokenType.IMAGE_CAPTION)
    b.add([lay.eos_id], TokenType.TEXT)
    return b.segment(task, _image_pixels(ex.image, ctx.vision))
  else:
    raise ValueError(f"unknown task {task!r}")
  b.add([lay.eos_id], TokenType.TEXT)
  return b.segment(task)
