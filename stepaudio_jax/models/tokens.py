"""Token layout of the unified vocabulary: text, then dual-codebook audio, then reserved ids.

The real layout (facts.md section 2) puts text below 65,536, linguistic codes at 65,536 + c and
semantic codes at 65,536 + 1,024 + s. Tiny configs shrink every block but keep the order, so the
same code (interleave, loss by token type, vocabulary expansion) runs at every scale.
"""

import dataclasses
import enum


class TokenType(enum.IntEnum):
  """Kinds of target token; the loss is reported per kind."""

  PAD = 0
  TEXT = 1
  AUDIO_LINGUISTIC = 2
  AUDIO_SEMANTIC = 3
  IMAGE_CAPTION = 4


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """Where each kind of token lives in the vocabulary."""

  text_vocab_size: int = 65536  # sentencepiece ids stay below this
  linguistic_codes: int = 1024  # 16.7 Hz codebook
  semantic_codes: int = 4096  # 25 Hz codebook
  bos_id: int = 1
  eos_id: int = 3  # also <|EOT|>
  pad_id: int = 0
  bot_id: int = 4  # <|BOT|>

  def __post_init__(self):
    if self.text_vocab_size <= 0:
      raise ValueError(f"text_vocab_size must be positive, got {self.text_vocab_size}")
    if self.linguistic_codes < 0 or self.semantic_codes < 0:
      raise ValueError("linguistic_codes and semantic_codes must be >= 0 (0 for a text-only model)")
    if max(self.bos_id, self.eos_id, self.pad_id, self.bot_id) >= self.text_vocab_size:
      raise ValueError("special token ids must lie inside the text vocabulary")

  @property
  def linguistic_offset(self) -> int:
    return self.text_vocab_size

  @property
  def semantic_offset(self) -> int:
    return self.text_vocab_size + self.linguistic_codes

  @property
  def audio_tokens(self) -> int:
    return self.linguistic_codes + self.semantic_codes

  @property
  def image_placeholder_id(self) -> int:
    """First reserved id after the audio block; marks where image features go."""
    return self.semantic_offset + self.semantic_codes

  def min_vocab_size(self, with_images: bool) -> int:
    """Ids the model must be able to emit: text, audio codes and, with images, the placeholder."""
    return self.image_placeholder_id + int(with_images)
