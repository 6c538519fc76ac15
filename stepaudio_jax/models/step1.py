"""Step1 decoder-only LM: pre-norm RMSNorm, GQA with square-root ALiBi, SwiGLU, no biases.

Axes used in names and einsums:
  B batch, T sequence, D model width, N query heads, K kv heads, H head dim, F SwiGLU width,
  V vocabulary, L layers.

Parameters are fp32 and carry logical axis names (metadata `axes`); the forward pass casts them
to `compute_dtype`. Layers are created stacked on a leading L axis and run by `run_layers`.
"""

import dataclasses
import enum

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, Int

from stepaudio_jax import kernels
from stepaudio_jax.models.positional import apply_rope
from stepaudio_jax.models.scan import Remat, run_layers
from stepaudio_jax.parallel.mesh import LogicalSharding


class PositionEncoding(str, enum.Enum):
  ALIBI_SQRT = "alibi_sqrt"  # Step1: bias -slope * sqrt(i - j), no RoPE
  ROPE = "rope"  # Llama-style ablation; exports as LlamaForCausalLM


class AttentionImpl(str, enum.Enum):
  XLA = "xla"
  PALLAS = "pallas"
  CUDNN = "cudnn"
  AUTO = "auto"


class DType(str, enum.Enum):
  FLOAT32 = "float32"
  BFLOAT16 = "bfloat16"


@dataclasses.dataclass(frozen=True)
class Step1Config:
  """One Step1 LM. Defaults are Step-Audio-Chat (130B), facts.md section 1."""

  vocab_size: int = 74752
  hidden_size: int = 12288
  num_layers: int = 88
  num_heads: int = 96
  num_kv_heads: int = 8  # num_attention_groups in the public config
  head_dim: int = 128
  intermediate_size: int = 31232
  max_seq_len: int = 32768
  rms_norm_eps: float = 1e-5
  position_encoding: PositionEncoding = PositionEncoding.ALIBI_SQRT
  rope_theta: float = 10000.0
  attention: AttentionImpl = AttentionImpl.XLA
  remat: Remat = Remat.FULL
  scan_layers: bool = True
  param_dtype: DType = DType.FLOAT32
  compute_dtype: DType = DType.BFLOAT16
  init_std: float = 0.02

  def __post_init__(self):
    for f in dataclasses.fields(self):
      if isinstance(f.type, type) and issubclass(f.type, enum.Enum):
        object.__setattr__(self, f.name, f.type(getattr(self, f.name)))
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "intermediate_size", "max_seq_len"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}"
      )
    if self.position_encoding == PositionEncoding.ROPE and self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rope")

  def num_params(self, include_embedding: bool = True) -> int:
    d, f = self.hidden_size, self.intermediate_size
    attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    layer = attn + 3 * d * f + 2 * d
    embed = 2 * self.vocab_size * d if include_embedding else 0
    return self.num_layers * layer + d + embed


def _param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), axes=axes)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, dtype):
    self.scale = nnx.Param(jnp.ones((dim,), dtype), axes=("norm",))
    self.eps = eps

  def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)[None, None, :]).astype(x.dtype)


