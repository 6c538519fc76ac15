"""The one entry point for attention; implementations plug in behind it.

xla: the reference einsum path (XLA partitions it). pallas: the flash kernels, Mosaic on TPU,
Triton on GPU, interpret mode on CPU; under a mesh they run per device via shard_map.
cudnn: jax.nn.dot_product_attention on cuDNN with the bias materialised (GPU only).
auto: pallas on accelerators, xla on CPU (interpret mode is for tests, not speed).
"""

import chex
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from stepaudio_jax.kernels import alibi_flash_gpu, alibi_flash_tpu, sharded
from stepaudio_jax.kernels.dense_bias import dense_bias_attention
from stepaudio_jax.kernels.layout import BlockSizes
from stepaudio_jax.kernels.reference import xla_attention
from stepaudio_jax.models.positional import alibi_slopes
from stepaudio_jax.parallel.mesh import LogicalSharding

BIASES = ("alibi_sqrt", "none")
IMPLEMENTATIONS = ("xla", "pallas", "cudnn", "auto")
DEFAULT_BLOCKS = {"tpu": BlockSizes(512, 512), "gpu": BlockSizes(64, 64),
                  "cpu": BlockSizes(128, 128)}
XLA_QUERY_BLOCK = 256  # the xla path skips causal key blocks past each query block

__all__ = ["BIASES", "IMPLEMENTATIONS", "BlockSizes", "attention"]


def _resolve(implementation: str, backend: str) -> str:
  if implementation == "auto":
    return "pallas" if backend in ("tpu", "gpu") else "xla"
  if implementation == "cudnn" and backend != "gpu":
    raise ValueError(f"attention implementation 'cudnn' needs a GPU, but the backend is "
                     f"{backend!r}; use 'pallas', 'xla' or 'auto'")
  return implementation


def _pallas(q, k, v, segment_ids, positions, bias, causal, shard, block_sizes, backend):
  b, t, n, _ = q.shape
  if segment_ids is None:
    segment_ids = jnp.zeros((b, t), jnp.int32)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  module = alibi_flash_gpu if backend == "gpu" else alibi_flash_tpu
  blocks = block_sizes or DEFAULT_BLOCKS.get(backend, DEFAULT_BLOCKS["cpu"])

  def kernel(q, k, v, slopes, segment_ids, positions):
    return module.flash_attention(
        q, k, v, slopes, segment_ids=segment_ids, positions=positions, bias=bias,
        causal=causal, block_sizes=blocks, interpret=backend not in ("tpu", "gpu"))

  slopes = jnp.asarray(alibi_slopes(n))
  if shard is None:
    return kernel(q, k, v, slopes, segment_ids, positions)
  return sharded.over_batch_and_heads(kernel, shard, q, k, v, slopes, segment_ids, positions)


def attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B T K H"],
    v: Float[Array, "B T K H"],
    *,
    segment_ids: Int[Array, "B T"] | None = None,
    positions: Int[Array, "B T"] | None = None,
    bias: str = "alibi_sqrt",
    causal: bool = True,
    implementation: str = "xla",
    shard: LogicalSharding | None = None,
    block_sizes: BlockSizes | None = None,
) -> Float[Array, "B T N H"]:
  """Causal GQA attention with Step1's square-root ALiBi bias (or none, for RoPE models).

  positions are in-segment positions (they drive the bias); segment_ids keep packed sequences
  apart. Query head h reads kv head h // (N // K). shard (the model's LogicalSharding) lets the
  pallas kernels run per device on batch- and head-sharded activations; block_sizes overrides
  the per-backend kernel tiles.
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
  # The mesh's devices say where the program runs (an AOT compile for TPU runs on a CPU host).
  backend = shard.mesh.devices.flat[0].platform if shard is not None else jax.default_backend()
  impl = _resolve(implementation, backend)
  common = dict(segment_ids=segment_ids, positions=positions, bias=bias, causal=causal)
  if impl == "xla":
    query_block = block_sizes.block_q if block_sizes else XLA_QUERY_BLOCK
    return xla_attention(q, k, v, **common, query_block=query_block)
  if impl == "cudnn":
    return dense_bias_attention(q, k, v, **common, implementation="cudnn")
  return _pallas(q, k, v, segment_ids, positions, bias, causal, shard, block_sizes, backend)
