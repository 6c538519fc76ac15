"""Step1's square-root ALiBi: per-head slopes and the bias they make from true positions.

The distance is q_position - kv_position between true (in-segment) positions, never between
packed or cache indices: sqrt is not linear, so no offset cancels out as it does for linear ALiBi.
"""

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


def alibi_sqrt_bias(
    slopes: Float[Array, "N"], q_pos: Int[Array, "B T"], k_pos: Int[Array, "B S"]
) -> Float[Array, "B N T S"]:
  """-slope * sqrt(q_pos - k_pos) from true positions (clamped at 0 for masked pairs)."""
  dist = (q_pos[:, :, None] - k_pos[:, None, :]).astype(jnp.float32)
  dist = jnp.sqrt(jnp.maximum(dist, 0.0))
  return -slopes[None, :, None, None] * dist[:, None, :, :]
