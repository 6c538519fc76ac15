"""Per-tile flash-attention math shared by the TPU and GPU kernels.

Everything here works on one [bq, bk] tile held in registers/VMEM: the bias is computed from
positions, never read from memory, so attention memory stays O(T) whatever the bias.
Query-side vectors are columns [bq, 1], key-side vectors rows [1, bk]; both kernels lay them
out that way so the broadcasts below are free.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

MASKED = -1e30  # finite: a row with no live key in a tile gives p = 1 there, later erased
DIMS_NT = (((1,), (1,)), ((), ()))  # a @ b.T
DIMS_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def div(x: Int[Array, ""], d: int) -> Int[Array, ""]:
  """x // d for a non-negative index x and a static block size d, in x's dtype: lax.div needs
  one dtype (a Python int is int64 under jax_enable_x64) and, unlike //, adds no sign ops."""
  return jax.lax.div(x, jnp.asarray(d, x.dtype))


def dot(a: jax.Array, b: jax.Array, dims=(((1,), (0,)), ((), ()))) -> Float[Array, "m n"]:
  """MXU/tensor-core matmul with fp32 accumulation whatever the input dtype."""
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def masked_logits(
    s: Float[Array, "bq bk"],
    q_seg: Int[Array, "bq 1"],
    q_pos: Int[Array, "bq 1"],
    k_seg: Int[Array, "1 bk"],
    k_pos: Int[Array, "1 bk"],
    q_start: jax.Array,
    k_start: jax.Array,
    slope: jax.Array,
    *,
    bias: str,
    causal: bool,
) -> Float[Array, "bq bk"]:
  """Scaled logits plus -slope*sqrt(i-j) from in-segment positions; masked pairs get MASKED.

  Causality uses the packed-sequence index (q_start/k_start + iota), the bias uses positions,
  so packed segments each see their own ALiBi origin.
  """
  if bias == "alibi_sqrt":
    dist = (q_pos - k_pos).astype(jnp.float32)
    s = s - slope * jnp.sqrt(jnp.maximum(dist, 0.0))
  mask = q_seg == k_seg
  if causal:
    rows = q_start + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
    cols = k_start + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    mask = jnp.logical_and(mask, rows >= cols)
  return jnp.where(mask, s, MASKED)


def online_softmax_step(
    s: Float[Array, "bq bk"],
    v: Float[Array, "bk H"],
    m_prev: Float[Array, "bq 1"],
    l_prev: Float[Array, "bq 1"],
    acc_prev: Float[Array, "bq H"],
) -> tuple[Float[Array, "bq 1"], Float[Array, "bq 1"], Float[Array, "bq H"]]:
  """Fold one key tile into the running max, normaliser and unnormalised output."""
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  p = jnp.exp(s - m_new)
  alpha = jnp.exp(m_prev - m_new)
  l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
  acc_new = alpha * acc_prev + dot(p.astype(v.dtype), v)
  return m_new, l_new, acc_new


def probs_and_dlogits(
    s: Float[Array, "bq bk"],
    lse: Float[Array, "bq 1"],
    do: Float[Array, "bq H"],
    v: Float[Array, "bk H"],
    di: Float[Array, "bq 1"],
) -> tuple[Float[Array, "bq bk"], Float[Array, "bq bk"]]:
  """Recompute the tile's probabilities from the saved logsumexp and d(loss)/d(logits)."""
  p = jnp.exp(s - lse)
  dp = dot(do, v, DIMS_NT)
  return p, p * (dp - di)
