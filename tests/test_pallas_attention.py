"""The Pallas flash kernels (interpret mode) against the XLA reference, and the dispatcher.

Tolerances are relative to the largest reference magnitude. fp32: 1e-5 (measured <= 1.1e-6, the
difference of online vs two-pass softmax). bf16: the kernels and the reference both round p and
ds to bf16 before their matmuls, at different points, so they are compared to an fp32 reference
on the same bf16 inputs with 1.5e-2, about four bf16 ulps (measured <= 4.4e-3).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stepaudio_jax import kernels
from stepaudio_jax.config.mesh import MeshConfig
from stepaudio_jax.data.synthetic import SyntheticSource
from stepaudio_jax.kernels import alibi_flash_gpu, alibi_flash_tpu
from stepaudio_jax.kernels.alibi import alibi_slopes
from stepaudio_jax.kernels.dense_bias import dense_bias_attention
from stepaudio_jax.kernels.layout import BlockSizes
from stepaudio_jax.kernels.reference import xla_attention
from stepaudio_jax.parallel.mesh import LogicalSharding, make_mesh
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training.setup import setup

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1.5e-2}
KERNELS = {"tpu": alibi_flash_tpu.flash_attention, "gpu": alibi_flash_gpu.flash_attention}


@dataclasses.dataclass(frozen=True)
class Case:
  heads: int
  kv_heads: int
  head_dim: int
  length: int
  dtype: type
  segments: int
  blocks: BlockSizes
  bias: str = "alibi_sqrt"
  causal: bool = True


CASES = {
    "mha_h64_fp32_odd": Case(2, 2, 64, 67, jnp.float32, 1, BlockSizes(32, 32)),
    "gqa4_h128_bf16_3seg": Case(4, 1, 128, 130, jnp.bfloat16, 3, BlockSizes(32, 64)),
    "gqa12_h64_fp32_2seg": Case(12, 1, 64, 77, jnp.float32, 2, BlockSizes(64, 32)),
    "gqa12_h128_bf16_4seg": Case(12, 1, 128, 96, jnp.bfloat16, 4, BlockSizes(32, 32)),
    "gqa4_h128_fp32_2seg": Case(8, 2, 128, 150, jnp.float32, 2, BlockSizes(64, 64)),
    "rope_nobias_bf16": Case(4, 2, 64, 100, jnp.bfloat16, 2, BlockSizes(32, 32), bias="none"),
    "noncausal_fp32": Case(4, 2, 64, 70, jnp.float32, 2, BlockSizes(32, 32), causal=False),
}


def _packing(length, segments, batch, seed):
  """Random segment boundaries per row; positions restart at 0 in every segment."""
  rng = np.random.default_rng(seed)
  seg = np.zeros((batch, length), np.int32)
  for row in seg:
    cuts = np.sort(rng.choice(np.arange(1, length), segments - 1, replace=False))
    for c in cuts:
      row[c:] += 1
  pos = np.zeros_like(seg)
  for r in range(batch):
    for t in range(1, length):
      pos[r, t] = 0 if seg[r, t] != seg[r, t - 1] else pos[r, t - 1] + 1
  return jnp.asarray(seg), jnp.asarray(pos)


def _inputs(c: Case, batch=2, seed=0):
  kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (batch, c.length, c.heads, c.head_dim)).astype(c.dtype)
  k = jax.random.normal(kk, (batch, c.length, c.kv_heads, c.head_dim)).astype(c.dtype)
  v = jax.random.normal(kv, (batch, c.length, c.kv_heads, c.head_dim)).astype(c.dtype)
  do = jax.random.normal(kd, q.shape, jnp.float32)
  seg, pos = _packing(c.length, c.segments, batch, seed)
  return q, k, v, do, seg, pos


def _value_and_grads(fn, q, k, v, do):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(do.astype(out.dtype)))


def _max_rel_err(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_matches_reference(kernel, name):
  c = CASES[name]
  q, k, v, do, seg, pos = _inputs(c)
  slopes = jnp.asarray(alibi_slopes(c.heads))
  flash = functools.partial(KERNELS[kernel], slopes=slopes, segment_ids=seg, positions=pos,
                            bias=c.bias, causal=c.causal, block_sizes=c.blocks, interpret=True)
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  ref = functools.partial(xla_attention, q_segment_ids=seg, q_positions=pos, bias=c.bias,
                          causal=c.causal)
  got = jax.jit(functools.partial(_value_and_grads, flash))(q, k, v, do)
  want = _value_and_grads(ref, f32(q), f32(k), f32(v), do)
  for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert g.dtype == c.dtype, what
    err = _max_rel_err(g, w)
    assert err < TOL[c.dtype], f"{what}: max error {err:.2e} of the largest value"


@pytest.mark.skipif(jax.default_backend() not in KERNELS, reason="needs a GPU or TPU "
                    "(JAX_PLATFORMS=cuda or tpu); interpret mode is tested above")
@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_kernel_matches_reference_on_the_accelerator(name):
  """The same cases compiled for this accelerator (Triton or Mosaic), forward and backward,
  against an fp32 reference at full matmul precision; fp32 within 2e-3 (TF32 / bf16-pass
  matmuls inside the kernel), bf16 as above."""
  c = CASES[name]
  q, k, v, do, seg, pos = _inputs(c)
  flash = functools.partial(KERNELS[jax.default_backend()], slopes=jnp.asarray(
      alibi_slopes(c.heads)), segment_ids=seg, positions=pos, bias=c.bias, causal=c.causal,
      block_sizes=c.blocks)
  got = jax.jit(functools.partial(_value_and_grads, flash))(q, k, v, do)
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  with jax.default_matmul_precision("highest"):
    want = _value_and_grads(functools.partial(
        xla_attention, q_segment_ids=seg, q_positions=pos, bias=c.bias, causal=c.causal),
        f32(q), f32(k), f32(v), do)
  for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    err = _max_rel_err(g, w)
    assert err < max(TOL[c.dtype], 2e-3), f"{what}: max error {err:.2e} of the largest value"


def test_dispatcher_pallas_equals_xla_and_auto_is_pallas_only_on_tpu():
  c = CASES["gqa4_h128_fp32_2seg"]
  q, k, v, do, seg, pos = _inputs(c, seed=1)
  args = dict(q_segment_ids=seg, q_positions=pos)
  want = _value_and_grads(functools.partial(kernels.attention, **args), q, k, v, do)
  got = _value_and_grads(functools.partial(
      kernels.attention, **args, implementation="pallas", block_sizes=BlockSizes(64, 64)),
      q, k, v, do)
  for g, w in zip(got, want):
    assert _max_rel_err(g, w) < TOL[jnp.float32]
  auto = jax.make_jaxpr(functools.partial(kernels.attention, implementation="auto"))(q, k, v)
  assert "pallas_call" not in str(auto)
  # the Triton kernels have never run on a GPU: auto leaves them to an explicit request
  assert [kernels.resolve("auto", b) for b in ("tpu", "gpu", "cpu")] == ["pallas", "xla", "xla"]
  assert kernels.resolve("pallas", "gpu") == "pallas"


def test_cudnn_needs_a_gpu_and_its_dense_bias_is_right():
  c = CASES["gqa12_h64_fp32_2seg"]
  q, k, v, _, seg, pos = _inputs(c)
  with pytest.raises(ValueError, match="cudnn.*needs a GPU"):
    kernels.attention(q, k, v, implementation="cudnn")
  dense = dense_bias_attention(q, k, v, segment_ids=seg, positions=pos, bias="alibi_sqrt",
                               causal=True, implementation="xla")
  want = xla_attention(q, k, v, q_segment_ids=seg, q_positions=pos, bias="alibi_sqrt",
                       causal=True)
  assert _max_rel_err(dense, want) < TOL[jnp.float32]


def test_sharded_under_remat_matches_xla():
  """shard_map over (data, fsdp) x tensor inside jit and jax.checkpoint, gradients included."""
  shard = LogicalSharding.create(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)),
                                 MeshConfig().rules)
  c = Case(8, 2, 64, 72, jnp.float32, 2, BlockSizes(32, 32))
  q, k, v, do, seg, pos = _inputs(c, batch=4, seed=2)

  def loss(impl, q, k, v):
    attn = jax.checkpoint(functools.partial(
        kernels.attention, q_segment_ids=seg, q_positions=pos, implementation=impl, shard=shard,
        block_sizes=c.blocks))
    return jnp.sum(attn(q, k, v) * do)

  q, k, v = (shard.constrain(x, ("act_batch", "act_length", "act_heads", None))
             for x in (q, k, v))
  got = jax.jit(jax.value_and_grad(functools.partial(loss, "pallas"), (0, 1, 2)))(q, k, v)
  want = jax.value_and_grad(functools.partial(loss, "xla"), (0, 1, 2))(q, k, v)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, w in zip(got[1], want[1]):
    assert _max_rel_err(g, w) < TOL[jnp.float32]
  text = jax.jit(functools.partial(loss, "pallas")).lower(q, k, v).as_text()
  assert "shard_map" in text or "sdy.manual_computation" in text


def _tiny_losses(attention, steps=3):
  cfg = load_config("configs/tiny.yaml", ["mesh.fsdp=2", "mesh.data=2", "mesh.tensor=2",
                                          f"model.attention={attention}",
                                          "optimizer.learning_rate=1e-2",
                                          "optimizer.warmup_steps=0"])
  run = setup(cfg)
  source = SyntheticSource(cfg.synthetic, cfg.tokens, cfg.vision, cfg.train.seq_len, 0)
  with jax.set_mesh(run.mesh):
    state = run.init()
  losses = []
  for i in range(steps):
    state, metrics = run.train(state, jax.device_put(source.batch(0, i, range(8)),
                                                     run.batch_shardings))
    losses.append(float(metrics["loss"]))
  return losses


def test_tiny_model_trains_the_same_with_pallas():
  np.testing.assert_allclose(_tiny_losses("pallas"), _tiny_losses("xla"), rtol=2e-5)
