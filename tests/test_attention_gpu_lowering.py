"""The GPU (Triton) kernels lower for CUDA on this CPU host: forward and backward.

No GPU here, so this stops at Pallas -> Triton IR (the step that rejects unsupported ops and
block shapes); PTX compilation and the numbers on a real GPU are checked where one is lent.
"""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from stepaudio_jax.kernels import alibi_flash_gpu
from stepaudio_jax.kernels.alibi import alibi_slopes
from stepaudio_jax.kernels.layout import BlockSizes

TRITON = "__gpu$xla.gpu.triton"
B, T, K, H = 2, 200, 2, 64  # T not a multiple of the block


def _lower_for_cuda(fn, n):
  args = (jax.ShapeDtypeStruct((B, T, n, H), jnp.bfloat16),
          jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16),
          jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16),
          jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B, T), jnp.int32))
  exported = export.export(
      jax.jit(fn), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
  return exported.mlir_module()


@pytest.mark.parametrize("n,bias", [(8, "alibi_sqrt"), (24, "alibi_sqrt"), (8, "none")])
def test_forward_and_backward_lower_to_triton(n, bias):
  slopes = jnp.asarray(alibi_slopes(n))

  def attend(q, k, v, seg, pos):
    return alibi_flash_gpu.flash_attention(
        q, k, v, slopes, segment_ids=seg, positions=pos, bias=bias, causal=True,
        block_sizes=BlockSizes(64, 64), interpret=False)

  def loss(q, k, v, seg, pos):
    return attend(q, k, v, seg, pos).astype(jnp.float32).sum()

  assert _lower_for_cuda(attend, n).count(f"@{TRITON}(") == 1
  # backward: the forward (for the residuals), then the dq and the dk/dv kernels
  assert _lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), n).count(f"@{TRITON}(") == 3
