"""XLA reference attention: the numbers every kernel is tested against.

Axes: B batch, T query length, S key length, K kv heads, G query heads per kv head, H head dim.
The bias matrix is materialised here ([B, K, G, T, S]); the Pallas kernels compute it per block.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from stepaudio_jax.models.positional import alibi_slopes

_MASKED = -1e30  # finite so fully masked rows cannot produce NaN


def alibi_sqrt_bias(
    slopes: Float[Array, "N"], q_pos: Int[Array, "B T"], k_pos: Int[Array, "B S"]
) -> Float[Array, "B N T S"]:
  """-slope * sqrt(i - j) from in-segment positions (clamped at 0 for masked pairs)."""
  dist = (q_pos[:, :, None] - k_pos[:, None, :]).astype(jnp.float32)
  dist = jnp.sqrt(jnp.maximum(dist, 0.0))
  return -slopes[None, :, None, None] * dist[:, None, :, :]


def attention_mask(
    segment_ids: Int[Array, "B T"] | None, batch: int, t: int, causal: bool
) -> jax.Array:
  """Boolean [B, T, T]: causal in sequence order, no attention across segments."""
  mask = jnp.ones((batch, t, t), dtype=bool)
  if causal:
    mask = mask & jnp.tril(jnp.ones((t, t), dtype=bool))[None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return mask


def xla_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B T K H"],
    v: Float[Array, "B T K H"],
    *,
    segment_ids: Int[Array, "B T"] | None,
    positions: Int[Array, "B T"] | None,
    bias: str,
    causal: bool,
) -> Float[Array, "B T N H"]:
  b, t, n, h = q.shape
  kv = k.shape[2]
  g = n // kv
  qg = q.reshape(b, t, kv, g, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
  logits = logits * (h**-0.5)
  if bias == "alibi_sqrt":
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    slopes = jnp.asarray(alibi_slopes(n))
    logits = logits + alibi_sqrt_bias(slopes, positions, positions).reshape(b, kv, g, t, t)
  mask = attention_mask(segment_ids, b, t, causal)
  logits = jnp.where(mask[:, None, None], logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q.dtype)
