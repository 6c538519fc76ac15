"""Reward and value models: the Step1 backbone (no LM head) with a scalar head.

A reward model reads its score at a sequence's last real token (the <|EOT|> closing the
response); a critic (value model) reads one value per position. Both are this module; the
parameter tree is {"lm": <Step1 without lm_head>, "head": <ScalarHead>}, so the backbone loads
from an LM checkpoint's `lm` tree and a critic loads a reward model whole.
"""

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from stepaudio_jax.config.model import Step1Config
from stepaudio_jax.models.heads import ScalarHead
from stepaudio_jax.models.step1 import Step1
from stepaudio_jax.parallel.mesh import LogicalSharding


class RewardModel(nnx.Module):
  def __init__(self, cfg: Step1Config, shard: LogicalSharding | None = None, *, rngs: nnx.Rngs):
    self.lm = Step1(cfg, shard, with_lm_head=False, rngs=rngs)
    self.head = ScalarHead(cfg, rngs=rngs)

  def __call__(
      self, tokens: Int[Array, "B T"], segment_ids: Int[Array, "B T"],
      positions: Int[Array, "B T"]
  ) -> Float[Array, "B T"]:
    """One fp32 scalar per position."""
    h_BTD, _ = self.lm.hidden_states(self.lm.embed_tokens(tokens), segment_ids, positions)
    return self.head(h_BTD)


def last_token_index(segment_ids: Int[Array, "B T"]) -> Int[Array, "B"]:
  """Index of each row's last real token (segment id > 0; rows are right-padded with 0)."""
  t = segment_ids.shape[1]
  idx = jnp.where(segment_ids > 0, jnp.arange(t)[None, :], -1)
  return jnp.maximum(idx.max(axis=1), 0)


def score_at(values: Float[Array, "B T"], index: Int[Array, "B"]) -> Float[Array, "B"]:
  return jnp.take_along_axis(values, index[:, None], axis=1)[:, 0]
