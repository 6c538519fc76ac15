"""The built-in dual-codebook tokenizer: k-means over log-mel frames at Step-Audio's rates.

A stand-in for the official tokenizers with the same interface, rates and code ranges, so the
whole stack (interleave, losses, TTS/ASR data) is exercised on real speech without their weights.
Linguistic: 60 ms frames of 40-bin log-mel, mean-normalised per utterance (removes the speaker's
spectral tilt, keeping phonetic shape), 1024 codes. Semantic: 40 ms frames of 80-bin log-mel
without per-utterance normalisation (keeps coarse acoustics: pitch, loudness, timbre), 4096
codes. Each codebook standardises its stacked frames and projects them with PCA before k-means,
which keeps fitting fast on two cores. Parameters are saved as safetensors (no pickle).
"""

import dataclasses
import json
from collections.abc import Sequence

import numpy as np
from scipy import sparse

from data_pipelines import features


@dataclasses.dataclass(frozen=True)
class CodebookSpec:
  """How one codebook turns a wave into vectors to quantise."""

  frame_ms: int
  codes: int
  n_mels: int
  pca_dim: int
  utterance_norm: bool


LINGUISTIC = CodebookSpec(frame_ms=60, codes=1024, n_mels=40, pca_dim=48, utterance_norm=True)
SEMANTIC = CodebookSpec(frame_ms=40, codes=4096, n_mels=80, pca_dim=64, utterance_norm=False)


def kmeans(x: np.ndarray, k: int, iters: int, rng: np.random.Generator) -> np.ndarray:
  """Lloyd's k-means from k distinct data points; empty clusters are re-seeded on the points
  farthest from their centroid. Returns float32 [k, D]."""
  if len(x) < k:
    raise ValueError(f"{len(x)} frames cannot fit {k} centroids; use a smaller codebook")
  c = x[rng.choice(len(x), k, replace=False)].copy()
  for _ in range(iters):
    assign, dist = nearest(x, c)
    onehot = sparse.csr_matrix((np.ones(len(x), np.float32), (assign, np.arange(len(x)))),
                               shape=(k, len(x)))
    sums = np.asarray(onehot @ x)
    counts = np.bincount(assign, minlength=k)
    live = counts > 0
    c[live] = sums[live] / counts[live, None]
    dead = np.flatnonzero(~live)
    if dead.size:
      c[dead] = x[np.argsort(dist)[-dead.size:]]
  return c.astype(np.float32)


def nearest(x: np.ndarray, c: np.ndarray, block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
  """Index of and squared distance to the nearest centroid for each row, in blocks of rows."""
  c2 = (c * c).sum(1)
  idx, dist = np.empty(len(x), np.int32), np.empty(len(x), np.float32)
  for s in range(0, len(x), block):
    xb = x[s:s + block]
    d = c2[None, :] - 2.0 * xb @ c.T
    idx[s:s + block] = d.argmin(1)
    dist[s:s + block] = d[np.arange(len(xb)), idx[s:s + block]] + (xb * xb).sum(1)
  return idx, dist


@dataclasses.dataclass
class Codebook:
  """A fitted codebook: standardisation, PCA projection and centroids."""

  spec: CodebookSpec
  mean: np.ndarray  # [F]
  scale: np.ndarray  # [F]
  proj: np.ndarray  # [F, pca_dim]
  centroids: np.ndarray  # [codes, pca_dim]

  @staticmethod
  def raw(spec: CodebookSpec, wave: np.ndarray) -> np.ndarray:
    f = features.stacked(wave, spec.n_mels, spec.frame_ms)
    if spec.utterance_norm:
      f = f - f.mean(0, keepdims=True)
    return f

  @classmethod
  def fit(cls, spec: CodebookSpec, waves: Sequence[np.ndarray], max_frames: int, iters: int,
          rng: np.random.Generator) -> "Codebook":
    x = np.concatenate([cls.raw(spec, w) for w in waves])
    if len(x) > max_frames:
      x = x[rng.choice(len(x), max_frames, replace=False)]
    mean, scale = x.mean(0), x.std(0) + 1e-5
    z = (x - mean) / scale
    _, _, vt = np.linalg.svd(z[rng.choice(len(z), min(len(z), 20000), replace=False)],
                             full_matrices=False)
    proj = vt[:spec.pca_dim].T.astype(np.float32)
    centroids = kmeans((z @ proj).astype(np.float32), spec.codes, iters, rng)
    return cls(spec, mean.astype(np.float32), scale.astype(np.float32), proj, centroids)

  def encode(self, wave: np.ndarray) -> np.ndarray:
    z = ((self.raw(self.spec, wave) - self.mean) / self.scale) @ self.proj
    return nearest(z.astype(np.float32), self.centroids)[0]


@dataclasses.dataclass
class KMeansDualTokenizer:
  """`AudioTokenizer` with k-means linguistic and semantic codebooks."""

  ling: Codebook
  sem: Codebook

  @property
  def linguistic_frame_ms(self) -> int:
    return self.ling.spec.frame_ms

  @property
  def semantic_frame_ms(self) -> int:
    return self.sem.spec.frame_ms

  @property
  def linguistic_codes(self) -> int:
    return self.ling.spec.codes

  @property
  def semantic_codes(self) -> int:
    return self.sem.spec.codes

  def linguistic(self, wave16k: np.ndarray) -> np.ndarray:
    return self.ling.encode(wave16k)

  def semantic(self, wave16k: np.ndarray) -> np.ndarray:
    return self.sem.encode(wave16k)

  @classmethod
  def fit(cls, waves: Sequence[np.ndarray], linguistic: CodebookSpec = LINGUISTIC,
          semantic: CodebookSpec = SEMANTIC, max_frames: int = 100_000, iters: int = 15,
          seed: int = 0) -> "KMeansDualTokenizer":
    """Fit both codebooks on 16 kHz waves (a frame subsample of at most max_frames each)."""
    rng = np.random.default_rng(seed)
    return cls(Codebook.fit(linguistic, waves, max_frames, iters, rng),
               Codebook.fit(semantic, waves, max_frames, iters, rng))

  def save(self, path: str) -> None:
    from safetensors.numpy import save_file
    tensors, meta = {}, {}
    for name, cb in (("linguistic", self.ling), ("semantic", self.sem)):
      for field in ("mean", "scale", "proj", "centroids"):
        tensors[f"{name}.{field}"] = np.ascontiguousarray(getattr(cb, field))
      meta[name] = json.dumps(dataclasses.asdict(cb.spec))
    save_file(tensors, path, metadata=meta)

  @classmethod
  def load(cls, path: str) -> "KMeansDualTokenizer":
    from safetensors import safe_open
    with safe_open(path, framework="numpy") as f:
      meta = f.metadata()
      books = [Codebook(CodebookSpec(**json.loads(meta[name])),
                        *(f.get_tensor(f"{name}.{field}")
                          for field in ("mean", "scale", "proj", "centroids")))
               for name in ("linguistic", "semantic")]
    return cls(*books)
