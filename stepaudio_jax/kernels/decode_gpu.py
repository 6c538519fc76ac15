"""Decode attention as a Pallas GPU (Triton) kernel: a few new queries against a KV cache.

Grid (row block, batch, kv head): a program holds one row block of the G*T query rows of its
kv head (decode_layout.py) and loops over the key blocks of the filled slots only, reading each
once for all its rows; the cache stays in the model's [B, S, K, H] layout (the kv-head axis is
squeezed by the block spec). One program per (batch, kv head) leaves SMs idle when B*K is
small; splitting the keys across programs (flash-decoding) is not done. On CPU the same
kernel runs with interpret=True (tests).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from stepaudio_jax.kernels import decode_layout, tiles

ROW_MULTIPLE = 16  # the smallest MMA tile Triton accepts


@dataclasses.dataclass(frozen=True)
class _Static:
  bias: str
  causal: bool
  br: int
  bk: int


def _kernel(length_ref, slope_ref, qseg_ref, qpos_ref, kseg_ref, kpos_ref, q_ref, k_ref, v_ref,
            o_ref, *, st):
  q = q_ref[...]
  qseg, qpos, slope = qseg_ref[...][:, None], qpos_ref[...][:, None], slope_ref[...][:, None]
  length = length_ref[0]

  def body(j, carry):
    cols = pl.ds(j * st.bk, st.bk)
    s = tiles.dot(q, k_ref[cols, :], tiles.DIMS_NT) * (q.shape[-1] ** -0.5)
    s = decode_layout.masked_logits(s, qseg, qpos, kseg_ref[cols][None, :],
                                    kpos_ref[cols][None, :], slope, j * st.bk, length,
                                    bias=st.bias, causal=st.causal)
    return tiles.online_softmax_step(s, v_ref[cols, :], *carry)

  init = (jnp.full((st.br, 1), -jnp.inf, jnp.float32), jnp.zeros((st.br, 1), jnp.float32),
          jnp.zeros(q.shape, jnp.float32))
  blocks = tiles.div(length + st.bk - 1, st.bk)
  _, l, acc = jax.lax.fori_loop(0, blocks, body, init)
  o_ref[...] = (acc / l).astype(o_ref.dtype)


def _key_block(slots: int, block_k: int) -> int:
  """The largest power of two <= block_k dividing the cache (Triton tiles are powers of two)."""
  bk = 1 << (min(block_k, slots).bit_length() - 1)
  while slots % bk:
    bk //= 2
  if bk < ROW_MULTIPLE:
    raise ValueError(f"the Pallas GPU decode kernel needs a cache length that is a multiple of "
                     f"{ROW_MULTIPLE}, got {slots}; choose such a cache_length or use "
                     "attention=xla")
  return bk


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
    block_rows: int = 64,
    block_k: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> Float[Array, "B T N H"]:
  """Same contract as decode_tpu.decode_attention, as a Triton kernel."""
  b, t, _, hd = q.shape
  s, kvh = k.shape[1], k.shape[2]
  br = decode_layout.row_block(q, kvh, block_rows, ROW_MULTIPLE)
  g = decode_layout.group_queries(q, q_segment_ids, q_positions, slopes, kvh, br)
  st = _Static(bias, causal, br, _key_block(s, block_k))
  r = g.q.shape[2]
  q_spec = pl.BlockSpec((None, None, br, hd), lambda i, b_, h: (b_, h, i, 0))
  kv_spec = pl.BlockSpec((None, s, None, hd), lambda i, b_, h: (b_, 0, h, 0))
  kside = pl.BlockSpec((None, s), lambda i, b_, h: (b_, 0))
  out = pl.pallas_call(
      functools.partial(_kernel, st=st),
      grid=(r // br, b, kvh),
      in_specs=[pl.BlockSpec((1,), lambda i, b_, h: (0,)),
                pl.BlockSpec((None, br), lambda i, b_, h: (h, i)),
                pl.BlockSpec((None, br), lambda i, b_, h: (b_, i)),
                pl.BlockSpec((None, br), lambda i, b_, h: (b_, i)),
                kside, kside, q_spec, kv_spec, kv_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(g.q.shape, q.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="alibi_decode_gpu",
  )(decode_layout.live_length(kv_length, s), g.slopes[..., 0], g.segment_ids[..., 0],
    g.positions[..., 0], kv_segment_ids.astype(jnp.int32), kv_positions.astype(jnp.int32),
    g.q, k, v)
  return decode_layout.ungroup(out, g.rows, t)
