"""Dense projections of token activations, as one 2-D matmul over the flattened tokens."""

import math

import chex
import jax.numpy as jnp
from jaxtyping import Array


def project(x: Array, w: Array, contract: int = 1, out_dtype=None) -> Array:
  """x's last `contract` dims times w's first ones, as one 2-D matmul over the flattened tokens.

  The same product as an einsum over [B, T, ...], but its weight gradient then contracts one
  dimension (tokens) instead of two (batch and time). XLA:CPU canonicalises a two-dimension
  contraction by physically transposing the other operand, which cost a tenth of the CPU train
  step (benchmarks/profile_step.py); a flat token axis needs no transpose on any backend.
  """
  lead, inner = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
  k = math.prod(inner)
  chex.assert_equal(w.shape[:contract], inner)
  y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=out_dtype)
  return y.reshape(*lead, *w.shape[contract:])
