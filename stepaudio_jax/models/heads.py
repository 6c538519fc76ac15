"""Heads on the Step1 backbone's hidden states other than the LM head."""

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from stepaudio_jax.config.model import Step1Config
from stepaudio_jax.models.linear import project


class ScalarHead(nnx.Module):
  """D -> one fp32 scalar per position: a reward model's score, a critic's value.

  The weight is drawn with std 1/sqrt(D + 1) and the bias starts at 0: on hidden states of
  unit RMS (the final norm's output) the first scores are of order one, the scale the
  Bradley-Terry loss and value targets work at, and not all equal (a zero head would give every
  pair the same score and the backbone no gradient on the first step).
  """

  def __init__(self, cfg: Step1Config, *, rngs: nnx.Rngs):
    d, pd = cfg.hidden_size, jnp.dtype(cfg.param_dtype.value)
    std = (d + 1) ** -0.5
    self.weight = nnx.Param(std * jax.random.normal(rngs.params(), (d, 1), pd),
                            axes=("embed", None))
    self.bias = nnx.Param(jnp.zeros((1,), pd), axes=(None,))

  def __call__(self, h_BTD: Float[Array, "B T D"]) -> Float[Array, "B T"]:
    out_BT1 = project(h_BTD, self.weight[...].astype(h_BTD.dtype), out_dtype=jnp.float32)
    return (out_BT1 + self.bias[...].astype(jnp.float32)[None, None, :])[..., 0]
