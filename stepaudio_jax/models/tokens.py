"""Token layout of the unified vocabulary: text, then dual-codebook audio, then reserved ids.

The real layout (facts.md section 2) puts text below 65,536, linguistic codes at 65,536 + c and
semantic codes at 65,536 + 1,024 + s. Tiny configs shrink every block but keep the order, so the
same code (interleave, loss by token type, vocabulary expansion) runs at every scale.
"""

import enum


class TokenType(enum.IntEnum):
  """Kinds of target token; the loss is reported per kind."""

  PAD = 0
  TEXT = 1
  AUDIO_LINGUISTIC = 2
  AUDIO_SEMANTIC = 3
  IMAGE_CAPTION = 4
