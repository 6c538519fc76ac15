"""Masked next-token cross-entropy, summed so microbatches can be added before dividing."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from stepaudio_jax.models.tokens import TokenType

REPORTED_TYPES = {
    "text": TokenType.TEXT,
    "audio_linguistic": TokenType.AUDIO_LINGUISTIC,
    "audio_semantic": TokenType.AUDIO_SEMANTIC,
    "image_caption": TokenType.IMAGE_CAPTION,
}


def token_losses(
    logits: Float[Array, "B T V"], targets: Int[Array, "B T"]
) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
  """(cross-entropy, logsumexp of the logits) per position."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return lse - picked, lse


@jax.named_scope("loss")
def loss_sums(
    logits: Float[Array, "B T V"],
    targets: Int[Array, "B T"],
    loss_mask: Float[Array, "B T"],
    target_types: Int[Array, "B T"],
    with_z_loss: bool = False,
) -> dict[str, jax.Array]:
  """Sum of losses and count of tokens, overall and per token type (divide at the end); with
  `with_z_loss`, also the sum of logsumexp^2 over the same tokens (`z_loss_sum`)."""
  ce, lse = token_losses(logits, targets)
  per_token = ce * loss_mask
  sums = {"loss_sum": per_token.sum(), "tokens": loss_mask.sum()}
  for name, kind in REPORTED_TYPES.items():
    sel = (target_types == kind) * loss_mask
    sums[f"loss_sum/{name}"] = (per_token * sel).sum()
    sums[f"tokens/{name}"] = sel.sum()
  if with_z_loss:
    sums["z_loss_sum"] = (lse * lse * loss_mask).sum()
  return sums


def finalize(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Means from sums; a type with no tokens in the batch reports 0 with tokens/<type> = 0."""
  out = {"loss": sums["loss_sum"] / jnp.maximum(sums["tokens"], 1.0), "tokens": sums["tokens"]}
  for name in REPORTED_TYPES:
    count = sums[f"tokens/{name}"]
    out[f"loss/{name}"] = sums[f"loss_sum/{name}"] / jnp.maximum(count, 1.0)
    out[f"tokens/{name}"] = count
  if "z_loss_sum" in sums:
    out["z_loss"] = sums["z_loss_sum"] / jnp.maximum(sums["tokens"], 1.0)
  return out
