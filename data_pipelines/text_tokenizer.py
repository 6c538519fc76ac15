"""A small sentencepiece Unigram model (byte fallback) trained on the corpus text.

Its special ids match `stepaudio_jax.models.tokens.TokenLayout`: pad 0, bos 1, unk 2,
eos / <|EOT|> 3, <|BOT|> 4, so text ids drop straight into the unified vocabulary; byte
fallback means any string (e.g. a character the grammar never used) still encodes.

Chinese is cut into characters before training (a delimiter around every CJK character, which
sentencepiece's `pretokenization_delimiter` never lets a piece cross): trained on unspaced
Chinese, single pieces span whole phrases (`▁十七减九等于`), and a held-out sentence then needs
pieces no training transcript holds, so no model could produce them.
"""

import io
import re
from collections.abc import Iterable

import numpy as np

SPECIALS = {"pad_id": 0, "bos_id": 1, "unk_id": 2, "eos_id": 3}
USER_SYMBOLS = ["<|BOT|>"]  # id 4
DELIMITER = "\t"
# CJK symbols and punctuation, extension A, unified ideographs, compatibility, full-width forms.
_CJK = re.compile("([\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef])")


def split_cjk(line: str) -> str:
  """`line` with the delimiter on both sides of each CJK character (for training only)."""
  return _CJK.sub(DELIMITER + r"\1" + DELIMITER, line.replace(DELIMITER, " "))


def train(lines: Iterable[str], model_path: str, vocab_size: int) -> None:
  """Train and write `model_path` (a serialised protobuf, not a pickle)."""
  import sentencepiece as spm
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([split_cjk(line) for line in lines]), model_writer=model,
      model_type="unigram", vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0,
      user_defined_symbols=USER_SYMBOLS, hard_vocab_limit=False, split_digits=True,
      normalization_rule_name="identity", pretokenization_delimiter=DELIMITER,
      num_threads=2, minloglevel=2, **SPECIALS)
  with open(model_path, "wb") as f:
    f.write(model.getvalue())


class TextTokenizer:
  """Encode text to int32 ids with a trained model."""

  def __init__(self, model_path: str):
    import sentencepiece as spm
    self.sp = spm.SentencePieceProcessor(model_file=model_path)

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.sp.encode(text), np.int32)

  def decode(self, ids: np.ndarray) -> str:
    return self.sp.decode([int(i) for i in ids])
