"""The `AudioTokenizer` interface every pipeline stage codes against, and how one is named.

Tokenizers are pluggable so the same Beam pipeline runs with the built-in k-means codebooks
(tests, the committed corpus) or the official ones (Paraformer encoder + 1024-centroid k-means
for linguistic codes, CosyVoice's 4096-code tokenizer for semantic codes): wrap those models in a
class with these four members and pass `--tokenizer my_module:make_tokenizer`.
"""

import importlib
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class AudioTokenizer(Protocol):
  """Dual-codebook speech tokenizer over 16 kHz mono peak-normalised float32 audio."""

  linguistic_frame_ms: int  # 60 in Step-Audio (16.7 Hz)
  semantic_frame_ms: int  # 40 in Step-Audio (25 Hz)
  linguistic_codes: int  # codebook size, 1024 in Step-Audio
  semantic_codes: int  # 4096 in Step-Audio

  def linguistic(self, wave16k: np.ndarray) -> np.ndarray:
    """int32 codes in [0, linguistic_codes), one per linguistic frame."""
    ...

  def semantic(self, wave16k: np.ndarray) -> np.ndarray:
    """int32 codes in [0, semantic_codes), one per semantic frame."""
    ...


def load_tokenizer(spec: str) -> AudioTokenizer:
  """Build a tokenizer from a spec string, resolvable on any Beam worker.

  "kmeans:PATH" loads the built-in codebooks from a safetensors file; "module:function" calls
  `function()` from an importable module (how external tokenizers plug in).
  """
  kind, _, arg = spec.partition(":")
  if kind == "kmeans":
    from data_pipelines.kmeans_tokenizer import KMeansDualTokenizer
    return KMeansDualTokenizer.load(arg)
  tok = getattr(importlib.import_module(kind), arg)()
  if not isinstance(tok, AudioTokenizer):
    raise TypeError(f"{spec} returned {type(tok).__name__}, which is not an AudioTokenizer")
  return tok
