"""Image encoder (a SigLIP/CLIP-style ViT, held frozen) and the trainable projector.

Axes: B images, P patches, E encoder width, M encoder MLP width, D LM width.
The encoder keeps the biases and LayerNorms of the public ViTs so their weights import as is.
"""


import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from stepaudio_jax.config.model import Remat, VisionConfig
from stepaudio_jax.models.scan import run_layers


def _row(v: nnx.Param) -> jax.Array:
  """A [X] vector as [1, 1, X], for explicit broadcasting over [B, P, X]."""
  return v[...][None, None, :]


def _dense(rngs, din, dout, axes):
  w = nnx.Param(0.02 * jax.random.normal(rngs.params(), (din, dout)), axes=axes)
  b = nnx.Param(jnp.zeros((dout,)), axes=(axes[1],))
  return w, b


class LayerNorm(nnx.Module):
  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,)), axes=("norm",))
    self.bias = nnx.Param(jnp.zeros((dim,)), axes=("norm",))
    self.eps = eps

  def __call__(self, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * _row(self.scale) + _row(self.bias)


class EncoderLayer(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    e, m = cfg.hidden_size, cfg.intermediate_size
    self.num_heads = cfg.num_heads
    self.norm1 = LayerNorm(e, cfg.layer_norm_eps)
    self.wq, self.bq = _dense(rngs, e, e, ("vision_embed", "vision_heads"))
    self.wk, self.bk = _dense(rngs, e, e, ("vision_embed", "vision_heads"))
    self.wv, self.bv = _dense(rngs, e, e, ("vision_embed", "vision_heads"))
    self.wo, self.bo = _dense(rngs, e, e, ("vision_heads", "vision_embed"))
    self.norm2 = LayerNorm(e, cfg.layer_norm_eps)
    self.w1, self.b1 = _dense(rngs, e, m, ("vision_embed", "vision_mlp"))
    self.w2, self.b2 = _dense(rngs, m, e, ("vision_mlp", "vision_embed"))

  def __call__(self, x_BPE: Float[Array, "B P E"]) -> Float[Array, "B P E"]:
    b, p, e = x_BPE.shape
    n = self.num_heads
    h = self.norm1(x_BPE)
    q, k, v = (
        (h @ w[...] + _row(bias)).reshape(b, p, n, e // n)
        for w, bias in ((self.wq, self.bq), (self.wk, self.bk), (self.wv, self.bv))
    )
    ctx = jax.nn.dot_product_attention(q, k, v).reshape(b, p, e)
    x_BPE = x_BPE + ctx @ self.wo[...] + _row(self.bo)
    h = self.norm2(x_BPE)
    h = jax.nn.gelu(h @ self.w1[...] + _row(self.b1), approximate=True)
    return x_BPE + h @ self.w2[...] + _row(self.b2)


class VisionEncoder(nnx.Module):
  """Pixels [B, S, S, C] in [-1, 1] -> patch features [B, P, E]."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    patch_dim = cfg.patch_size * cfg.patch_size * cfg.channels
    self.patch_w, self.patch_b = _dense(rngs, patch_dim, cfg.hidden_size, ("patch", "vision_embed"))
    self.pos_embed = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (cfg.tokens_per_image, cfg.hidden_size)),
        axes=(None, "vision_embed"),
    )

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_layers(rngs):
      return EncoderLayer(cfg, rngs=rngs)

    self.layers = make_layers(rngs)
    self.post_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

  def __call__(self, pixels: Float[Array, "B S S C"]) -> Float[Array, "B P E"]:
    cfg = self.cfg
    b, s = pixels.shape[0], cfg.image_size
    g, ps = s // cfg.patch_size, cfg.patch_size
    patches = pixels.reshape(b, g, ps, g, ps, cfg.channels).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, g * g, ps * ps * cfg.channels).astype(jnp.float32)
    x = patches @ self.patch_w[...] + _row(self.patch_b) + self.pos_embed[...][None]
    x = run_layers(self.layers, x, num_layers=cfg.num_layers, remat=Remat.NONE, scan=True)
    return self.post_norm(x)


class Projector(nnx.Module):
  """Trainable two-layer MLP from encoder features to the LM's embedding space."""

  def __init__(self, encoder_width: int, lm_width: int, *, rngs: nnx.Rngs):
    self.w1, self.b1 = _dense(rngs, encoder_width, lm_width, ("vision_embed", "embed"))
    self.w2, self.b2 = _dense(rngs, lm_width, lm_width, ("embed", None))

  def __call__(self, x: Float[Array, "B P E"]) -> Float[Array, "B P D"]:
    h = jax.nn.gelu(x @ self.w1[...] + _row(self.b1), approximate=True)
    return h @ self.w2[...] + _row(self.b2)
