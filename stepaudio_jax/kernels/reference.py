"""XLA attention: the reference every kernel is tested against, and the default path.

Axes: B batch, T query length, S key length, K kv heads, G query heads per kv head, H head dim.
The bias and mask are materialised per query block ([B, K, G, Tq, S]); with `query_block`, a
causal query block only meets the keys up to its own end, which skips the masked upper triangle
(about half the work at long lengths). Results do not depend on the block size: masked logits
contribute exactly zero.
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


def _attend_block(q, k, v, q_seg, k_seg, q_pos, k_pos, q_start, bias, causal):
  """One query block [B, Tq, N, H] against keys [B, S, K, H]."""
  b, tq, n, h = q.shape
  s, kv = k.shape[1], k.shape[2]
  g = n // kv
  # Head-major operands: the einsums then read and write [B, K, G, Tq, S] without transposing
  # it (on CPU the transposes of the T x T tensors cost a fifth of a train step).
  q_bkgth = q.reshape(b, tq, kv, g, h).transpose(0, 2, 3, 1, 4)
  k_bksh, v_bksh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  logits = jnp.einsum("bkgth,bksh->bkgts", q_bkgth, k_bksh, preferred_element_type=jnp.float32)
  logits = logits * (h**-0.5)
  if bias == "alibi_sqrt":
    slopes = jnp.asarray(alibi_slopes(n))
    logits = logits + alibi_sqrt_bias(slopes, q_pos, k_pos).reshape(b, kv, g, tq, s)
  mask = q_seg[:, :, None] == k_seg[:, None, :]
  if causal:
    q_idx = q_start + jnp.arange(tq)
    mask = mask & (q_idx[:, None] >= jnp.arange(s)[None, :])[None]
  logits = jnp.where(mask[:, None, None], logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bksh->bkgth", probs, v_bksh, preferred_element_type=jnp.float32)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, tq, n, h)


def xla_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B T K H"],
    v: Float[Array, "B T K H"],
    *,
    segment_ids: Int[Array, "B T"] | None,
    positions: Int[Array, "B T"] | None,
    bias: str,
    causal: bool,
    query_block: int | None = None,
) -> Float[Array, "B T N H"]:
  b, t = q.shape[:2]
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  if segment_ids is None:
    segment_ids = jnp.ones((b, t), jnp.int32)
  block = min(query_block or t, t)
  outs = []
  for start in range(0, t, block):
    end = min(start + block, t)
    keys = end if causal else t
    outs.append(_attend_block(
        q[:, start:end], k[:, :keys], v[:, :keys], segment_ids[:, start:end],
        segment_ids[:, :keys], positions[:, start:end], positions[:, :keys], start, bias, causal))
  return jnp.concatenate(outs, axis=1).astype(q.dtype)
