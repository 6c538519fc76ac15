"""Text tokenizers for the templates: sentencepiece when a model is configured, bytes otherwise.

Templates need ids for role words, prompts and instruction tags. No sentencepiece model ships
with the repo, so a byte-level fallback maps every UTF-8 byte to one id above the special ids;
it runs anywhere and keeps every id inside the text block of the layout.
"""

from typing import Protocol

from stepaudio_jax.config.model import TokenLayout

BYTE_OFFSET = 16  # ids below this are reserved for special tokens (pad, bos, eos, BOT, ...)


class Tokenizer(Protocol):
  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 byte b -> id BYTE_OFFSET + b."""

  def __init__(self, layout: TokenLayout):
    if layout.text_vocab_size < BYTE_OFFSET + 256:
      raise ValueError(f"the byte tokenizer needs tokens.text_vocab_size >= {BYTE_OFFSET + 256}, "
                       f"got {layout.text_vocab_size}; configure data.tokenizer_model instead")

  def encode(self, text: str) -> list[int]:
    return [BYTE_OFFSET + b for b in text.encode("utf-8")]

  def decode(self, ids: list[int]) -> str:
    """Text of the byte ids; other ids (specials, audio codes) are left out."""
    return bytes(t - BYTE_OFFSET for t in ids if 0 <= t - BYTE_OFFSET < 256).decode(
        "utf-8", "replace")


class SentencePieceTokenizer:
  """A sentencepiece model whose ids must fit the layout's text block."""

  def __init__(self, model_path: str, layout: TokenLayout):
    import sentencepiece  # optional dependency: only with data.tokenizer_model

    self.model_path = model_path
    self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
    if self._sp.get_piece_size() > layout.text_vocab_size:
      raise ValueError(f"{model_path} has {self._sp.get_piece_size()} pieces, more than "
                       f"tokens.text_vocab_size={layout.text_vocab_size}")

  def __getstate__(self):  # grain workers receive the path, not the C++ object
    return {"model_path": self.model_path, "size": self._sp.get_piece_size()}

  def __setstate__(self, state):
    import sentencepiece

    self.model_path = state["model_path"]
    self._sp = sentencepiece.SentencePieceProcessor(model_file=self.model_path)

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def decode(self, ids: list[int]) -> str:
    """Text of the piece ids; ids past the model's pieces (audio codes) are left out."""
    return self._sp.decode([t for t in ids if 0 <= t < self._sp.get_piece_size()])


def make_tokenizer(model_path: str, layout: TokenLayout) -> Tokenizer:
  return SentencePieceTokenizer(model_path, layout) if model_path else ByteTokenizer(layout)
