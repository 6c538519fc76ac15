"""Step1 model: parameter counts, causality, packing, scan/remat equivalence, rope variant."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stepaudio_jax.config.model import Step1Config
from stepaudio_jax.models.linear import project
from stepaudio_jax.models.step1 import Step1
from stepaudio_jax.tasks.registry import load_config

TINY = Step1Config(vocab_size=96, hidden_size=32, num_layers=3, num_heads=6, num_kv_heads=2,
                   head_dim=8, intermediate_size=48, max_seq_len=64, compute_dtype="float32",
                   remat="none")


def _tokens(b=2, t=16, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, TINY.vocab_size)


@pytest.mark.parametrize("path,params", [("configs/model/step1-130b.yaml", 132e9),
                                         ("configs/model/step-audio-tts-3b.yaml", 3.53e9)])
def test_public_sizes(path, params):
  cfg = load_config(path).model
  assert abs(cfg.num_params() - params) / params < 0.01


def test_param_count_matches_model():
  model = Step1(TINY, rngs=nnx.Rngs(0))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == TINY.num_params()


@pytest.mark.parametrize("pe", ["alibi_sqrt", "rope"])
def test_causal(pe):
  """Changing tokens after position t leaves the logits up to t unchanged."""
  cfg = dataclasses.replace(TINY, position_encoding=pe)
  model = Step1(cfg, rngs=nnx.Rngs(0))
  a = _tokens()
  b = a.at[:, 9:].set((a[:, 9:] + 5) % cfg.vocab_size)
  la, lb = model(a), model(b)
  np.testing.assert_allclose(la[:, :9], lb[:, :9], atol=1e-6)
  assert float(jnp.abs(la[:, 9:] - lb[:, 9:]).max()) > 1e-3


@pytest.mark.parametrize("pe", ["alibi_sqrt", "rope"])
def test_packed_equals_separate(pe):
  """Two sequences packed in one row give the logits they give alone (positions restart)."""
  cfg = dataclasses.replace(TINY, position_encoding=pe)
  model = Step1(cfg, rngs=nnx.Rngs(0))
  x, y = _tokens(1, 7, 1), _tokens(1, 9, 2)
  packed = jnp.concatenate([x, y], axis=1)
  seg = jnp.asarray([[1] * 7 + [2] * 9])
  pos = jnp.asarray([list(range(7)) + list(range(9))])
  out = model(packed, seg, pos)
  np.testing.assert_allclose(out[:, :7], model(x), atol=2e-5)
  np.testing.assert_allclose(out[:, 7:], model(y), atol=2e-5)


def test_alibi_uses_positions():
  model = Step1(TINY, rngs=nnx.Rngs(0))
  toks = _tokens(1, 8)
  seg = jnp.ones((1, 8), jnp.int32)
  a = model(toks, seg, jnp.arange(8)[None])
  b = model(toks, seg, 2 * jnp.arange(8)[None])
  assert float(jnp.abs(a - b).max()) > 1e-4


def _loss_and_grads(cfg):
  model = Step1(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  toks = _tokens()

  def loss(state):
    logits = nnx.merge(graphdef, state)(toks)
    return jax.nn.logsumexp(logits, -1).mean()

  return jax.jit(jax.value_and_grad(loss))(state)


@pytest.mark.parametrize("variant", [dict(scan_layers=False), dict(remat="full"),
                                     dict(remat="save_dots"), dict(remat="save_qkv"),
                                     dict(remat="save_attention"), dict(remat="save_mlp")])
def test_scan_and_remat_do_not_change_numbers(variant):
  l0, g0 = _loss_and_grads(TINY)
  l1, g1 = _loss_and_grads(dataclasses.replace(TINY, **variant))
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_bf16_compute_keeps_fp32_params_and_logits():
  cfg = dataclasses.replace(TINY, compute_dtype="bfloat16")
  model = Step1(cfg, rngs=nnx.Rngs(0))
  logits = model(_tokens())
  assert logits.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  ref = Step1(TINY, rngs=nnx.Rngs(0))(_tokens())
  np.testing.assert_allclose(logits, ref, atol=0.05)


def test_bad_model_config():
  with pytest.raises(ValueError, match="num_heads=6 is not divisible by num_kv_heads=4"):
    dataclasses.replace(TINY, num_kv_heads=4)


@pytest.mark.parametrize("x_shape,w_shape,contract", [((2, 5, 8), (8, 3, 4), 1),
                                                     ((2, 5, 3, 4), (3, 4, 8), 2)])
def test_project_is_the_einsum_and_so_is_its_gradient(x_shape, w_shape, contract):
  """project flattens tokens and weight dims into one 2-D matmul; value and gradients equal
  NumPy's einsum in float64 (fp32 tolerance 1e-5)."""
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=x_shape), rng.normal(size=w_shape)
  g = rng.normal(size=x_shape[:len(x_shape) - contract] + w_shape[contract:])
  spec = "btd,dnh->btnh" if contract == 1 else "btnh,nhd->btd"
  got = project(jnp.float32(x), jnp.float32(w), contract=contract)
  np.testing.assert_allclose(got, np.einsum(spec, x, w), rtol=1e-5, atol=1e-5)
  dx, dw = jax.grad(lambda a, b: jnp.vdot(project(a, b, contract=contract), g),
                    argnums=(0, 1))(jnp.float32(x), jnp.float32(w))
  out, lhs, rhs = spec.split("->")[1], *spec.split("->")[0].split(",")
  np.testing.assert_allclose(dx, np.einsum(f"{out},{rhs}->{lhs}", g, w), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, np.einsum(f"{lhs},{out}->{rhs}", x, g), rtol=1e-5, atol=1e-5)
  with pytest.raises(AssertionError):
    project(jnp.float32(x), jnp.float32(w).swapaxes(0, -1), contract=contract)


@pytest.mark.parametrize("attention", ["xla", "pallas"])
def test_attention_blocks_from_config_change_the_program_not_the_numbers(attention):
  """model.attention_block_q/k reach the kernels (the traced program changes) and tile the
  same attention: logits within 1e-5 of the backend's default tiles."""
  toks = _tokens(t=48)
  base = dataclasses.replace(TINY, attention=attention)
  tiled = dataclasses.replace(base, attention_block_q=16, attention_block_k=8)
  (l0, j0), (l1, j1) = ((Step1(c, rngs=nnx.Rngs(0))(toks), str(jax.make_jaxpr(
      lambda t, c=c: Step1(c, rngs=nnx.Rngs(0))(t))(toks))) for c in (base, tiled))
  assert j0 != j1
  np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="attention_block_q must be >= 0"):
    dataclasses.replace(TINY, attention_block_q=-1)
