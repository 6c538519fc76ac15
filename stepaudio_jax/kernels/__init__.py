"""The one entry point for attention; implementations plug in behind it.

xla: the reference einsum path (XLA partitions it). pallas: the flash kernels, Mosaic on TPU,
Triton on GPU, interpret mode on CPU; under a mesh they run per device via shard_map.
cudnn: jax.nn.dot_product_attention on cuDNN with the bias materialised (GPU only).
auto: pallas on TPU, xla on GPU and CPU. The Triton kernels lower for CUDA (tested on the CPU
host) but have never run on a GPU, so nothing picks them unless asked by name; interpret mode
on CPU is for tests, not speed.

Queries against a KV cache (kv_segment_ids and kv_positions given): pallas runs the decode
kernels (decode_tpu.py, decode_gpu.py; one key pass per kv head for all its query heads and new
positions, reading only the first kv_length slots), so auto picks them on TPU; xla and cudnn
run the xla path.
"""

import chex
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from stepaudio_jax.kernels import (alibi_flash_gpu, alibi_flash_tpu, decode_gpu, decode_tpu,
                                   sharded)
from stepaudio_jax.kernels.alibi import alibi_slopes
from stepaudio_jax.kernels.dense_bias import dense_bias_attention
from stepaudio_jax.kernels.layout import BlockSizes, default_segments
from stepaudio_jax.kernels.reference import xla_attention
from stepaudio_jax.parallel.mesh import LogicalSharding

BIASES = ("alibi_sqrt", "none")
IMPLEMENTATIONS = ("xla", "pallas", "cudnn", "auto")
DEFAULT_BLOCKS = {"tpu": BlockSizes(512, 512), "gpu": BlockSizes(64, 64),
                  "cpu": BlockSizes(128, 128)}
# Query rows per block of the xla path, which skips the causal key blocks past each query
# block. On CPU 128 rows beat 256 and 64 (docs/benchmarks.md).
XLA_QUERY_BLOCKS = {"tpu": 256, "gpu": 256, "cpu": 128}

__all__ = ["BIASES", "IMPLEMENTATIONS", "BlockSizes", "attention", "resolve"]


def resolve(implementation: str, backend: str) -> str:
  """The implementation that runs on `backend` ("tpu", "gpu", "cpu") for a requested one."""
  if implementation == "auto":
    return "pallas" if backend == "tpu" else "xla"
  if implementation == "cudnn" and backend != "gpu":
    raise ValueError(f"attention implementation 'cudnn' needs a GPU, but the backend is "
                     f"{backend!r}; use 'pallas', 'xla' or 'auto'")
  return implementation


def _blocks(block_sizes: BlockSizes | None, backend: str) -> BlockSizes:
  """block_sizes with its unset (0) fields taken from the backend's default."""
  default = DEFAULT_BLOCKS.get(backend, DEFAULT_BLOCKS["cpu"])
  if block_sizes is None:
    return default
  return BlockSizes(block_sizes.block_q or default.block_q, block_sizes.block_k or default.block_k)


def _pallas(q, k, v, segment_ids, positions, bias, causal, shard, block_sizes, backend):
  n = q.shape[2]
  module = alibi_flash_gpu if backend == "gpu" else alibi_flash_tpu
  blocks = _blocks(block_sizes, backend)

  def kernel(q, k, v, slopes, segment_ids, positions):
    return module.flash_attention(
        q, k, v, slopes, segment_ids=segment_ids, positions=positions, bias=bias,
        causal=causal, block_sizes=blocks, interpret=backend not in ("tpu", "gpu"))

  slopes = jnp.asarray(alibi_slopes(n))
  if shard is None:
    return kernel(q, k, v, slopes, segment_ids, positions)
  return sharded.over_batch_and_heads(kernel, shard, q, k, v, slopes, segment_ids, positions)


def _pallas_decode(q, k, v, q_seg, q_pos, kv_seg, kv_pos, kv_length, bias, causal, shard,
                   backend):
  module = decode_gpu if backend == "gpu" else decode_tpu
  length = jnp.asarray(k.shape[1] if kv_length is None else kv_length, jnp.int32)

  def kernel(q, k, v, slopes, q_seg, q_pos, kv_seg, kv_pos, length):
    return module.decode_attention(
        q, k, v, slopes, q_segment_ids=q_seg, q_positions=q_pos, kv_segment_ids=kv_seg,
        kv_positions=kv_pos, kv_length=length, bias=bias, causal=causal,
        interpret=backend not in ("tpu", "gpu"))

  slopes = jnp.asarray(alibi_slopes(q.shape[2]))
  if shard is None:
    return kernel(q, k, v, slopes, q_seg, q_pos, kv_seg, kv_pos, length)
  return sharded.decode_over_batch_and_heads(kernel, shard, q, k, v, slopes, q_seg, q_pos,
                                             kv_seg, kv_pos, length)


def attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    q_segment_ids: Int[Array, "B T"] | None = None,
    q_positions: Int[Array, "B T"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    kv_positions: Int[Array, "B S"] | None = None,
    kv_length: Int[Array, ""] | None = None,
    bias: str = "alibi_sqrt",
    causal: bool = True,
    implementation: str = "xla",
    shard: LogicalSharding | None = None,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "B T N H"]:
  """Causal GQA attention with Step1's square-root ALiBi bias (or none, for RoPE models).

  Positions are true in-segment positions (they drive the bias); segment ids keep packed
  sequences apart (missing: one segment, positions 0..T-1). Query head h reads kv head
  h // (N // K).
  Self-attention (no kv segment ids/positions): S == T, keys take the query's segment ids and
  positions, causality is by index; every implementation runs it. Against a KV cache (kv
  segment ids and positions both given): key s is visible to query t iff they share a segment
  and kv_positions[s] <= q_positions[t], the bias distance is q_positions[t] - kv_positions[s];
  pallas runs the decode kernel there, cudnn falls back to xla. kv_length (optional): slots
  0..kv_length-1 are the filled ones; the decode kernel reads no further, treating later slots
  as empty (the KV cache marks them segment 0, which only left-pad queries, whose outputs no
  real token reads, could see); the xla path reads every slot.
  shard (the model's LogicalSharding): self-attention runs with the whole sequence and a share
  of the heads on each device (the pallas kernels per device), so a sequence-sharded model
  (mesh.sequence) is all-to-all'ed in and out; block_sizes overrides the per-backend tiles
  (a 0 field keeps the default).
  """
  chex.assert_rank([q, k, v], 4)
  chex.assert_equal_shape([k, v])
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads {q.shape[2]} are not a multiple of kv heads {k.shape[2]}")
  if bias not in BIASES:
    raise ValueError(f"unknown attention bias {bias!r}; expected one of {BIASES}")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"attention implementation {implementation!r} is not available; "
        f"choose one of {IMPLEMENTATIONS}"
    )
  if (kv_segment_ids is None) != (kv_positions is None):
    raise ValueError("kv_segment_ids and kv_positions go together: give both (queries "
                     "against a KV cache) or neither (self-attention)")
  cached = kv_positions is not None
  if not cached and k.shape[1] != q.shape[1]:
    raise ValueError(f"self-attention needs as many keys as queries, got {k.shape[1]} and "
                     f"{q.shape[1]}; pass kv_segment_ids and kv_positions for a KV cache")
  # The mesh's devices say where the program runs (an AOT compile for TPU runs on a CPU host).
  backend = shard.mesh.devices.flat[0].platform if shard is not None else jax.default_backend()
  impl = "xla" if cached and implementation == "cudnn" else resolve(implementation, backend)
  q_segment_ids, q_positions = default_segments(q_segment_ids, q_positions, q.shape[:2])
  if cached and impl == "pallas":
    return _pallas_decode(q, k, v, q_segment_ids, q_positions, kv_segment_ids, kv_positions,
                          kv_length, bias, causal, shard, backend)
  if shard is None or cached:
    return _dispatch(q, k, v, q_segment_ids, q_positions, kv_segment_ids, kv_positions, bias,
                     causal, impl, shard, block_sizes, backend)
  # Self-attention under a mesh runs in the attention layout (whole sequence, a share of the
  # heads): a sequence-sharded model gets there by all-to-all; otherwise nothing moves.
  q = shard.constrain(q, sharded.ATTENTION_Q)
  k, v = (shard.constrain(x, sharded.ATTENTION_KV) for x in (k, v))
  q_segment_ids, q_positions = (shard.constrain(x, ("act_batch", None))
                                for x in (q_segment_ids, q_positions))
  out = _dispatch(q, k, v, q_segment_ids, q_positions, None, None, bias, causal, impl, shard,
                  block_sizes, backend)
  return shard.constrain(out, ("act_batch", "act_length", "act_heads", None))


def _dispatch(q, k, v, q_segment_ids, q_positions, kv_segment_ids, kv_positions, bias, causal,
              impl, shard, block_sizes, backend):
  if impl == "xla":
    query_block = ((block_sizes and block_sizes.block_q)
                   or XLA_QUERY_BLOCKS.get(backend, XLA_QUERY_BLOCKS["tpu"]))
    return xla_attention(q, k, v, q_segment_ids=q_segment_ids, q_positions=q_positions,
                         kv_segment_ids=kv_segment_ids, kv_positions=kv_positions, bias=bias,
                         causal=causal, query_block=query_block)
  if impl == "cudnn":
    return dense_bias_attention(q, k, v, segment_ids=q_segment_ids, positions=q_positions,
                                bias=bias, causal=causal, implementation="cudnn")
  return _pallas(q, k, v, q_segment_ids, q_positions, bias, causal, shard, block_sizes, backend)
