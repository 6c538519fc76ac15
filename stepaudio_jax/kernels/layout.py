"""Wrapper-side layout shared by the kernels: defaults, block sizes, padding, causal ranges."""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

PAD_SEGMENT = jnp.iinfo(jnp.int32).min  # never equal to a real segment id
# The segment id of a row that is one sequence. The data numbers packed segments from 1 and
# marks padding 0, so a default of 1 never pairs a real row with padding.
ONE_SEGMENT = 1


def default_segments(
    segment_ids: Int[Array, "B T"] | None,
    positions: Int[Array, "B T"] | None,
    shape: tuple[int, int],
) -> tuple[Int[Array, "B T"], Int[Array, "B T"]]:
  """The one default everywhere: missing segment ids = ONE_SEGMENT, missing positions = 0..T-1."""
  b, t = shape
  if segment_ids is None:
    segment_ids = jnp.full((b, t), ONE_SEGMENT, jnp.int32)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return segment_ids, positions


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query and key tile lengths; the sequence is padded to a multiple of both."""

  block_q: int = 128
  block_k: int = 128

  def fit(self, t: int, multiple: int) -> "BlockSizes":
    """Shrink blocks that exceed the (rounded-up) sequence so short inputs waste nothing."""
    cap = -(-t // multiple) * multiple
    return BlockSizes(min(self.block_q, cap), min(self.block_k, cap))

  def padded_length(self, t: int) -> int:
    m = math.lcm(self.block_q, self.block_k)
    return -(-t // m) * m


@dataclasses.dataclass(frozen=True)
class Padded:
  """Inputs padded to a whole number of blocks; padded keys sit in no real segment."""

  q: Float[Array, "B Tp N H"]
  k: Float[Array, "B Tp K H"]
  v: Float[Array, "B Tp K H"]
  segment_ids: Int[Array, "B Tp"]
  positions: Int[Array, "B Tp"]
  length: int


def pad_to_blocks(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B T K H"],
    v: Float[Array, "B T K H"],
    segment_ids: Int[Array, "B T"] | None,
    positions: Int[Array, "B T"] | None,
    padded_length: int,
) -> Padded:
  """Fill in default segments/positions and pad the sequence axis (differentiably) to Tp."""
  t = q.shape[1]
  segment_ids, positions = default_segments(segment_ids, positions, q.shape[:2])
  extra = padded_length - t
  pad4 = ((0, 0), (0, extra), (0, 0), (0, 0))
  return Padded(
      jnp.pad(q, pad4), jnp.pad(k, pad4), jnp.pad(v, pad4),
      jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, extra)),
              constant_values=PAD_SEGMENT),
      jnp.pad(positions.astype(jnp.int32), ((0, 0), (0, extra))),
      t,
  )


def last_live_k_block(i: jax.Array, bq: int, bk: int) -> jax.Array:
  """Last key block a causal query block i can see: later ones are fully masked."""
  return (i * bq + bq - 1) // bk


def first_live_q_block(j: jax.Array, bq: int, bk: int) -> jax.Array:
  """First query block that can see causal key block j."""
  return (j * bk) // bq


def causal_block_live(i: jax.Array, j: jax.Array, bq: int, bk: int) -> jax.Array:
  return j * bk <= i * bq + bq - 1
