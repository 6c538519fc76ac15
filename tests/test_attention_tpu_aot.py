"""The TPU flash kernel compiled ahead of time for a real v5p topology with libtpu, on this CPU.

Proof that the kernels lower through Mosaic (tpu_custom_call in the compiled program) inside the
model's shard_map over batch and heads, and that no [T, T] array exists anywhere (temp memory).
XLA's cost estimate is printed (pytest -s) for the record.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

pytest.importorskip("libtpu", reason="libtpu is not installed: pip install 'jax[tpu]' (extra: tpu)")
# Compiling needs no chip; the lockfile guards real chips and may be left by another process.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from jax.experimental import topologies  # noqa: E402

from stepaudio_jax.kernels import alibi_flash_tpu, flops, sharded  # noqa: E402
from stepaudio_jax.kernels.alibi import alibi_slopes  # noqa: E402
from stepaudio_jax.kernels.layout import BlockSizes  # noqa: E402
from stepaudio_jax.parallel.mesh import LogicalSharding, MeshConfig  # noqa: E402

# Step-Audio-Chat's per-chip attention at tensor=8 is 12 query heads on 1 kv head, head_dim 128;
# here tensor=2 over 24/2 heads gives the same per-chip shape on a 4-chip v5p slice.
B, T, N, K, H = 4, 2048, 24, 2, 128


@pytest.fixture(scope="module")
def shard():
  topo = topologies.get_topology_desc(
      platform="tpu", topology_name="v5p:2x2x1", chip_config_name="default",
      chips_per_host_bounds=(2, 2, 1), num_slices=1)
  devices = np.asarray(topo.devices).reshape(1, 2, 2)
  return LogicalSharding.create(Mesh(devices, ("data", "fsdp", "tensor")), MeshConfig().rules)


def _compile(shard, fn):
  spec = lambda axes: shard.named(axes)  # noqa: E731
  q_sh, kv_sh = spec(("act_batch", None, "act_heads", None)), spec(("act_batch", None,
                                                                      "act_kv_heads", None))
  side = spec(("act_batch", None))
  args = (jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16, sharding=q_sh),
          jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16, sharding=kv_sh),
          jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16, sharding=kv_sh),
          jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=side),
          jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=side))
  return jax.jit(fn).lower(*args).compile()


def _attention(shard, q, k, v, seg, pos):
  kernel = functools.partial(alibi_flash_tpu.flash_attention, causal=True, bias="alibi_sqrt",
                             block_sizes=BlockSizes(512, 512))

  def per_device(q, k, v, slopes, seg, pos):
    return kernel(q, k, v, slopes, segment_ids=seg, positions=pos)

  slopes = jnp.asarray(alibi_slopes(N))
  return sharded.over_batch_and_heads(per_device, shard, q, k, v, slopes, seg, pos)


def _report(name, compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  mem = compiled.memory_analysis()
  print(f"\n[v5p:2x2x1 AOT {name}] flops={cost.get('flops', 0):.4g} "
        f"transcendentals={cost.get('transcendentals', 0):.4g} "
        f"bytes_accessed={cost.get('bytes accessed', 0):.4g} "
        f"optimal_seconds={cost.get('optimal_seconds', 0):.4g} "
        f"temp_bytes={mem.temp_size_in_bytes} argument_bytes={mem.argument_size_in_bytes}")
  return cost, mem


def test_forward_compiles_through_mosaic(shard):
  compiled = _compile(shard, functools.partial(_attention, shard))
  assert compiled.as_text().count("tpu_custom_call") == 1
  cost, mem = _report("forward", compiled)
  per_chip = flops.attention_flops(B // 2, T, N // 2, H, True, flops.FWD_MATMULS)
  assert cost["flops"] >= per_chip
  # a bf16 [T, T] bias for this chip's 12 heads alone would be 200 MB
  assert mem.temp_size_in_bytes < 64 * 2**20


def test_backward_compiles_through_mosaic(shard):
  def loss(q, k, v, seg, pos):
    return jnp.sum(_attention(shard, q, k, v, seg, pos).astype(jnp.float32))

  compiled = _compile(shard, jax.grad(loss, argnums=(0, 1, 2)))
  text = compiled.as_text()
  assert text.count("tpu_custom_call") == 3  # forward, dq, dk/dv
  cost, mem = _report("forward+backward", compiled)
  per_chip = flops.attention_flops(B // 2, T, N // 2, H, True,
                                   flops.FWD_MATMULS + flops.BWD_MATMULS)
  assert cost["flops"] >= per_chip
  assert mem.temp_size_in_bytes < 128 * 2**20
