"""Step-Omni: a Step1 LM whose vocabulary holds audio tokens, plus a frozen image encoder.

Image features replace the embeddings at image-placeholder positions, in order: the n-th
placeholder of a row takes the n-th patch feature of that row's images. With a KV cache, images
go in with the prompt (the prefill); decode steps are text and audio tokens.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from stepaudio_jax.config.model import Step1Config, TokenLayout, VisionConfig
from stepaudio_jax.models.kv_cache import KVCache
from stepaudio_jax.models.step1 import Step1
from stepaudio_jax.models.vision import Projector, VisionEncoder
from stepaudio_jax.parallel.mesh import LogicalSharding

# The image encoder is frozen: its parameters are split off the trainable state, get no
# gradient and no optimizer state.
FROZEN = nnx.All(nnx.Param, nnx.PathContains("vision_encoder"))
TRAINABLE = nnx.All(nnx.Param, nnx.Not(FROZEN))


class StepOmni(nnx.Module):
  def __init__(
      self,
      cfg: Step1Config,
      vision: VisionConfig,
      tokens: TokenLayout,
      shard: LogicalSharding | None = None,
      *,
      rngs: nnx.Rngs,
  ):
    if cfg.vocab_size < tokens.min_vocab_size(vision.enabled):
      raise ValueError(
          f"model.vocab_size={cfg.vocab_size} is smaller than the token layout needs "
          f"({tokens.min_vocab_size(vision.enabled)}: text + audio codes + image placeholder)"
      )
    self.tokens, self.vision_cfg = tokens, vision
    self.lm = Step1(cfg, shard, rngs=rngs)
    if vision.enabled:
      self.vision_encoder = VisionEncoder(vision, rngs=rngs)
      self.projector = Projector(vision.hidden_size, cfg.hidden_size, rngs=rngs)

  def embed_inputs(
      self, tokens: Int[Array, "B T"], images: Float[Array, "B I S S C"] | None = None
  ) -> Float[Array, "B T D"]:
    """Token embeddings with the image features at the placeholders."""
    x = self.lm.embed_tokens(tokens)
    if images is not None and self.vision_cfg.enabled:
      b, i = images.shape[:2]
      feats = jax.lax.stop_gradient(self.vision_encoder(images.reshape(b * i, *images.shape[2:])))
      feats = self.projector(feats).reshape(b, -1, x.shape[-1]).astype(x.dtype)
      x = place_image_features(x, tokens == self.tokens.image_placeholder_id, feats)
    return x

  def __call__(
      self,
      tokens: Int[Array, "B T"],
      segment_ids: Int[Array, "B T"],
      positions: Int[Array, "B T"],
      images: Float[Array, "B I S S C"] | None = None,
  ) -> Float[Array, "B T V"]:
    h, _ = self.lm.hidden_states(self.embed_inputs(tokens, images), segment_ids, positions)
    return self.lm.logits(h)

  def extend(
      self,
      tokens: Int[Array, "B T"],
      segment_ids: Int[Array, "B T"],
      positions: Int[Array, "B T"],
      cache: KVCache,
      images: Float[Array, "B I S S C"] | None = None,
  ) -> tuple[Float[Array, "B T V"], KVCache]:
    """Step1.extend with images placed among the new tokens (give them with the prompt)."""
    x = self.embed_inputs(tokens, images)
    h, cache = self.lm.hidden_states(x, segment_ids, positions, cache)
    return self.lm.logits(h), cache


def place_image_features(
    x: Float[Array, "B T D"], is_image: Array, feats: Float[Array, "B P D"]
) -> Float[Array, "B T D"]:
  """Put the n-th feature of each row at that row's n-th placeholder; other tokens untouched."""
  index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, feats.shape[1] - 1)
  gathered = jnp.take_along_axis(feats, index[..., None], axis=1)
  return jnp.where(is_image[..., None], gathered, x)


def expand_vocabulary(
    params: dict, new_vocab_size: int, rng: jax.Array, noise_scale: float = 1.0
) -> dict:
  """Grow a text-only checkpoint's `embed` [V, D] and `lm_head` [D, V] to new_vocab_size.

  Old rows are kept bit for bit. New embedding rows are drawn from a Gaussian with the mean and
  per-dimension std of the old rows (times noise_scale): new tokens start inside the
  distribution the backbone already reads. New LM-head columns are the mean of the old columns:
  every new token starts with the average logit, so the model's distribution over the old
  tokens is unchanged (softmax is shift-invariant) and text ability is kept at step 0.
  """
  lm = params["lm"]
  embed, head = np.asarray(lm["embed"]), np.asarray(lm["lm_head"])
  old, d = embed.shape
  if new_vocab_size < old:
    raise ValueError(f"cannot shrink the vocabulary from {old} to {new_vocab_size}")
  extra = new_vocab_size - old
  mean, std = embed.mean(0), embed.std(0)
  noise = np.asarray(jax.random.normal(rng, (extra, d), jnp.float32))
  new_rows = (mean + noise_scale * std * noise).astype(embed.dtype)
  new_cols = np.repeat(head.mean(1, keepdims=True), extra, axis=1).astype(head.dtype)
  out = dict(params)
  out["lm"] = dict(lm)
  out["lm"]["embed"] = np.concatenate([embed, new_rows], axis=0)
  out["lm"]["lm_head"] = np.concatenate([head, new_cols], axis=1)
  return out
