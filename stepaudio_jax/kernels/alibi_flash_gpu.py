"""Flash attention with sqrt-ALiBi, GQA and packed segments as Pallas GPU (Triton) kernels.

Triton style: the grid runs over (query block, batch, head) and each program loops over key
blocks itself, stopping at the causal diagonal. Tensors stay in the model's [B, T, heads, H]
layout (the head axis is squeezed by the BlockSpecs, so no transposes); query head h reads kv
head h // G. The dk/dv program of kv head kh loops over its G query heads and the query blocks
at or after the diagonal, so GQA gradients are reduced in registers, not by an XLA sum.
On CPU the same kernels run with interpret=True (tests).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from stepaudio_jax.kernels import layout, tiles


@dataclasses.dataclass(frozen=True)
class _Static:
  bias: str
  causal: bool
  bq: int
  bk: int
  num_warps: int
  num_stages: int
  interpret: bool


def _logits(st, q, k, slope, seg_ref, pos_ref, q_start, k_start):
  scale = q.shape[-1] ** -0.5
  rows, cols = pl.ds(q_start, st.bq), pl.ds(k_start, st.bk)
  s = tiles.dot(q, k, tiles.DIMS_NT) * scale
  return tiles.masked_logits(
      s, seg_ref[rows][:, None], pos_ref[rows][:, None], seg_ref[cols][None, :],
      pos_ref[cols][None, :], q_start, k_start, slope, bias=st.bias, causal=st.causal)


def _k_blocks_end(st, i, t):
  """Key blocks a query block needs: up to the diagonal when causal."""
  if st.causal:
    return tiles.div(i * st.bq + st.bq + st.bk - 1, st.bk)
  return t // st.bk


def _fwd_kernel(slope_ref, seg_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, st):
  i = pl.program_id(0)
  q = q_ref[...]
  slope = slope_ref[...][None, :]

  def body(j, carry):
    cols = pl.ds(j * st.bk, st.bk)
    s = _logits(st, q, k_ref[cols, :], slope, seg_ref, pos_ref, i * st.bq, j * st.bk)
    return tiles.online_softmax_step(s, v_ref[cols, :], *carry)

  init = (jnp.full((st.bq, 1), -jnp.inf, jnp.float32), jnp.zeros((st.bq, 1), jnp.float32),
          jnp.zeros(q.shape, jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, _k_blocks_end(st, i, k_ref.shape[0]), body, init)
  o_ref[...] = (acc / l).astype(o_ref.dtype)
  lse_ref[...] = jnp.squeeze(m + jnp.log(l), axis=1)


def _dq_kernel(slope_ref, seg_ref, pos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref,
               dq_ref, *, st):
  i = pl.program_id(0)
  q, do = q_ref[...], do_ref[...]
  lse, di = lse_ref[...][:, None], di_ref[...][:, None]
  slope = slope_ref[...][None, :]

  def body(j, dq):
    cols = pl.ds(j * st.bk, st.bk)
    k = k_ref[cols, :]
    s = _logits(st, q, k, slope, seg_ref, pos_ref, i * st.bq, j * st.bk)
    _, ds = tiles.probs_and_dlogits(s, lse, do, v_ref[cols, :], di)
    return dq + tiles.dot(ds.astype(k.dtype), k)

  dq = jax.lax.fori_loop(0, _k_blocks_end(st, i, k_ref.shape[0]), body,
                         jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * q.shape[-1] ** -0.5).astype(dq_ref.dtype)


def _dkv_kernel(slope_ref, seg_ref, pos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref,
                dk_ref, dv_ref, *, st, groups):
  j = pl.program_id(0)
  t = q_ref.shape[0]
  cols = pl.ds(j * st.bk, st.bk)
  k, v = k_ref[cols, :], v_ref[cols, :]
  first = layout.first_live_q_block(j, st.bq, st.bk) if st.causal else 0

  def over_heads(g, carry):
    slope = slope_ref[g][None, None]

    def over_q(i, carry):
      dk, dv = carry
      rows = pl.ds(i * st.bq, st.bq)
      q, do = q_ref[rows, g, :], do_ref[rows, g, :]
      s = _logits(st, q, k, slope, seg_ref, pos_ref, i * st.bq, j * st.bk)
      p, ds = tiles.probs_and_dlogits(s, lse_ref[g, rows][:, None], do, v,
                                      di_ref[g, rows][:, None])
      return (dk + tiles.dot(ds.astype(q.dtype), q, tiles.DIMS_TN),
              dv + tiles.dot(p.astype(do.dtype), do, tiles.DIMS_TN))

    return jax.lax.fori_loop(first, t // st.bq, over_q, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, groups, over_heads, (zeros, zeros))
  dk_ref[cols, :] = (dk * k.shape[-1] ** -0.5).astype(dk_ref.dtype)
  dv_ref[cols, :] = dv.astype(dv_ref.dtype)


def _call(st, kernel, grid, in_specs, out_specs, out_shape, name):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages),
      interpret=st.interpret, name=name)


def _forward(st, q, k, v, seg, pos, slopes):
  b, t, n, hd = q.shape
  groups = n // k.shape[2]
  q_spec = pl.BlockSpec((None, st.bq, None, hd), lambda i, b_, h: (b_, i, h, 0))
  kv_spec = pl.BlockSpec((None, t, None, hd), lambda i, b_, h: (b_, 0, h // groups, 0))
  side = pl.BlockSpec((None, t), lambda i, b_, h: (b_, 0))
  return _call(
      st, functools.partial(_fwd_kernel, st=st), (t // st.bq, b, n),
      [pl.BlockSpec((None, 1), lambda i, b_, h: (h, 0)), side, side, q_spec, kv_spec, kv_spec],
      [q_spec, pl.BlockSpec((None, None, st.bq), lambda i, b_, h: (b_, h, i))],
      [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
      "alibi_flash_fwd_gpu",
  )(slopes[:, None], seg, pos, q, k, v)


def _backward(st, q, k, v, seg, pos, slopes, do, lse, di):
  b, t, n, hd = q.shape
  kvh = k.shape[2]
  groups = n // kvh
  q_spec = pl.BlockSpec((None, st.bq, None, hd), lambda i, b_, h: (b_, i, h, 0))
  kv_spec = pl.BlockSpec((None, t, None, hd), lambda i, b_, h: (b_, 0, h // groups, 0))
  side = pl.BlockSpec((None, t), lambda i, b_, h: (b_, 0))
  row = pl.BlockSpec((None, None, st.bq), lambda i, b_, h: (b_, h, i))
  dq = _call(
      st, functools.partial(_dq_kernel, st=st), (t // st.bq, b, n),
      [pl.BlockSpec((None, 1), lambda i, b_, h: (h, 0)), side, side,
       q_spec, kv_spec, kv_spec, q_spec, row, row],
      q_spec, jax.ShapeDtypeStruct(q.shape, q.dtype), "alibi_flash_dq_gpu",
  )(slopes[:, None], seg, pos, q, k, v, do, lse, di)
  group_q = pl.BlockSpec((None, t, groups, hd), lambda j, b_, kh: (b_, 0, kh, 0))
  group_row = pl.BlockSpec((None, groups, t), lambda j, b_, kh: (b_, kh, 0))
  own_kv = pl.BlockSpec((None, t, None, hd), lambda j, b_, kh: (b_, 0, kh, 0))
  dk, dv = _call(
      st, functools.partial(_dkv_kernel, st=st, groups=groups), (t // st.bk, b, kvh),
      [pl.BlockSpec((groups,), lambda j, b_, kh: (kh,)),
       pl.BlockSpec((None, t), lambda j, b_, kh: (b_, 0)),
       pl.BlockSpec((None, t), lambda j, b_, kh: (b_, 0)),
       group_q, own_kv, own_kv, group_q, group_row, group_row],
      [own_kv, own_kv],
      [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      "alibi_flash_dkv_gpu",
  )(slopes, seg, pos, q, k, v, do, lse, di)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, seg, pos, slopes):
  return _forward(st, q, k, v, seg, pos, slopes)[0]


def _flash_fwd(st, q, k, v, seg, pos, slopes):
  o, lse = _forward(st, q, k, v, seg, pos, slopes)
  return o, (q, k, v, seg, pos, slopes, o, lse)


def _flash_bwd(st, res, do):
  q, k, v, seg, pos, slopes, o, lse = res
  di = jnp.einsum("btnh,btnh->bnt", do.astype(jnp.float32), o.astype(jnp.float32))
  return (*_backward(st, q, k, v, seg, pos, slopes, do, lse, di), None, None, None)


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
    block_sizes: layout.BlockSizes = layout.BlockSizes(64, 64),
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> Float[Array, "B T N H"]:
  """Differentiable GPU flash attention; slopes are passed in so head-sharded callers slice them."""
  t = q.shape[1]
  blocks = block_sizes.fit(t, 16)
  padded = layout.pad_to_blocks(q, k, v, segment_ids, positions, blocks.padded_length(t))
  st = _Static(bias, causal, blocks.block_q, blocks.block_k, num_warps, num_stages, interpret)
  out = _flash(st, padded.q, padded.k, padded.v, padded.segment_ids, padded.positions,
               slopes.astype(jnp.float32))
  return out[:, :t]
