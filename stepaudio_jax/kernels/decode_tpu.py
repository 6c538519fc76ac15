"""Decode attention as a Pallas TPU (Mosaic) kernel: a few new queries against a KV cache.

Grid (batch, kv head, row block, key block). A program holds one row block of the G*T query
rows of its kv head (decode_layout.py) and folds the cache in key blocks with the online
softmax, so each key block is read from HBM once per kv head, whatever G and T are. The cache
stays in the model's [B, S, K, H] layout: the block spec squeezes the kv-head axis, so no
transpose or copy of the cache happens outside the kernel. The number of filled slots is a
scalar-prefetch argument: key blocks past it are neither computed nor fetched (their index
map repeats the last live block, which Pallas does not copy again), so a step reads the
filled part of the cache only. On CPU the same kernel runs with interpret=True (tests).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

from stepaudio_jax.kernels import decode_layout, tiles

ROW_MULTIPLE = 8  # sublanes


@dataclasses.dataclass(frozen=True)
class _Static:
  bias: str
  causal: bool
  br: int
  bk: int
  interpret: bool


def _head(ref, h):
  """Kv head h of a [bk, K, H] key/value block, or the whole [bk, H] block when K == 1."""
  return ref[...] if len(ref.shape) == 2 else ref[:, h, :]


def _kernel(length_ref, qseg_ref, qpos_ref, slope_ref, kseg_ref, kpos_ref, q_ref, k_ref, v_ref,
            o_ref, m_sc, l_sc, acc_sc, *, st):
  j = pl.program_id(2)

  @pl.when(j == 0)
  def _():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(j * st.bk < length_ref[0])
  def _():
    qseg, qpos, kseg, kpos = qseg_ref[...], qpos_ref[...], kseg_ref[...], kpos_ref[...]
    for h in range(q_ref.shape[0]):  # kv heads: a few per chip, unrolled
      q = q_ref[h]
      s = tiles.dot(q, _head(k_ref, h), tiles.DIMS_NT) * (q.shape[-1] ** -0.5)
      s = decode_layout.masked_logits(s, qseg, qpos, kseg, kpos, slope_ref[h], j * st.bk,
                                      length_ref[0], bias=st.bias, causal=st.causal)
      m, l, acc = tiles.online_softmax_step(s, _head(v_ref, h), m_sc[h], l_sc[h], acc_sc[h])
      m_sc[h], l_sc[h], acc_sc[h] = m, l, acc

  @pl.when(j == pl.num_programs(2) - 1)
  def _():
    o_ref[...] = (acc_sc[...] / l_sc[...]).astype(o_ref.dtype)


def _call(st, g: decode_layout.Grouped, k, v, kv_seg, kv_pos, length):
  b, kvh, r, hd = g.q.shape
  s = k.shape[1]

  def live(j, length_ref):  # the last live key block for any later j
    return jnp.minimum(j, tiles.div(length_ref[0] - 1, st.bk))

  q_spec = pl.BlockSpec((None, kvh, st.br, hd), lambda b_, i, j, n: (b_, 0, i, 0))
  row_spec = pl.BlockSpec((None, st.br, 1), lambda b_, i, j, n: (b_, i, 0))
  slope_spec = pl.BlockSpec((kvh, st.br, 1), lambda b_, i, j, n: (0, i, 0))
  kside_spec = pl.BlockSpec((None, 1, st.bk), lambda b_, i, j, n: (b_, 0, live(j, n)))
  kv_spec = pl.BlockSpec((None, st.bk) + k.shape[2:], lambda b_, i, j, n: (b_, live(j, n), 0, 0)[:k.ndim])
  cache_bytes = 2 * k.size * k.dtype.itemsize
  return pl.pallas_call(
      functools.partial(_kernel, st=st),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, r // st.br, s // st.bk),
          in_specs=[row_spec, row_spec, slope_spec, kside_spec, kside_spec, q_spec, kv_spec,
                    kv_spec],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((kvh, st.br, 1), jnp.float32),
                          pltpu.VMEM((kvh, st.br, 1), jnp.float32),
                          pltpu.VMEM((kvh, st.br, hd), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(g.q.shape, g.q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=st.interpret,
      cost_estimate=pl.CostEstimate(flops=4 * b * kvh * r * s * hd,
                                    transcendentals=b * kvh * r * s,
                                    bytes_accessed=cache_bytes + 2 * g.q.size * g.q.dtype.itemsize),
      name="alibi_decode",
  )(length, g.segment_ids, g.positions, g.slopes, kv_seg[:, None, :], kv_pos[:, None, :],
    g.q, k, v)


def decode_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    slopes: Float[Array, "N"],
    *,
    q_segment_ids: Int[Array, "B T"],
    q_positions: Int[Array, "B T"],
    kv_segment_ids: Int[Array, "B S"],
    kv_positions: Int[Array, "B S"],
    kv_length: Int[Array, ""] | None = None,
    bias: str = "alibi_sqrt",
    causal: bool = True,
    block_rows: int = 256,
    block_k: int = 512,
    interpret: bool = False,
) -> Float[Array, "B T N H"]:
  """Queries at true positions against a KV cache (visibility as in decode_layout); only the
  first kv_length slots are read (None: all). Forward only: decoding needs no gradient."""
  t = q.shape[1]
  br = decode_layout.row_block(q, k.shape[2], block_rows, ROW_MULTIPLE)
  g = decode_layout.group_queries(q, q_segment_ids, q_positions, slopes, k.shape[2], br)
  st = _Static(bias, causal, br, decode_layout.key_block(k.shape[1], block_k), interpret)
  length = decode_layout.live_length(kv_length, k.shape[1])
  if k.shape[2] == 1:  # XLA keeps a size-1 axis outermost; squeezing it is free, a relayout not
    k, v = k[:, :, 0], v[:, :, 0]
  out = _call(st, g, k, v, kv_segment_ids.astype(jnp.int32), kv_positions.astype(jnp.int32),
              length)
  return decode_layout.ungroup(out, g.rows, t)
