"""Step1 decoder-only LM: pre-norm RMSNorm, GQA with square-root ALiBi, SwiGLU, no biases.

Axes used in names and einsums:
  B batch, T sequence (the new tokens), S key slots (the KV cache), D model width, N query
  heads, K kv heads, H head dim, F SwiGLU width, V vocabulary, L layers.

Parameters are fp32 and carry logical axis names (metadata `axes`); the forward pass casts them
to `compute_dtype`. Layers are created stacked on a leading L axis and run by `run_layers`.

The model is a backbone (`embed_tokens`, `hidden_states`) and a head (`logits`). Training calls
the whole (`__call__`); a reward or value model is the backbone without the LM head plus a
`ScalarHead` (heads.py); decoding runs new tokens against a KV cache (`extend`).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, Int

from stepaudio_jax import kernels
from stepaudio_jax.config.model import PositionEncoding, Step1Config
from stepaudio_jax.kernels.layout import BlockSizes, default_segments
from stepaudio_jax.models.kv_cache import KVCache
from stepaudio_jax.models.linear import project
from stepaudio_jax.models.positional import apply_rope
from stepaudio_jax.models.scan import run_layers
from stepaudio_jax.parallel.mesh import LogicalSharding


def _param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), axes=axes)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, dtype):
    self.scale = nnx.Param(jnp.ones((dim,), dtype), axes=("norm",))
    self.eps = eps

  @jax.named_scope("norm")
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
      self,
      x_BTD: Float[Array, "B T D"],
      segment_ids: Int[Array, "B T"],
      positions: Int[Array, "B T"],
      cache: KVCache | None = None,
  ) -> Float[Array, "B T D"] | tuple[Float[Array, "B T D"], KVCache]:
    """Without a cache: self-attention within segments. With this layer's cache: the new keys
    and values go in at cache.index, the queries attend to every slot, and the updated cache
    comes back with x."""
    cfg = self.cfg
    cd = jnp.dtype(cfg.compute_dtype.value)
    x_BTD = self._constrain(x_BTD, ("act_batch", "act_length", "act_embed"))

    h = self.input_norm(x_BTD)
    with jax.named_scope("attention"):  # scopes name the parts in profiles and HLO dumps
      q_BTNH = checkpoint_name(project(h, self.wq[...].astype(cd)), "query")
      k_BTKH = checkpoint_name(project(h, self.wk[...].astype(cd)), "key")
      v_BTKH = checkpoint_name(project(h, self.wv[...].astype(cd)), "value")
      q_BTNH = self._constrain(q_BTNH, ("act_batch", "act_length", "act_heads", None))
      k_BTKH = self._constrain(k_BTKH, ("act_batch", "act_length", "act_kv_heads", None))
      v_BTKH = self._constrain(v_BTKH, ("act_batch", "act_length", "act_kv_heads", None))
      if cfg.position_encoding == PositionEncoding.ROPE:
        q_BTNH = apply_rope(q_BTNH, positions, cfg.rope_theta)
        k_BTKH = apply_rope(k_BTKH, positions, cfg.rope_theta)
        bias = "none"
      else:
        bias = "alibi_sqrt"
      k_BSKH, v_BSKH, kv_segment_ids, kv_positions = k_BTKH, v_BTKH, None, None  # S = T
      kv_length = None
      if cache is not None:
        cache = cache.write_layer(k_BTKH, v_BTKH)
        k_BSKH, v_BSKH = cache.keys, cache.values
        kv_segment_ids, kv_positions = cache.segment_ids, cache.positions
        kv_length = cache.index + x_BTD.shape[1]  # the filled slots, these tokens' included
      ctx_BTNH = kernels.attention(
          q_BTNH, k_BSKH, v_BSKH, q_segment_ids=segment_ids, q_positions=positions,
          kv_segment_ids=kv_segment_ids, kv_positions=kv_positions, kv_length=kv_length,
          bias=bias, causal=True, implementation=cfg.attention.value, shard=self.shard,
          block_sizes=BlockSizes(cfg.attention_block_q, cfg.attention_block_k),
      )
      ctx_BTNH = checkpoint_name(ctx_BTNH, "attention_context")
      x_BTD = x_BTD + project(ctx_BTNH, self.wo[...].astype(cd), contract=2)
      x_BTD = checkpoint_name(x_BTD, "attention_residual")

    h = self.post_attention_norm(x_BTD)
    with jax.named_scope("mlp"):
      gate_BTF = checkpoint_name(project(h, self.w_gate[...].astype(cd)), "mlp_gate")
      up_BTF = checkpoint_name(project(h, self.w_up[...].astype(cd)), "mlp_up")
      act_BTF = self._constrain(jax.nn.silu(gate_BTF) * up_BTF,
                                ("act_batch", "act_length", "act_mlp"))
      x_BTD = x_BTD + project(act_BTF, self.w_down[...].astype(cd))
    return x_BTD if cache is None else (x_BTD, cache)


class Step1(nnx.Module):
  """Embedding -> L blocks -> final norm -> untied LM head (fp32 logits).

  with_lm_head=False builds the backbone alone, with no `lm_head` parameter (the trunk of a
  reward or value model). Parameter names (embed, layers/..., final_norm/scale, lm_head) are
  what checkpoints and the exporter read.
  """

  def __init__(
      self,
      cfg: Step1Config,
      shard: LogicalSharding | None = None,
      *,
      with_lm_head: bool = True,
      rngs: nnx.Rngs,
  ):
    self.cfg, self.shard = cfg, shard
    if shard is not None:  # attention splits heads over tensor x sequence (kernels/sharded.py)
      for name, heads, axis in (("num_heads", cfg.num_heads, "act_attn_heads"),
                                ("num_kv_heads", cfg.num_kv_heads, "act_attn_kv_heads")):
        shard.check_divides(f"attention heads (model.{name}={heads})", (heads,), (axis,))
    pd = jnp.dtype(cfg.param_dtype.value)
    self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                        cfg.init_std, pd)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_layers(rngs):
      return Block(cfg, shard, rngs=rngs)

    self.layers = make_layers(rngs)
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
    if with_lm_head:
      self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                            cfg.init_std, pd)

  @jax.named_scope("embed")
  def embed_tokens(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T D"]:
    return self.embed[...].astype(jnp.dtype(self.cfg.compute_dtype.value))[tokens]

  def hidden_states(
      self,
      x_BTD: Float[Array, "B T D"],
      segment_ids: Int[Array, "B T"],
      positions: Int[Array, "B T"],
      cache: KVCache | None = None,
  ) -> tuple[Float[Array, "B T D"], KVCache | None]:
    """The L blocks and the final norm: (h, None) without a cache; with one, the T tokens also
    attend to its slots and come back written into it (h, cache)."""
    cfg = self.cfg
    run = functools.partial(run_layers, self.layers, num_layers=cfg.num_layers,
                            remat=cfg.remat, scan=cfg.scan_layers)
    if cache is None:
      return self.final_norm(run(x_BTD, segment_ids, positions)), None
    x_BTD, cache = run(x_BTD, segment_ids, positions, cache=cache.add_slots(segment_ids, positions))
    return self.final_norm(x_BTD), cache.advance(x_BTD.shape[1])

  @jax.named_scope("lm_head")
  def logits(self, h_BTD: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
    logits = project(h_BTD, self.lm_head[...].astype(h_BTD.dtype), out_dtype=jnp.float32)
    if self.shard is not None:
      logits = self.shard.constrain(logits, ("act_batch", "act_length", "act_vocab"))
    return logits

  def __call__(
      self,
      tokens: Int[Array, "B T"],
      segment_ids: Int[Array, "B T"] | None = None,
      positions: Int[Array, "B T"] | None = None,
  ) -> Float[Array, "B T V"]:
    segment_ids, positions = default_segments(segment_ids, positions, tokens.shape)
    h_BTD, _ = self.hidden_states(self.embed_tokens(tokens), segment_ids, positions)
    return self.logits(h_BTD)

  def extend(
      self,
      tokens: Int[Array, "B T"],
      segment_ids: Int[Array, "B T"],
      positions: Int[Array, "B T"],
      cache: KVCache,
  ) -> tuple[Float[Array, "B T V"], KVCache]:
    """Run T new tokens against the cache: a prefill extends an empty cache by the (left-
    padded) prompts, a decode step extends it by one token. Positions are true positions;
    real tokens' segments are numbered from 1, as in training: 0 is left padding and empty
    slots."""
    h_BTD, cache = self.hidden_states(self.embed_tokens(tokens), segment_ids, positions, cache)
    return self.logits(h_BTD), cache
