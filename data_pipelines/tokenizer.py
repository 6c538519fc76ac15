"""The `AudioTokenizer` interface every pipeline stage codes against, and how one is named.

Tokenizers are pluggable so the same Beam pipeline runs with the built-in k-means codebooks
(tests, the committed corpus) or the official ones (Paraformer encoder + 1024-centroid k-means
for linguistic codes, CosyVoice's 4096-code tokenizer for semantic codes): wrap those models in a
class with these four members and pass `--tokenizer my_module:make_tokenizer`.
"""

import importlib
import os
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


# A tokenizer file's `kind` (its safetensors metadata) -> "module:Class" whose `load(path)` reads
# it; a file without a kind is a k-means one (the committed corpus's audio_tokenizer.safetensors).
FILE_KINDS = {
    "kmeans": "data_pipelines.kmeans_tokenizer:KMeansDualTokenizer",
}
DEFAULT_FILE_KIND = "kmeans"


def load_tokenizer(spec: str) -> AudioTokenizer:
  """Build a tokenizer from a spec string, resolvable on any Beam worker.

  A path to a `.safetensors` file loads it by the `kind` entry of its metadata (FILE_KINDS);
  "kmeans:PATH" loads the built-in codebooks from a safetensors file; "module:function" calls
  `function()` from an importable module (how external tokenizers plug in).
  """
  if spec.startswith("kmeans:"):
    return _load_file(spec.partition(":")[2], "kmeans")
  if spec.endswith(".safetensors"):
    return _load_file(spec, None)
  module, _, function = spec.partition(":")
  if not module or not function:
    raise ValueError(f"audio tokenizer {spec!r} is neither a .safetensors file, kmeans:PATH nor "
                     "module:function")
  tok = getattr(importlib.import_module(module), function)()
  if not isinstance(tok, AudioTokenizer):
    raise TypeError(f"{spec} returned {type(tok).__name__}, which is not an AudioTokenizer")
  return tok


def file_kind(path: str) -> str:
  """The `kind` a tokenizer file's safetensors metadata names (DEFAULT_FILE_KIND without one)."""
  from safetensors import safe_open

  if not os.path.isfile(path):
    raise FileNotFoundError(f"audio tokenizer file {path} does not exist")
  try:
    with safe_open(path, framework="numpy") as f:
      meta = f.metadata() or {}
  except Exception as e:  # safetensors raises its own error type for a file it cannot parse
    raise ValueError(f"audio tokenizer file {path} is not a safetensors file ({e})") from None
  return meta.get("kind", DEFAULT_FILE_KIND)


def _load_file(path: str, kind: str | None) -> AudioTokenizer:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"audio tokenizer file {path} does not exist")
  kind = kind or file_kind(path)
  if kind not in FILE_KINDS:
    raise ValueError(f"audio tokenizer file {path} is of kind {kind!r}; known kinds: "
                     f"{sorted(FILE_KINDS)}")
  module, _, cls = FILE_KINDS[kind].partition(":")
  return getattr(importlib.import_module(module), cls).load(path)
