"""CosyVoice-style flow model: codes -> Conformer -> length regulation -> OT-CFM with a DiT.

Axes in names: B batch, N codes, F mel frames, M mel bins, D width, E speaker vector.

Estimator: a DiT (transformer blocks with adaptive LayerNorm on the flow time), not the U-Net of
CosyVoice 1. Mel frames here come from 120 ms code groups by interpolation, so lengths are
arbitrary; a DiT has no down/up-sampling that needs lengths divisible by 2^k, attends over the
whole utterance (the prompt's timbre reaches every frame), is what CosyVoice 3 moved to, and is
one block type to scale (dim, depth, heads in `flow:`).

Everything works on normalised log-mel, (mel - flow.mel_mean) / flow.mel_std, so the Gaussian
source and the data have similar scales.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from stepaudio_jax.config.speech import FlowConfig
from stepaudio_jax.models.speech_layers import (
  Attention,
  Conv1d,
  Dense,
  LayerNorm,
  sinusoid,
)


class FeedForward(nnx.Module):
  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.up, self.down = Dense(dim, hidden, rngs=rngs), Dense(hidden, dim, rngs=rngs)

  def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
    return self.down(jax.nn.silu(self.up(x)))


class ConformerBlock(nnx.Module):
  """Macaron FF/2, self-attention, convolution module, FF/2, final norm (Gulati et al.);
  LayerNorm in the convolution module instead of BatchNorm (no batch statistics to carry)."""

  def __init__(self, dim: int, heads: int, ffn: int, kernel: int, *, rngs: nnx.Rngs):
    self.norm_ff1, self.ff1 = LayerNorm(dim), FeedForward(dim, ffn, rngs=rngs)
    self.norm_attn, self.attn = LayerNorm(dim), Attention(dim, heads, rngs=rngs)
    self.norm_conv = LayerNorm(dim)
    self.pointwise1 = Dense(dim, 2 * dim, rngs=rngs)
    self.depthwise = Conv1d(dim, dim, kernel, groups=dim, rngs=rngs)
    self.norm_depthwise = LayerNorm(dim)
    self.pointwise2 = Dense(dim, dim, rngs=rngs)
    self.norm_ff2, self.ff2 = LayerNorm(dim), FeedForward(dim, ffn, rngs=rngs)
    self.norm_out = LayerNorm(dim)

  def __call__(self, x: Float[Array, "B N D"], mask: Bool[Array, "B N"]) -> Float[Array, "B N D"]:
    keep = mask[:, :, None].astype(x.dtype)
    x = x + 0.5 * self.ff1(self.norm_ff1(x))
    x = x + self.attn(self.norm_attn(x), mask)
    y = jax.nn.glu(self.pointwise1(self.norm_conv(x)), axis=-1) * keep
    y = jax.nn.silu(self.norm_depthwise(self.depthwise(y)))
    x = x + self.pointwise2(y)
    x = x + 0.5 * self.ff2(self.norm_ff2(x))
    return self.norm_out(x) * keep


class DiTBlock(nnx.Module):
  """x + gate * attn(modulate(norm(x))), then the same with an MLP; shift/scale/gate from t."""

  def __init__(self, dim: int, heads: int, ffn: int, *, rngs: nnx.Rngs):
    self.norm1, self.attn = LayerNorm(dim), Attention(dim, heads, rngs=rngs)
    self.norm2, self.mlp = LayerNorm(dim), FeedForward(dim, ffn, rngs=rngs)
    self.modulation = Dense(dim, 6 * dim, rngs=rngs, std=0.0)  # adaLN-zero: starts as identity

  def __call__(self, x: Float[Array, "B F D"], mask: Bool[Array, "B F"],
               temb: Float[Array, "B D"]) -> Float[Array, "B F D"]:
    mods = jnp.split(self.modulation(jax.nn.silu(temb))[:, None, :], 6, axis=-1)
    shift1, scale1, gate1, shift2, scale2, gate2 = mods
    x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1, mask)
    return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


def regulate(h: Float[Array, "B N D"], n: Int[Array, " B"], f: Int[Array, " B"], frames: int
             ) -> Float[Array, "B F D"]:
  """Length regulation: stretch each row's n valid code vectors linearly onto its f frames
  (frame j samples code position (j + 0.5) * n / f - 0.5); frames past f are zero."""
  j = jnp.arange(frames, dtype=jnp.float32)[None, :]
  nf, ff = n.astype(jnp.float32)[:, None], jnp.maximum(f, 1).astype(jnp.float32)[:, None]
  src = jnp.clip((j + 0.5) * nf / ff - 0.5, 0.0, jnp.maximum(nf - 1, 0.0))
  lo = jnp.floor(src).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, jnp.maximum(n[:, None] - 1, 0))
  w = (src - lo)[:, :, None]
  take = lambda idx: jnp.take_along_axis(h, idx[:, :, None], axis=1)
  out = take(lo) * (1 - w) + take(hi) * w
  return out * (j < f[:, None].astype(jnp.float32))[:, :, None]


class FlowModel(nnx.Module):
  """encode(codes) -> mu per mel frame; velocity(x_t, t | mu, speaker, prompt mel)."""

  def __init__(self, cfg: FlowConfig, n_mels: int, speaker_dim: int, *, rngs: nnx.Rngs):
    self.cfg, self.n_mels = cfg, n_mels
    self.code_embed = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab, cfg.embed_dim)),
                                axes=(None, None))
    self.encoder = nnx.List([ConformerBlock(cfg.embed_dim, cfg.encoder_heads, cfg.encoder_ffn,
                                            cfg.encoder_kernel, rngs=rngs)
                             for _ in range(cfg.encoder_layers)])
    self.encoder_proj = Dense(cfg.embed_dim, n_mels, rngs=rngs)
    self.speaker_proj = Dense(speaker_dim, n_mels, rngs=rngs)
    self.input_proj = Dense(4 * n_mels, cfg.dim, rngs=rngs)
    self.time_mlp1, self.time_mlp2 = Dense(cfg.dim, cfg.dim, rngs=rngs), Dense(cfg.dim, cfg.dim,
                                                                              rngs=rngs)
    self.blocks = nnx.List([DiTBlock(cfg.dim, cfg.heads, cfg.ffn, rngs=rngs)
                            for _ in range(cfg.depth)])
    self.norm_out = LayerNorm(cfg.dim)
    self.out_modulation = Dense(cfg.dim, 2 * cfg.dim, rngs=rngs, std=0.0)
    self.out_proj = Dense(cfg.dim, n_mels, rngs=rngs, std=0.0)

  def encode(self, codes: Int[Array, "B N"], n: Int[Array, " B"], f: Int[Array, " B"],
             frames: int) -> Float[Array, "B F M"]:
    """mu: the codes' Conformer features, stretched to mel frames and projected to M bins."""
    mask = jnp.arange(codes.shape[1])[None, :] < n[:, None]
    x = jnp.take(self.code_embed[...], codes, axis=0)
    x = x + sinusoid(jnp.arange(codes.shape[1], dtype=jnp.float32), x.shape[-1], 1.0)[None]
    for block in self.encoder:
      x = block(x, mask)
    return self.encoder_proj(regulate(x, n, f, frames))

  def speaker(self, spk: Float[Array, "B E"]) -> Float[Array, "B M"]:
    """L2-normalise, then project to the mel bins (CosyVoice's spk_embed_affine_layer)."""
    return self.speaker_proj(spk * jax.lax.rsqrt(jnp.sum(spk**2, -1, keepdims=True) + 1e-12))

  def velocity(self, x: Float[Array, "B F M"], mask: Bool[Array, "B F"], mu: Float[Array, "B F M"],
               t: Float[Array, " B"], spk: Float[Array, "B M"], cond: Float[Array, "B F M"]
               ) -> Float[Array, "B F M"]:
    """The estimator's velocity at x_t; mu, spk and cond all zero = unconditional."""
    s = jnp.broadcast_to(spk[:, None, :], x.shape)
    h = self.input_proj(jnp.concatenate([x, mu, s, cond], axis=-1))
    h = h + sinusoid(jnp.arange(x.shape[1], dtype=jnp.float32), h.shape[-1], 1.0)[None]
    temb = self.time_mlp2(jax.nn.silu(self.time_mlp1(sinusoid(t, h.shape[-1]))))
    for block in self.blocks:
      h = block(h, mask, temb)
    shift, scale = jnp.split(self.out_modulation(jax.nn.silu(temb))[:, None, :], 2, axis=-1)
    out = self.out_proj(self.norm_out(h) * (1 + scale) + shift)
    return out * mask[:, :, None].astype(out.dtype)


