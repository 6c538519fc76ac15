"""Position encodings: Step1's square-root ALiBi slopes and, for Llama-style ablations, RoPE."""

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi slopes; heads beyond the largest power of two take odd powers of 2**(-4/n)."""
  n = 2 ** math.floor(math.log2(num_heads))
  slopes = [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]
  base = 2.0 ** (-4.0 / n)
  slopes += [base ** (2 * m - 1) for m in range(1, num_heads - n + 1)]
  return np.asarray(slopes, dtype=np.float32)


def apply_rope(
    x: Float[Array, "B T N H"], positions: Int[Array, "B T"], theta: float
) -> Float[Array, "B T N H"]:
  """Rotate-half RoPE (the Llama/transformers convention, so exports match)."""
  half = x.shape[-1] // 2
  freqs = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions[..., None].astype(jnp.float32) * freqs[None, None, :]  # [B, T, H/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
