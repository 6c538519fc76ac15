"""Flash attention with sqrt-ALiBi, GQA and packed segments as Pallas TPU (Mosaic) kernels.

Layout inside the kernels is [B, heads, T, H] so a tile's last two dims are (sequence, head_dim)
as Mosaic wants. Query head h reads kv head h // G through the index maps (K/V are never
repeated); causal key blocks past the diagonal are skipped, and their index maps are clamped to
the last live block so no DMA is issued for them. The backward recomputes probabilities from the
saved logsumexp: one kernel for dq, one for dk/dv that reduces over the G query heads of a kv
head and all query blocks.
On CPU the same kernels run with interpret=True (tests).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

from stepaudio_jax.kernels import flops, layout, tiles


@dataclasses.dataclass(frozen=True)
class _Static:
  bias: str
  causal: bool
  bq: int
  bk: int
  interpret: bool


def _tile_logits(st, slopes_ref, h, i, j, q, k, qseg_ref, qpos_ref, kseg_ref, kpos_ref):
  scale = q.shape[-1] ** -0.5
  s = tiles.dot(q, k, tiles.DIMS_NT) * scale
  slope = slopes_ref[h] if st.bias == "alibi_sqrt" else None
  return tiles.masked_logits(
      s, qseg_ref[...], qpos_ref[...], kseg_ref[...], kpos_ref[...], i * st.bq, j * st.bk,
      slope, bias=st.bias, causal=st.causal)


def _live(st, i, j):
  return layout.causal_block_live(i, j, st.bq, st.bk) if st.causal else j >= 0


def _fwd_kernel(slopes_ref, qseg_ref, qpos_ref, kseg_ref, kpos_ref, q_ref, k_ref, v_ref,
                o_ref, lse_ref, m_sc, l_sc, acc_sc, *, st):
  h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(_live(st, i, j))
  def _():
    s = _tile_logits(st, slopes_ref, h, i, j, q_ref[...], k_ref[...],
                     qseg_ref, qpos_ref, kseg_ref, kpos_ref)
    m, l, acc = tiles.online_softmax_step(s, v_ref[...], m_sc[...], l_sc[...], acc_sc[...])
    m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    l = l_sc[...]
    o_ref[...] = (acc_sc[...] / l).astype(o_ref.dtype)
    lse_ref[...] = m_sc[...] + jnp.log(l)


def _dq_kernel(slopes_ref, qseg_ref, qpos_ref, kseg_ref, kpos_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, di_ref, dq_ref, dq_sc, *, st):
  h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(_live(st, i, j))
  def _():
    q, k = q_ref[...], k_ref[...]
    s = _tile_logits(st, slopes_ref, h, i, j, q, k, qseg_ref, qpos_ref, kseg_ref, kpos_ref)
    _, ds = tiles.probs_and_dlogits(s, lse_ref[...], do_ref[...], v_ref[...], di_ref[...])
    dq_sc[...] += tiles.dot(ds.astype(k.dtype), k) * (q.shape[-1] ** -0.5)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(slopes_ref, qseg_ref, qpos_ref, kseg_ref, kpos_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, di_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, st, groups):
  kh, j, g, i = pl.program_id(1), pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when((g == 0) & (i == 0))
  def _():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(_live(st, i, j))
  def _():
    q, k, do = q_ref[...], k_ref[...], do_ref[...]
    s = _tile_logits(st, slopes_ref, kh * groups + g, i, j, q, k,
                     qseg_ref, qpos_ref, kseg_ref, kpos_ref)
    p, ds = tiles.probs_and_dlogits(s, lse_ref[...], do, v_ref[...], di_ref[...])
    dv_sc[...] += tiles.dot(p.astype(do.dtype), do, tiles.DIMS_TN)
    dk_sc[...] += tiles.dot(ds.astype(q.dtype), q, tiles.DIMS_TN) * (q.shape[-1] ** -0.5)

  @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
  def _():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _side_specs(st, qmap, kmap):
  """Segment ids/positions: query side as columns [B, T, 1], key side as rows [B, 1, T]."""
  q_spec = pl.BlockSpec((None, st.bq, 1), lambda *ids: (ids[0], qmap(*ids), 0))
  k_spec = pl.BlockSpec((None, 1, st.bk), lambda *ids: (ids[0], 0, kmap(*ids)))
  return [pl.BlockSpec(memory_space=pltpu.SMEM), q_spec, q_spec, k_spec, k_spec]


def _params(n_parallel, n_arbitrary):
  return pltpu.CompilerParams(
      dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary)


def _cost(st, q, k, v, matmuls, passes):
  """Tell XLA what a kernel costs so cost_analysis and the scheduler see it."""
  b, n, t, hd = q.shape
  nbytes = sum(x.size * x.dtype.itemsize for x in (q, k, v))
  return pl.CostEstimate(
      flops=int(flops.attention_flops(b, t, n, hd, st.causal, matmuls)),
      transcendentals=int(passes * flops.attention_exps(b, t, n, st.causal)),
      bytes_accessed=int(2 * nbytes))


def _query_major_specs(st, q, k):
  """Grid (batch, head, query block, key block) and its specs, shared by forward and dq."""
  b, n, t, hd = q.shape
  groups = n // k.shape[1]
  kmap = ((lambda b_, h, i, j: jnp.minimum(j, layout.last_live_k_block(i, st.bq, st.bk)))
          if st.causal else (lambda b_, h, i, j: j))
  q_spec = pl.BlockSpec((None, None, st.bq, hd), lambda b_, h, i, j: (b_, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, st.bk, hd),
                         lambda b_, h, i, j: (b_, h // groups, kmap(b_, h, i, j), 0))
  row_spec = pl.BlockSpec((None, None, st.bq, 1), lambda b_, h, i, j: (b_, h, i, 0))
  return (b, n, t // st.bq, t // st.bk), kmap, q_spec, kv_spec, row_spec


def _forward(st, q, k, v, seg, pos, slopes):
  b, n, t, hd = q.shape
  grid, kmap, q_spec, kv_spec, lse_spec = _query_major_specs(st, q, k)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, st=st),
      grid=grid,
      in_specs=_side_specs(st, lambda b_, h, i, j: i, kmap) + [q_spec, kv_spec, kv_spec],
      out_specs=[q_spec, lse_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, n, t, 1), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((st.bq, 1), jnp.float32), pltpu.VMEM((st.bq, 1), jnp.float32),
                      pltpu.VMEM((st.bq, hd), jnp.float32)],
      compiler_params=_params(3, 1),
      interpret=st.interpret,
      cost_estimate=_cost(st, q, k, v, flops.FWD_MATMULS, 1),
      name="alibi_flash_fwd",
  )(slopes, seg[:, :, None], pos[:, :, None], seg[:, None, :], pos[:, None, :], q, k, v)


def _backward_dq(st, q, k, v, seg, pos, slopes, do, lse, di):
  grid, kmap, q_spec, kv_spec, row_spec = _query_major_specs(st, q, k)
  return pl.pallas_call(
      functools.partial(_dq_kernel, st=st),
      grid=grid,
      in_specs=_side_specs(st, lambda b_, h, i, j: i, kmap)
      + [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((st.bq, q.shape[3]), jnp.float32)],
      compiler_params=_params(3, 1),
      interpret=st.interpret,
      cost_estimate=_cost(st, q, k, v, 3, 1),
      name="alibi_flash_dq",
  )(slopes, seg[:, :, None], pos[:, :, None], seg[:, None, :], pos[:, None, :],
    q, k, v, do, lse, di)


def _backward_dkv(st, q, k, v, seg, pos, slopes, do, lse, di):
  b, n, t, hd = q.shape
  kvh = k.shape[1]
  groups = n // kvh
  nq, nk = t // st.bq, t // st.bk
  qmap = ((lambda b_, kh, j, g, i: jnp.maximum(i, layout.first_live_q_block(j, st.bq, st.bk)))
          if st.causal else (lambda b_, kh, j, g, i: i))
  q_spec = pl.BlockSpec((None, None, st.bq, hd),
                        lambda b_, kh, j, g, i: (b_, kh * groups + g, qmap(b_, kh, j, g, i), 0))
  row_spec = pl.BlockSpec((None, None, st.bq, 1),
                          lambda b_, kh, j, g, i: (b_, kh * groups + g, qmap(b_, kh, j, g, i), 0))
  kv_spec = pl.BlockSpec((None, None, st.bk, hd), lambda b_, kh, j, g, i: (b_, kh, j, 0))
  return pl.pallas_call(
      functools.partial(_dkv_kernel, st=st, groups=groups),
      grid=(b, kvh, nk, groups, nq),
      in_specs=_side_specs(st, qmap, lambda b_, kh, j, g, i: j)
      + [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((st.bk, hd), jnp.float32), pltpu.VMEM((st.bk, hd), jnp.float32)],
      compiler_params=_params(3, 2),
      interpret=st.interpret,
      cost_estimate=_cost(st, q, k, v, flops.BWD_MATMULS - 3, 1),
      name="alibi_flash_dkv",
  )(slopes, seg[:, :, None], pos[:, :, None], seg[:, None, :], pos[:, None, :],
    q, k, v, do, lse, di)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, seg, pos, slopes):
  return _forward(st, q, k, v, seg, pos, slopes)[0]


def _flash_fwd(st, q, k, v, seg, pos, slopes):
  o, lse = _forward(st, q, k, v, seg, pos, slopes)
  return o, (q, k, v, seg, pos, slopes, o, lse)


def _flash_bwd(st, res, do):
  q, k, v, seg, pos, slopes, o, lse = res
  di = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
  dq = _backward_dq(st, q, k, v, seg, pos, slopes, do, lse, di)
  dk, dv = _backward_dkv(st, q, k, v, seg, pos, slopes, do, lse, di)
  return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B T K H"],
    v: Float[Array, "B T K H"],
    slopes: Float[Array, "N"],
    *,
    segment_ids: Int[Array, "B T"] | None = None,
    positions: Int[Array, "B T"] | None = None,
    bias: str = "alibi_sqrt",
    causal: bool = True,
    block_sizes: layout.BlockSizes = layout.BlockSizes(512, 512),
    interpret: bool = False,
) -> Float[Array, "B T N H"]:
  """Differentiable TPU flash attention; slopes are passed in so head-sharded callers slice them."""
  t = q.shape[1]
  blocks = block_sizes.fit(t, 8)
  padded = layout.pad_to_blocks(q, k, v, segment_ids, positions, blocks.padded_length(t))
  st = _Static(bias, causal, blocks.block_q, blocks.block_k, interpret)
  to_heads = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
  out = _flash(st, to_heads(padded.q), to_heads(padded.k), to_heads(padded.v),
               padded.segment_ids, padded.positions, slopes.astype(jnp.float32))
  return to_heads(out)[:, :t]
