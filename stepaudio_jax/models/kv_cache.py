"""The KV cache of a Step1 model: keys and values of every layer, and what each slot holds.

Axes: L layers, B batch, S cache slots, K kv heads, H head dim, T new tokens.

Prompts are left-padded, so every row writes the same slot: a call with T new tokens fills
slots index..index+T-1 of every row and advances the one index. Each slot keeps its token's
segment id and true position, which is all attention needs: left padding and empty slots have
segment id 0, which no real token (segments are numbered from 1) can see, and the ALiBi
distance and RoPE angles use true positions, never slot numbers.
"""

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float, Int

from stepaudio_jax.config.model import Step1Config
from stepaudio_jax.parallel.mesh import LogicalSharding

KV_AXES = ("layers", "act_batch", None, "act_kv_heads", None)
SLOT_AXES = ("act_batch", None)


def _write(old: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
  """new [B, T, ...] into old [B, S, ...] at slots index..index+T-1."""
  return jax.lax.dynamic_update_slice_in_dim(old, new.astype(old.dtype), index, axis=1)


@struct.dataclass
class KVCache:
  """keys, values [L, B, S, K, H] (compute dtype); segment_ids, positions [B, S]; index [].

  Inside the layer scan each layer gets the same cache with only its own keys and values
  ([B, S, K, H]); the slots are shared by all layers.
  """

  keys: Float[Array, "L B S K H"]
  values: Float[Array, "L B S K H"]
  segment_ids: Int[Array, "B S"]
  positions: Int[Array, "B S"]
  index: Int[Array, ""]

  @classmethod
  def init(cls, cfg: Step1Config, batch: int, length: int) -> "KVCache":
    """An empty cache of `length` slots per row."""
    kv = jnp.zeros((cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim),
                   jnp.dtype(cfg.compute_dtype.value))
    slots = jnp.zeros((batch, length), jnp.int32)
    return cls(kv, kv, slots, slots, jnp.zeros((), jnp.int32))

  @classmethod
  def logical_axes(cls) -> "KVCache":
    """Sharded like the activations: batch on act_batch, kv heads on act_kv_heads."""
    return cls(KV_AXES, KV_AXES, SLOT_AXES, SLOT_AXES, ())

  @classmethod
  def shardings(cls, shard: LogicalSharding) -> "KVCache":
    return shard.tree(cls.logical_axes())

  def add_slots(
      self, segment_ids: Int[Array, "B T"], positions: Int[Array, "B T"]
  ) -> "KVCache":
    """Record the new tokens' segment ids and positions at index (the layers write their keys
    and values at the same index; `advance` moves it past them)."""
    return self.replace(segment_ids=_write(self.segment_ids, segment_ids, self.index),
                        positions=_write(self.positions, positions, self.index))

  def write_layer(self, k: Float[Array, "B T K H"], v: Float[Array, "B T K H"]) -> "KVCache":
    """One layer's cache ([B, S, K, H] keys and values) with the new keys and values at index."""
    return self.replace(keys=_write(self.keys, k, self.index),
                        values=_write(self.values, v, self.index))

  def advance(self, num_tokens: int) -> "KVCache":
    return self.replace(index=self.index + num_tokens)

  def next_positions(self) -> Int[Array, "B 1"]:
    """True position of each row's next token: one past the last written slot, which is a real
    token in every row once a (left-padded) prompt is in."""
    last = jax.lax.dynamic_index_in_dim(self.positions, self.index - 1, axis=1)
    return last + 1
