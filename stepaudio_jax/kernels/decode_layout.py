"""Wrapper-side layout of the decode kernels: queries grouped per kv head, the per-row math.

Decoding has few new queries (T, often 1) and a long KV cache (S slots), so the work is reading
the cache once. Both decode kernels (decode_tpu.py, decode_gpu.py) gather the G query heads of
one kv head and the T new positions into one tile of R = G*T rows: each key block is read once
for all of them, as one matmul, and K/V are never repeated. Row r of kv head k is query head
k*G + r // T at new position r % T. Rows are padded (to the sublane or MMA tile) with a segment
id no key has.

Visibility is by true position, as in the reference's cache path: key s is visible to row r iff
they share a segment and kv_pos[s] <= q_pos[r]; the bias is -slope * sqrt(q_pos - kv_pos).
"""

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from stepaudio_jax.kernels.layout import PAD_SEGMENT
from stepaudio_jax.kernels.tiles import MASKED


@dataclasses.dataclass(frozen=True)
class Grouped:
  """Queries as [B, K, R, H] rows with per-row segment id, position and slope ([B or K, R, 1])."""

  q: Float[Array, "B K R H"]
  segment_ids: Int[Array, "B R 1"]
  positions: Int[Array, "B R 1"]
  slopes: Float[Array, "K R 1"]
  rows: int  # G*T before padding


def row_block(q: Float[Array, "B T N H"], kv_heads: int, block_rows: int, multiple: int) -> int:
  """Rows per tile: one kv head's G*T query rows rounded up to `multiple`, at most block_rows."""
  rows = q.shape[2] // kv_heads * q.shape[1]
  return min(block_rows, -(-rows // multiple) * multiple)


def group_queries(
    q: Float[Array, "B T N H"],
    segment_ids: Int[Array, "B T"],
    positions: Int[Array, "B T"],
    slopes: Float[Array, "N"],
    kv_heads: int,
    row_multiple: int,
) -> Grouped:
  """[B, T, N, H] queries -> [B, K, R, H] rows (R = G*T rounded up to row_multiple)."""
  b, t, n, h = q.shape
  g = n // kv_heads
  rows = g * t
  pad = -rows % row_multiple
  q_bkrh = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, rows, h)
  q_bkrh = jnp.pad(q_bkrh, ((0, 0), (0, 0), (0, pad), (0, 0)))
  side = lambda x, fill: jnp.pad(jnp.tile(x.astype(jnp.int32), (1, g)), ((0, 0), (0, pad)),  # noqa: E731
                                 constant_values=fill)[:, :, None]
  slopes_kr = jnp.repeat(slopes.astype(jnp.float32).reshape(kv_heads, g), t, axis=1)
  slopes_kr = jnp.pad(slopes_kr, ((0, 0), (0, pad)))[:, :, None]
  return Grouped(q_bkrh, side(segment_ids, PAD_SEGMENT), side(positions, 0), slopes_kr, rows)


def ungroup(out: Float[Array, "B K R H"], rows: int, t: int) -> Float[Array, "B T N H"]:
  """The inverse of group_queries on the kernel's output (padding rows dropped)."""
  b, kv, _, h = out.shape
  g = rows // t
  return out[:, :, :rows].reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, h)


def masked_logits(
    s: Float[Array, "R bk"],
    q_seg: Int[Array, "R 1"],
    q_pos: Int[Array, "R 1"],
    k_seg: Int[Array, "1 bk"],
    k_pos: Int[Array, "1 bk"],
    slope: Float[Array, "R 1"],
    k_start: Int[Array, ""],
    length: Int[Array, ""],
    *,
    bias: str,
    causal: bool,
) -> Float[Array, "R bk"]:
  """Scaled logits plus the sqrt-ALiBi bias from true positions; invisible keys and the slots
  from `length` on (the rest of the last, partly filled key block) get MASKED."""
  if bias == "alibi_sqrt":
    s = s - slope * jnp.sqrt(jnp.maximum((q_pos - k_pos).astype(jnp.float32), 0.0))
  slots = k_start + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
  mask = jnp.logical_and(q_seg == k_seg, slots < length)
  if causal:
    mask = jnp.logical_and(mask, k_pos <= q_pos)
  return jnp.where(mask, s, MASKED)


def live_length(kv_length: Int[Array, ""] | None, slots: int) -> Int[Array, "1"]:
  """Slots the kernel reads, as a [1] int32 array: the filled prefix of the cache, or all."""
  if kv_length is None:
    return jnp.full((1,), slots, jnp.int32)
  return jnp.clip(jnp.asarray(kv_length, jnp.int32), 1, slots).reshape(1)



def key_block(slots: int, block_k: int) -> int:
  """The largest key block <= block_k that divides the cache (multiples of 128 first, then 8),
  so the cache is read in place, never padded (a copy of the whole cache per step)."""
  for multiple in (128, 8):
    for bk in range(min(block_k, slots) // multiple * multiple, 0, -multiple):
      if slots % bk == 0:
        return bk
  return slots
