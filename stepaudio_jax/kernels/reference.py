"""XLA attention: the reference every kernel is tested against, and the default path.

Axes: B batch, T query length, S key length, K kv heads, G query heads per kv head, H head dim.
The bias and mask are materialised per query block ([B, K, G, Tq, S]). Self-attention is causal
by index: with `query_block`, a query block only meets the keys up to its own end, which skips
the masked upper triangle (about half the work at long lengths). Queries against a KV cache are
causal by true positions and meet every slot. Results do not depend on the block size: masked
logits contribute exactly zero.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from stepaudio_jax.kernels.alibi import alibi_slopes, alibi_sqrt_bias
from stepaudio_jax.kernels.layout import default_segments

_MASKED = -1e30  # finite so fully masked rows cannot produce NaN


def _attend_block(q, k, v, q_seg, k_seg, q_pos, k_pos, q_start, bias, causal):
  """One query block [B, Tq, N, H] against keys [B, S, K, H].

  q_start: the block's first query index (causality by index); None: causality by positions.
  """
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
  if causal and q_start is None:
    mask = mask & (k_pos[:, None, :] <= q_pos[:, :, None])
  elif causal:
    q_idx = q_start + jnp.arange(tq)
    mask = mask & (q_idx[:, None] >= jnp.arange(s)[None, :])[None]
  logits = jnp.where(mask[:, None, None], logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bksh->bkgth", probs, v_bksh, preferred_element_type=jnp.float32)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, tq, n, h)


def xla_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    q_segment_ids: Int[Array, "B T"] | None,
    q_positions: Int[Array, "B T"] | None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    kv_positions: Int[Array, "B S"] | None = None,
    bias: str,
    causal: bool,
    query_block: int | None = None,
) -> Float[Array, "B T N H"]:
  """Without kv segment ids/positions: self-attention (S == T), causal by index; with them
  (both): queries against a KV cache, causal by true positions (kv_position <= q_position)."""
  t = q.shape[1]
  q_segment_ids, q_positions = default_segments(q_segment_ids, q_positions, q.shape[:2])
  by_position = kv_positions is not None
  if not by_position:
    kv_segment_ids, kv_positions = q_segment_ids, q_positions
  block = min(query_block or t, t)
  outs = []
  for start in range(0, t, block):
    end = min(start + block, t)
    keys = end if causal and not by_position else k.shape[1]
    outs.append(_attend_block(
        q[:, start:end], k[:, :keys], v[:, :keys], q_segment_ids[:, start:end],
        kv_segment_ids[:, :keys], q_positions[:, start:end], kv_positions[:, :keys],
        None if by_position else start, bias, causal))
  return jnp.concatenate(outs, axis=1).astype(q.dtype)