class Block(nnx.Module):
  """x + attn(norm(x)), then x + swiglu(norm(x))."""

  def __init__(self, cfg: Step1Config, shard: LogicalSharding | None, *, rngs: nnx.Rngs):
    self.cfg, self.shard = cfg, shard
    d, n, k, h, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                     cfg.intermediate_size)
    pd, std = jnp.dtype(cfg.param_dtype.value), cfg.init_std
    self.input_norm = RMSNorm(d, cfg.rms_norm_eps, pd)
    self.wq = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std, pd)
    self.wk = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std, pd)
    self.wv = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std, pd)
    self.wo = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), std, pd)
    self.post_attention_norm = RMSNorm(d, cfg.rms_norm_eps, pd)
    self.w_gate = _param(rngs, (d, f), ("embed", "mlp"), std, pd)
    self.w_up = _param(rngs, (d, f), ("embed", "mlp"), std, pd)
    self.w_down = _param(rngs, (f, d), ("mlp", "embed"), std, pd)

  def _constrain(self, x, axes):
    return x if self.shard is None else self.shard.constrain(x, axes)

  def __call__(
      self, x_BTD: Float[Array, "B T D"], segment_ids: Int[Array, "B T"], positions: Int[Array, "B T"]
  ) -> Float[Array, "B T D"]:
    cfg = self.cfg
    cd = jnp.dtype(cfg.compute_dtype.value)
    x_BTD = self._constrain(x_BTD, ("act_batch", "act_length", "act_embed"))

    h = self.input_norm(x_BTD)
    q_BTNH = checkpoint_name(jnp.einsum("btd,dnh->btnh", h, self.wq[...].astype(cd)), "query")
    k_BTKH = checkpoint_name(jnp.einsum("btd,dkh->btkh", h, self.wk[...].astype(cd)), "key")
    v_BTKH = checkpoint_name(jnp.einsum("btd,dkh->btkh", h, self.wv[...].astype(cd)), "value")
    q_BTNH = self._constrain(q_BTNH, ("act_batch", "act_length", "act_heads", None))
    k_BTKH = self._constrain(k_BTKH, ("act_batch", "act_length", "act_kv_heads", None))
    v_BTKH = self._constrain(v_BTKH, ("act_batch", "act_length", "act_kv_heads", None))
    if cfg.position_encoding == PositionEncoding.ROPE:
      q_BTNH = apply_rope(q_BTNH, positions, cfg.rope_theta)
      k_BTKH = apply_rope(k_BTKH, positions, cfg.rope_theta)
      bias = "none"
    else:
      bias = "alibi_sqrt"
    ctx_BTNH = kernels.attention(
        q_BTNH, k_BTKH, v_BTKH, segment_ids=segment_ids, positions=positions, bias=bias,
        causal=True, implementation=cfg.attention.value, shard=self.shard,
    )
    ctx_BTNH = checkpoint_name(ctx_BTNH, "attention_context")
    x_BTD = x_BTD + jnp.einsum("btnh,nhd->btd", ctx_BTNH, self.wo[...].astype(cd))

    h = self.post_attention_norm(x_BTD)
    gate_BTF = jnp.einsum("btd,df->btf", h, self.w_gate[...].astype(cd))
    up_BTF = jnp.einsum("btd,df->btf", h, self.w_up[...].astype(cd))
    act_BTF = self._constrain(jax.nn.silu(gate_BTF) * up_BTF, ("act_batch", "act_length", "act_mlp"))
    return x_BTD + jnp.einsum("btf,fd->btd", act_BTF, self.w_down[...].astype(cd))


class Step1(nnx.Module):
  """Embedding -> L blocks -> final norm -> untied LM head (fp32 logits)."""

  def __init__(self, cfg: Step1Config, shard: LogicalSharding | None = None, *, rngs: nnx.Rngs):
    self.cfg, self.shard = cfg, shard
    pd = jnp.dtype(cfg.param_dtype.value)
    self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                        cfg.init_std, pd)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_layers(rngs):
      return Block(cfg, shard, rngs=rngs)

    self.layers = make_layers(rngs)
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
    self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                          cfg.init_std, pd)

  def embed_tokens(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T D"]:
    return self.embed[...].astype(jnp.dtype(self.cfg.compute_dtype.value))[tokens]

  def decode(
      self, x_BTD: Float[Array, "B T D"], segment_ids: Int[Array, "B T"], positions: Int[Array, "B T"]
  ) -> Float[Array, "B T V"]:
    cfg = self.cfg
    x_BTD = run_layers(self.layers, x_BTD, segment_ids, positions, num_layers=cfg.num_layers,
                       remat=cfg.remat, scan=cfg.scan_layers)
    h = self.final_norm(x_BTD)
    logits = jnp.einsum("btd,dv->btv", h, self.lm_head[...].astype(h.dtype),
                        preferred_element_type=jnp.float32)
    if self.shard is not None:
      logits = self.shard.constrain(logits, ("act_batch", "act_length", "act_vocab"))
    return logits

  def __call__(
      self,
      tokens: Int[Array, "B T"],
      segment_ids: Int[Array, "B T"] | None = None,
      positions: Int[Array, "B T"] | None = None,
  ) -> Float[Array, "B T V"]:
    b, t = tokens.shape
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return self.decode(self.embed_tokens(tokens), segment_ids, positions)
