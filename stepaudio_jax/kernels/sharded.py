"""Run a per-device attention kernel (flash or decode) inside the model's sharding: shard_map over batch and heads.

pallas_call cannot be partitioned by XLA, so each device runs the kernel on its own batch rows
and heads. Self-attention runs in the attention layout (ATTENTION_Q/KV): every device holds the
whole sequence of its share of the heads, so a sequence-sharded model (mesh.sequence) reaches
it by one all-to-all per tensor (DeepSpeed-Ulysses) and the kernel never sees a sequence split.
Contiguous GQA groups survive head sharding when query and kv heads are split the same number
of ways: device d holds query heads d*N/D.. and kv heads d*K/D.., and h // G still maps one
onto the other. The slopes are an input sharded like the heads for the same reason.
"""

from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from stepaudio_jax.parallel.mesh import LogicalSharding

ATTENTION_Q = ("act_batch", None, "act_attn_heads", None)
ATTENTION_KV = ("act_batch", None, "act_attn_kv_heads", None)


def _check_heads(shard: LogicalSharding, q_spec: P, kv_spec: P, kv_heads: int,
                 kernel: str) -> None:
  """Query and kv heads must be split over the same mesh axes, into whole kv heads."""
  if q_spec[2] != kv_spec[2] or kv_heads % shard.ways(kv_spec[2]):
    raise ValueError(
        f"{kernel} shards query and kv heads the same way, but {kv_heads} kv heads and heads "
        f"sharded over {q_spec[2]} and {kv_spec[2]} do not allow it; check mesh.tensor, "
        f"mesh.sequence and the mesh.rules of the heads")


def over_batch_and_heads(
    kernel: Callable,
    shard: LogicalSharding,
    q: Float[Array, "B T N H"],
    k: Float[Array, "B T K H"],
    v: Float[Array, "B T K H"],
    slopes: Float[Array, "N"],
    segment_ids: Int[Array, "B T"],
    positions: Int[Array, "B T"],
) -> Float[Array, "B T N H"]:
  """kernel(q, k, v, slopes, segment_ids, positions) on each device's batch rows and heads."""
  q_spec, kv_spec = shard.spec(ATTENTION_Q), shard.spec(ATTENTION_KV)
  _check_heads(shard, q_spec, kv_spec, k.shape[2], "pallas attention")
  side = P(q_spec[0], None)
  return jax.shard_map(
      kernel, mesh=shard.mesh,
      in_specs=(q_spec, kv_spec, kv_spec, P(q_spec[2]), side, side),
      out_specs=q_spec, check_vma=False,
  )(q, k, v, slopes, segment_ids, positions)


def decode_over_batch_and_heads(
    kernel: Callable,
    shard: LogicalSharding,
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    slopes: Float[Array, "N"],
    q_segment_ids: Int[Array, "B T"],
    q_positions: Int[Array, "B T"],
    kv_segment_ids: Int[Array, "B S"],
    kv_positions: Int[Array, "B S"],
    kv_length: Int[Array, ""],
) -> Float[Array, "B T N H"]:
  """kernel(q, k, v, slopes, q seg, q pos, kv seg, kv pos, kv_length) per device, with the KV
  cache sharded as KVCache.logical_axes (batch and kv heads; the slots whole)."""
  q_spec = shard.spec(("act_batch", None, "act_heads", None))
  kv_spec = shard.spec(("act_batch", None, "act_kv_heads", None))
  _check_heads(shard, q_spec, kv_spec, k.shape[2], "pallas decode attention")
  side = P(q_spec[0], None)
  return jax.shard_map(
      kernel, mesh=shard.mesh,
      in_specs=(q_spec, kv_spec, kv_spec, P(q_spec[2]), side, side, side, side, P()),
      out_specs=q_spec, check_vma=False,
  )(q, k, v, slopes, q_segment_ids, q_positions, kv_segment_ids, kv_positions, kv_length)
