"""Audio codes -> token ids: the report's 2:3 dual-codebook interleave or one codebook alone.

Dual: groups = min(len(linguistic) // 2, len(semantic) // 3); each group is 2 linguistic then
3 semantic tokens (120 ms); leftovers of either stream are dropped so both stay aligned in time.
Single-codebook modes exist for the ablation: the whole stream of one codebook, nothing dropped.
"""

import numpy as np
from jaxtyping import Int

from stepaudio_jax.config.model import TokenLayout
from stepaudio_jax.models.tokens import TokenType

_GROUP_TYPES = np.array([TokenType.AUDIO_LINGUISTIC] * 2 + [TokenType.AUDIO_SEMANTIC] * 3,
                        np.int32)


def interleave(
    linguistic: Int[np.ndarray, " L"],
    semantic: Int[np.ndarray, " S"],
    layout: TokenLayout,
    codebooks: str = "dual",
) -> tuple[Int[np.ndarray, " N"], Int[np.ndarray, " N"]]:
  """(ids, TokenType per id) of one audio span."""
  ling = layout.linguistic_offset + np.asarray(linguistic, np.int32)
  sem = layout.semantic_offset + np.asarray(semantic, np.int32)
  if codebooks == "linguistic":
    return ling, np.full(len(ling), TokenType.AUDIO_LINGUISTIC, np.int32)
  if codebooks == "semantic":
    return sem, np.full(len(sem), TokenType.AUDIO_SEMANTIC, np.int32)
  if codebooks != "dual":
    raise ValueError(f"codebooks must be dual, semantic or linguistic, got {codebooks!r}")
  groups = min(len(ling) // 2, len(sem) // 3)
  ids = np.concatenate([ling[: 2 * groups].reshape(groups, 2),
                        sem[: 3 * groups].reshape(groups, 3)], axis=1).reshape(-1)
  return ids.astype(np.int32), np.tile(_GROUP_TYPES, groups)