def cosine_times(steps: int) -> Float[Array, " S"]:
  """The Euler grid t = 1 - cos(u * pi / 2), u uniform on [0, 1]: small steps near the noise."""
  return 1.0 - jnp.cos(jnp.linspace(0.0, 1.0, steps + 1) * jnp.pi / 2)


def solve(model: FlowModel, mu: Float[Array, "B F M"], mask: Bool[Array, "B F"],
          spk: Float[Array, "B M"], cond: Float[Array, "B F M"], rng: jax.Array
          ) -> Float[Array, "B F M"]:
  """Euler from noise to mel (normalised) over cosine_times, classifier-free guided:
  v = (1 + w) * v(x | mu, spk, cond) - w * v(x | nothing), both in one batched call."""
  cfg = model.cfg
  x = jax.random.normal(rng, mu.shape) * mask[:, :, None]
  ts = cosine_times(cfg.steps)
  zeros = jnp.zeros_like
  mu2, mask2 = jnp.concatenate([mu, zeros(mu)]), jnp.concatenate([mask, mask])
  spk2, cond2 = jnp.concatenate([spk, zeros(spk)]), jnp.concatenate([cond, zeros(cond)])
  b = mu.shape[0]

  def step(x, i):
    t = jnp.full((2 * b,), ts[i])
    v = model.velocity(jnp.concatenate([x, x]), mask2, mu2, t, spk2, cond2)
    v = (1 + cfg.cfg_rate) * v[:b] - cfg.cfg_rate * v[b:]
    return x + (ts[i + 1] - ts[i]) * v, None

  x, _ = jax.lax.scan(step, x, jnp.arange(cfg.steps))
  return x
