"""Batched decoding on a KV cache: left-padded prompts, a jitted prefill and a one-token step.

Axes: B batch, P prompt length, S cache slots, V vocabulary, N new tokens.

Prompts of different lengths are left-padded (segment id 0, which no real token sees), so
every row writes the same cache slot at every step and the last prompt token sits in the last
column. Real tokens carry their true positions 0..len-1, which is what the sqrt-ALiBi distance
and RoPE need. `Decoder.step` is the building block a sampler wraps: it takes the tokens just
chosen and returns the logits of the next ones; `greedy` wraps it with an argmax.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jaxtyping import Array, Float, Int

from stepaudio_jax.kernels.layout import ONE_SEGMENT
from stepaudio_jax.models.kv_cache import KVCache
from stepaudio_jax.models.step1 import Step1
from stepaudio_jax.parallel.mesh import LogicalSharding, logical_axes


@struct.dataclass
class Prompts:
  """Left-padded prompts: tokens, segment ids (0 pad, 1 real) and true positions, all [B, P]."""

  tokens: Int[Array, "B P"]
  segment_ids: Int[Array, "B P"]
  positions: Int[Array, "B P"]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> Prompts:
  """Right-align prompts of different (non-zero) lengths in one [B, P] batch."""
  if not prompts or min(len(p) for p in prompts) == 0:
    raise ValueError("every prompt needs at least one token")
  length = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  segment_ids = np.zeros((len(prompts), length), np.int32)
  positions = np.zeros((len(prompts), length), np.int32)
  for row, p in enumerate(prompts):
    tokens[row, length - len(p):] = p
    segment_ids[row, length - len(p):] = ONE_SEGMENT
    positions[row, length - len(p):] = np.arange(len(p))
  return Prompts(tokens, segment_ids, positions)


@dataclasses.dataclass(frozen=True)
class Decoder:
  """Jitted prefill and step of one model graph, pure in (params, cache).

  prefill(params, prompts) -> (logits [B, V] after the last prompt token, cache of S slots)
  step(params, tokens [B], cache) -> (logits [B, V] after those tokens, cache); the cache is
  donated. params is the model's pure-dict state; logits are fp32. The step derives each row's
  true position from the cache, so a caller only feeds tokens. On XLA:CPU with emulated
  devices, wait for a sharded step before dispatching many more (or loop inside jit, as
  `greedy` does): several collective programs in flight there can deadlock.
  """

  prefill: Callable[[dict, Prompts], tuple[Float[Array, "B V"], KVCache]]
  step: Callable[[dict, Int[Array, " B"], KVCache], tuple[Float[Array, "B V"], KVCache]]
  cache_length: int


def prefill(
    graphdef: nnx.GraphDef, params: dict, prompts: Prompts, cache_length: int
) -> tuple[Float[Array, "B V"], KVCache]:
  """The prompts into an empty cache of cache_length slots; the logits after each last token.

  Pure in (params, prompts), so it traces inside any jitted function (a sampler in a train
  step); with a sharded graph the cache is constrained to KVCache.shardings."""
  lm = nnx.merge(graphdef, params)
  cache = KVCache.init(lm.cfg, prompts.tokens.shape[0], cache_length)
  if lm.shard is not None:
    cache = jax.lax.with_sharding_constraint(cache, KVCache.shardings(lm.shard))
  h_BPD, cache = lm.hidden_states(lm.embed_tokens(prompts.tokens), prompts.segment_ids,
                                  prompts.positions, cache)
  return lm.logits(h_BPD[:, -1:])[:, 0], cache


def step(
    graphdef: nnx.GraphDef, params: dict, tokens: Int[Array, " B"], cache: KVCache
) -> tuple[Float[Array, "B V"], KVCache]:
  """One token per row into the cache, at each row's next true position; the logits after it."""
  lm = nnx.merge(graphdef, params)
  positions = cache.next_positions()
  segment_ids = jnp.full_like(positions, ONE_SEGMENT)
  logits, cache = lm.extend(tokens[:, None], segment_ids, positions, cache)
  return logits[:, 0], cache


def make_decoder(
    model: Step1, cache_length: int, shard: LogicalSharding | None = None
) -> Decoder:
  """Decoder for `model`'s graph (it may be abstract: nnx.eval_shape); with shard, inputs and
  outputs are sharded by their logical axes (parameters as in training, the batch on
  act_batch, the cache as KVCache.logical_axes)."""
  graphdef, state = nnx.split(model)
  prefill_fn = functools.partial(prefill, graphdef, cache_length=cache_length)
  step_fn = functools.partial(step, graphdef)
  if shard is None:
    return Decoder(jax.jit(prefill_fn), jax.jit(step_fn, donate_argnums=2), cache_length)
  params_sh, cache_sh = shard.tree(logical_axes(state)), KVCache.shardings(shard)
  rows_sh = shard.named(("act_batch", None))
  logits_sh = shard.named(("act_batch", "act_vocab"))
  return Decoder(
      jax.jit(prefill_fn, in_shardings=(params_sh, Prompts(rows_sh, rows_sh, rows_sh)),
              out_shardings=(logits_sh, cache_sh)),
      jax.jit(step_fn, in_shardings=(params_sh, shard.named(("act_batch",)), cache_sh),
              out_shardings=(logits_sh, cache_sh), donate_argnums=2),
      cache_length,
  )


def greedy(decoder: Decoder, params: dict, prompts: Prompts, num_tokens: int) -> Int[Array, "B N"]:
  """num_tokens new tokens per row, each the argmax of the logits after the one before."""
  needed = prompts.tokens.shape[1] + num_tokens - 1
  if needed > decoder.cache_length:
    raise ValueError(f"{prompts.tokens.shape[1]} prompt and {num_tokens} new tokens need "
                     f"{needed} cache slots, but the decoder has {decoder.cache_length}")
  return _greedy(decoder, params, prompts, num_tokens)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _greedy(decoder, params, prompts, num_tokens):
  """Prefill and steps as one program (a scan): XLA:CPU's emulated devices can deadlock when
  many collective programs are in flight, as a Python loop of sharded steps puts them."""
  logits, cache = decoder.prefill(params, prompts)
  first = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def body(carry, _):
    token, cache = carry
    logits, cache = decoder.step(params, token, cache)
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return (token, cache), token

  _, rest = jax.lax.scan(body, (first, cache), length=num_tokens - 1)
  return jnp.concatenate([first[:, None], rest.T], axis=1)
