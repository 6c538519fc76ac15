"""Small layers of the speech decoder (flow model, HiFi-GAN) with the names torch would use.

Axes in names: B batch, T time (codes, mel frames or samples), C channels, D width, H heads,
K head dim. Tensors are channels-last ([B, T, C]); weights keep the layout JAX convolutions
want ([k, C_in, C_out]) and export/torch_speech.py transposes them for torch. Every parameter
is replicated (logical axes None): these models are small next to the LM and train data-
parallel.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float

from stepaudio_jax.models.linear import project


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape), axes=(None,) * len(shape))


def _zeros(shape: tuple[int, ...]) -> nnx.Param:
  return nnx.Param(jnp.zeros(shape), axes=(None,) * len(shape))


class Dense(nnx.Module):
  def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs, std: float | None = None):
    self.weight = _param(rngs, (din, dout), din**-0.5 if std is None else std)
    self.bias = _zeros((dout,))

  def __call__(self, x: Float[Array, "... C"]) -> Float[Array, "... D"]:
    y = project(x, self.weight[...])
    return y + self.bias[...].reshape((1,) * (y.ndim - 1) + (-1,))


class LayerNorm(nnx.Module):
  def __init__(self, dim: int, eps: float = 1e-5):
    self.scale = nnx.Param(jnp.ones((dim,)), axes=(None,))
    self.bias = _zeros((dim,))
    self.eps = eps

  def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    shape = (1,) * (x.ndim - 1) + (-1,)
    return ((x - mu) * jax.lax.rsqrt(var + self.eps) * self.scale[...].reshape(shape)
            + self.bias[...].reshape(shape))


class Conv1d(nnx.Module):
  """'Same'-length 1-D convolution (odd kernel, any dilation); `groups` = C_in is depthwise."""

  def __init__(self, cin: int, cout: int, kernel: int, *, rngs: nnx.Rngs, dilation: int = 1,
               groups: int = 1, stride: int = 1, padding: int | None = None):
    self.weight = _param(rngs, (kernel, cin // groups, cout), (kernel * cin // groups) ** -0.5)
    self.bias = _zeros((cout,))
    self.dilation, self.groups, self.stride = dilation, groups, stride
    self.padding = (kernel - 1) * dilation // 2 if padding is None else padding

  def __call__(self, x: Float[Array, "B T C"]) -> Float[Array, "B T D"]:
    y = jax.lax.conv_general_dilated(
        x, self.weight[...], (self.stride,), [(self.padding, self.padding)],
        rhs_dilation=(self.dilation,), dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=self.groups)
    return y + self.bias[...][None, None, :]


class ConvTranspose1d(nnx.Module):
  """Upsampling by `stride` with torch's ConvTranspose1d(padding=(kernel - stride) // 2)
  semantics: T -> T * stride. The weight is stored as the equivalent forward convolution's
  ([k, C_in, C_out], kernel flipped relative to torch's [C_in, C_out, k])."""

  def __init__(self, cin: int, cout: int, kernel: int, stride: int, *, rngs: nnx.Rngs):
    self.weight = _param(rngs, (kernel, cin, cout), (kernel * cin / stride) ** -0.5)
    self.bias = _zeros((cout,))
    self.stride, self.pad = stride, kernel - 1 - (kernel - stride) // 2

  def __call__(self, x: Float[Array, "B T C"]) -> Float[Array, "B T2 D"]:
    y = jax.lax.conv_general_dilated(
        x, self.weight[...], (1,), [(self.pad, self.pad)], lhs_dilation=(self.stride,),
        dimension_numbers=("NWC", "WIO", "NWC"))
    return y + self.bias[...][None, None, :]


class Conv2d(nnx.Module):
  """2-D convolution over [B, H, W, C] (discriminators), explicit stride and padding."""

  def __init__(self, cin: int, cout: int, kernel: tuple[int, int], *, rngs: nnx.Rngs,
               stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0)):
    self.weight = _param(rngs, (*kernel, cin, cout), (kernel[0] * kernel[1] * cin) ** -0.5)
    self.bias = _zeros((cout,))
    self.stride, self.padding = stride, padding

  def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B H2 W2 D"]:
    y = jax.lax.conv_general_dilated(
        x, self.weight[...], self.stride, [(p, p) for p in self.padding],
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.bias[...][None, None, None, :]


class Attention(nnx.Module):
  """Multi-head self-attention over the valid (unmasked) positions."""

  def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
    self.qkv = Dense(dim, 3 * dim, rngs=rngs)
    self.out = Dense(dim, dim, rngs=rngs)
    self.heads = heads

  def __call__(self, x: Float[Array, "B T D"], mask: Bool[Array, "B T"]) -> Float[Array, "B T D"]:
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    logits = jnp.einsum("bthk,bshk->bhts", q, k) * (d // self.heads) ** -0.5
    logits = jnp.where(mask[:, None, None, :], logits, -1e9)
    y = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(logits, axis=-1), v)
    return self.out(y.reshape(b, t, d))


def sinusoid(x: Float[Array, "*S"], dim: int, scale: float = 1000.0) -> Float[Array, "*S D"]:
  """Transformer sinusoids of `x` (positions, or flow times scaled by `scale`), [sin, cos]."""
  freqs = jnp.exp(-np.log(10000.0) * jnp.arange(dim // 2) / (dim // 2))
  args = (scale * x)[..., None] * freqs.reshape((1,) * x.ndim + (-1,))
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
