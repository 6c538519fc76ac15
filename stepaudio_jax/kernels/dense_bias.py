"""jax.nn.dot_product_attention (cuDNN or XLA) with the sqrt-ALiBi bias and masks materialised.

This is what the public release falls back to: a [B, N, T, T] bias in HBM. It exists for the
cudnn implementation choice and as the benchmark's library baseline.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from stepaudio_jax.kernels.alibi import alibi_slopes, alibi_sqrt_bias
from stepaudio_jax.kernels.layout import default_segments
from stepaudio_jax.kernels.tiles import MASKED


def dense_bias_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B T K H"],
    v: Float[Array, "B T K H"],
    *,
    segment_ids: Int[Array, "B T"] | None,
    positions: Int[Array, "B T"] | None,
    bias: str,
    causal: bool,
    implementation: str,
) -> Float[Array, "B T N H"]:
  """Segments and ALiBi folded into one bias tensor; causality stays with the library.

  Without segment ids the row is one segment and no segment mask is built.
  """
  n = q.shape[2]
  dense = None
  if bias == "alibi_sqrt":
    _, positions = default_segments(segment_ids, positions, q.shape[:2])
    dense = alibi_sqrt_bias(jnp.asarray(alibi_slopes(n)), positions, positions)
  if segment_ids is not None:
    same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    dense = jnp.where(same, 0.0 if dense is None else dense, MASKED)
  if dense is not None:
    dense = dense.astype(q.dtype)
  return jax.nn.dot_product_attention(
      q, k, v, bias=dense, is_causal=causal, implementation=implementation)
