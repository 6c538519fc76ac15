"""The decode-attention kernels (interpret mode) against the XLA reference, inside the decoder,
and compiled for v5p with libtpu.

Tolerances are relative to the largest reference magnitude. fp32: 1e-5 (online vs two-pass
softmax). bf16: the kernels round the probabilities to bf16 before the p.v matmul, as the
reference does at a different point; compared to an fp32 reference on the same bf16 inputs,
1e-2 (measured <= 4e-3).
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stepaudio_jax import kernels
from stepaudio_jax.config.mesh import MeshConfig
from stepaudio_jax.inference import decode
from stepaudio_jax.kernels import decode_gpu, decode_tpu
from stepaudio_jax.kernels.alibi import alibi_slopes
from stepaudio_jax.kernels.reference import xla_attention
from stepaudio_jax.models.step1 import Step1
from stepaudio_jax.parallel.mesh import LogicalSharding, logical_axes, make_mesh
from stepaudio_jax.tasks.registry import load_config

KERNELS = {"tpu": decode_tpu.decode_attention, "gpu": decode_gpu.decode_attention}
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


@dataclasses.dataclass(frozen=True)
class Case:
  new: int  # T, new query positions per row
  heads: int
  kv_heads: int
  head_dim: int
  slots: int  # S
  filled: int  # kv_length: the slots written so far (the new tokens' included)
  dtype: type = jnp.float32
  bias: str = "alibi_sqrt"
  block_k: int = 16
  block_rows: int = 64


CASES = {
    "step_mha_fp32": Case(1, 4, 4, 64, 64, 41),
    "step_gqa6_onekv_fp32": Case(1, 6, 1, 128, 48, 48),  # K=1: the squeezed-cache path
    "step_gqa4_bf16": Case(1, 8, 2, 128, 80, 57, jnp.bfloat16),
    "draft4_gqa4_fp32": Case(4, 8, 2, 64, 64, 30),  # a few new positions (speculative)
    "draft3_rope_bf16": Case(3, 4, 2, 64, 32, 32, jnp.bfloat16, bias="none"),
    "prefill_rowblocks_fp32": Case(20, 4, 2, 64, 48, 26, block_rows=16),  # 3 row blocks
}


def _cache(c: Case, batch: int = 3, seed: int = 0):
  """Left-padded rows (pad lengths 0, 3, 7) in the first `filled` slots, empty slots after; the
  new tokens are the last c.new filled slots. Slots never equal true positions."""
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (batch, c.new, c.heads, c.head_dim)).astype(c.dtype)
  k = jax.random.normal(kk, (batch, c.slots, c.kv_heads, c.head_dim)).astype(c.dtype)
  v = jax.random.normal(kv, (batch, c.slots, c.kv_heads, c.head_dim)).astype(c.dtype)
  kv_seg = np.zeros((batch, c.slots), np.int32)
  kv_pos = np.zeros((batch, c.slots), np.int32)
  for row, pad in enumerate((0, 3, 7)[:batch]):
    kv_seg[row, pad:c.filled] = 1
    kv_pos[row, pad:c.filled] = np.arange(c.filled - pad)
  q_seg = np.ones((batch, c.new), np.int32)
  q_pos = kv_pos[:, c.filled - c.new:c.filled]
  sides = dict(q_segment_ids=jnp.asarray(q_seg), q_positions=jnp.asarray(q_pos),
               kv_segment_ids=jnp.asarray(kv_seg), kv_positions=jnp.asarray(kv_pos))
  return q, k, v, sides


def _reference(q, k, v, sides, bias):
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  return xla_attention(f32(q), f32(k), f32(v), bias=bias, causal=True, **sides)


def _rel_err(got, want):
  return float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))


@pytest.mark.parametrize("backend", sorted(KERNELS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_matches_reference(backend, name):
  c = CASES[name]
  q, k, v, sides = _cache(c)
  got = KERNELS[backend](q, k, v, jnp.asarray(alibi_slopes(c.heads)), **sides,
                         kv_length=jnp.int32(c.filled), bias=c.bias, block_k=c.block_k,
                         block_rows=c.block_rows, interpret=True)
  assert got.shape == q.shape and got.dtype == q.dtype
  err = _rel_err(got, _reference(q, k, v, sides, c.bias))
  assert err < TOL[c.dtype], f"{backend} {name}: max error {err:.2e} of the largest output"


@pytest.mark.parametrize("backend", sorted(KERNELS))
@pytest.mark.parametrize("name", ["step_mha_fp32", "prefill_rowblocks_fp32"])
def test_kernel_index_arithmetic_keeps_its_dtype_under_x64(backend, name):
  """With jax_enable_x64 the block index lax.div(int32 length, Python int block) stays int32
  (mixing int32 and int64 there fails)."""
  c = CASES[name]
  with jax.enable_x64(True):
    q, k, v, sides = _cache(c)
    got = KERNELS[backend](q, k, v, jnp.asarray(alibi_slopes(c.heads)), **sides,
                           kv_length=jnp.int32(c.filled), bias=c.bias, block_k=c.block_k,
                           block_rows=c.block_rows, interpret=True)
    err = _rel_err(got, _reference(q, k, v, sides, c.bias))
  assert err < TOL[c.dtype], f"{backend} {name}: max error {err:.2e} of the largest output"


@pytest.mark.skipif(jax.default_backend() not in KERNELS, reason="needs a GPU or TPU "
                    "(JAX_PLATFORMS=cuda or tpu); interpret mode is tested above")
@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_kernel_matches_reference_on_the_accelerator(name):
  """The same cases compiled for the accelerator this runs on (Triton or Mosaic), against the
  reference at full matmul precision; fp32 within 2e-3, room for TF32 / bf16-pass matmuls in
  the kernel (bf16 as above)."""
  c = CASES[name]
  q, k, v, sides = _cache(c)
  got = jax.jit(functools.partial(
      KERNELS[jax.default_backend()], kv_length=jnp.int32(c.filled), bias=c.bias,
      block_k=c.block_k, block_rows=c.block_rows))(q, k, v, jnp.asarray(alibi_slopes(c.heads)),
                                                    **sides)
  with jax.default_matmul_precision("highest"):
    want = _reference(q, k, v, sides, c.bias)
  assert _rel_err(got, want) < max(TOL[c.dtype], 2e-3)


@pytest.mark.parametrize("backend", sorted(KERNELS))
def test_slots_past_kv_length_are_never_read(backend):
  """Huge keys and values in visible-looking slots past kv_length leave the output unchanged:
  the kernel stops at the filled slots (on TPU it does not even fetch the later blocks) and
  masks the rest of the last one."""
  c = CASES["step_gqa4_bf16"]
  q, k, v, sides = _cache(c)
  want = _reference(q, k, v, sides, c.bias)
  past = jnp.arange(c.slots)[None, :, None, None] >= c.filled
  k, v = jnp.where(past, 1e4, k), jnp.where(past, 1e4, v)
  sides["kv_segment_ids"] = jnp.where(past[:, :, 0, 0], 1, sides["kv_segment_ids"])
  got = KERNELS[backend](q, k, v, jnp.asarray(alibi_slopes(c.heads)), **sides,
                         kv_length=jnp.int32(c.filled), block_k=c.block_k, interpret=True)
  assert _rel_err(got, want) < TOL[c.dtype]


def test_dispatcher_runs_the_kernel_for_pallas_only_on_a_cache():
  c = CASES["draft4_gqa4_fp32"]
  q, k, v, sides = _cache(c)
  fn = functools.partial(kernels.attention, implementation="pallas",
                         kv_length=jnp.int32(c.filled), **sides)
  assert "alibi_decode" in str(jax.make_jaxpr(fn)(q, k, v))
  for impl in ("xla", "auto"):  # auto: the kernel on TPU only
    jaxpr = str(jax.make_jaxpr(functools.partial(fn, implementation=impl))(q, k, v))
    assert "pallas_call" not in jaxpr


TINY = load_config("configs/tiny.yaml").model


@functools.cache
def _decoders(shape: tuple[int, int, int] | None):
  """(xla decoder, pallas decoder, params) of the tiny model, one device or a mesh."""
  shard = None if shape is None else LogicalSharding.create(
      make_mesh(MeshConfig(*shape)), MeshConfig().rules)
  out = []
  for impl in ("xla", "pallas"):
    cfg = dataclasses.replace(TINY, attention=impl)
    model = nnx.eval_shape(lambda cfg=cfg: Step1(cfg, shard, rngs=nnx.Rngs(0)))
    out.append(decode.make_decoder(model, cache_length=32, shard=shard))
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(Step1(TINY, rngs=nnx.Rngs(0)))))()
  if shard is not None:
    params = jax.device_put(params, shard.tree(logical_axes(nnx.state(model))))
  return *out, params


@pytest.mark.parametrize("shape", [None, (2, 2, 2)], ids=["one_device", "data2_fsdp2_tensor2"])
def test_decoder_with_pallas_attention_matches_xla(shape):
  """model.attention=pallas: prefill and 3 steps (kernel in interpret mode, per device under
  the mesh's shard_map) give the xla decoder's logits."""
  xla, pallas, params = _decoders(shape)
  prompts = decode.left_pad([[5, 9, 2, 7, 1], [3], [8, 8, 4, 2, 6, 1, 9, 3, 2], [4, 4]])
  (lx, cx), (lp, cp) = xla.prefill(params, prompts), pallas.prefill(params, prompts)
  errs = [_rel_err(lp, lx)]
  for _ in range(3):
    token = jnp.argmax(lx, -1).astype(jnp.int32)
    (lx, cx), (lp, cp) = xla.step(params, token, cx), pallas.step(params, token, cp)
    errs.append(_rel_err(lp, lx))
  assert max(errs) < 1e-5, errs


# --- compiled for v5p with libtpu (no chips needed) ---------------------------------------

V5P_SHAPES = {  # per-chip decode shapes: Step-Audio-Chat at tensor=8 (12 heads on 1 kv head),
  "chat_tensor8": (16, 1, 12, 1, 128, 4096),  # and 8 heads on 2 kv heads with 4 draft tokens
  "gqa4_draft4": (8, 4, 8, 2, 128, 8192),
}


@pytest.fixture(scope="module")
def v5p_shard():
  pytest.importorskip("libtpu", reason="libtpu is not installed: pip install 'jax[tpu]'")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from stepaudio_jax.training.aot import tpu_devices

  devices = np.asarray(tpu_devices("v5p:2x2x1")).reshape(1, 2, 2)
  return LogicalSharding.create(jax.sharding.Mesh(devices, ("data", "fsdp", "tensor")),
                                MeshConfig().rules)


@pytest.mark.parametrize("name", sorted(V5P_SHAPES))
def test_kernel_compiles_for_v5p_and_reads_the_cache_once(v5p_shard, name):
  """Sharded over fsdp=2 (batch) and tensor=2 (heads): one Mosaic call per chip whose program
  moves about the chip's share of the cache, i.e. no relayout copy of it. XLA's numbers are
  printed for the record (pytest -s)."""
  b, t, n, kvh, h, s = V5P_SHAPES[name]
  b, n, kvh = 2 * b, 2 * n, 2 * kvh  # global: two chips on batch, two on heads
  spec = v5p_shard.named
  args = (jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16,
                               sharding=spec(("act_batch", None, "act_heads", None))),
          *[jax.ShapeDtypeStruct((b, s, kvh, h), jnp.bfloat16,
                                 sharding=spec(("act_batch", None, "act_kv_heads", None)))] * 2,
          *[jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=spec(("act_batch", None)))] * 2,
          *[jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=spec(("act_batch", None)))] * 2)

  def attend(q, k, v, q_seg, q_pos, kv_seg, kv_pos):
    return kernels.attention(q, k, v, q_segment_ids=q_seg, q_positions=q_pos,
                             kv_segment_ids=kv_seg, kv_positions=kv_pos,
                             kv_length=jnp.int32(s), implementation="pallas", shard=v5p_shard)

  compiled = jax.jit(attend).lower(*args).compile()
  assert compiled.as_text().count("tpu_custom_call") == 1
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  cache_per_chip = 2 * (b // 2) * s * (kvh // 2) * h * 2
  print(f"\n[v5p:2x2x1 decode {name}] per chip: cache {cache_per_chip / 2**20:.1f} MiB, "
        f"bytes accessed {cost['bytes accessed'] / 2**20:.1f} MiB, "
        f"XLA estimate {cost.get('optimal_seconds', 0) * 1e6:.1f} us")
  assert cache_per_chip <= cost["bytes accessed"] < 1.1 * cache_per_chip


def test_decode_step_with_pallas_compiles_for_v5p(v5p_shard):
  """The tiny model's whole decode step (model.attention=pallas) on a v5p slice: the decode
  kernel is a Mosaic call inside it."""
  cfg = dataclasses.replace(TINY, attention="pallas", compute_dtype="bfloat16")
  model = nnx.eval_shape(lambda: Step1(cfg, v5p_shard, rngs=nnx.Rngs(0)))
  decoder = decode.make_decoder(model, cache_length=256, shard=v5p_shard)
  params = nnx.to_pure_dict(nnx.state(model))
  cache = jax.eval_shape(lambda: decode.KVCache.init(cfg, 8, 256))
  tokens = jax.ShapeDtypeStruct((8,), jnp.int32)
  compiled = decoder.step.lower(params, tokens, cache).compile()
  assert "tpu_custom_call" in compiled.as_text()


def test_gpu_kernel_lowers_to_triton():
  """No GPU here: lowering for CUDA stops at Triton IR, which rejects unsupported ops and block
  shapes; running it is for a lent GPU."""
  from jax import export

  triton = "__gpu$xla.gpu.triton"
  b, t, n, kvh, h, s = 4, 1, 12, 1, 128, 1024
  slopes = jnp.asarray(alibi_slopes(n))

  def attend(q, k, v, q_seg, q_pos, kv_seg, kv_pos, length):
    return decode_gpu.decode_attention(q, k, v, slopes, q_segment_ids=q_seg, q_positions=q_pos,
                                       kv_segment_ids=kv_seg, kv_positions=kv_pos,
                                       kv_length=length)

  args = (jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16),
          *[jax.ShapeDtypeStruct((b, s, kvh, h), jnp.bfloat16)] * 2,
          *[jax.ShapeDtypeStruct((b, t), jnp.int32)] * 2,
          *[jax.ShapeDtypeStruct((b, s), jnp.int32)] * 2, jax.ShapeDtypeStruct((), jnp.int32))
  exported = export.export(jax.jit(attend), platforms=["cuda"], disabled_checks=[
      export.DisabledSafetyCheck.custom_call(triton)])(*args)
  assert exported.mlir_module().count(f"@{triton}(") == 1
