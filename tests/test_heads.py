"""The Step1 backbone without its LM head, and the scalar head of reward and value models."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepaudio_jax.models.heads import ScalarHead
from stepaudio_jax.models.step1 import Step1
from stepaudio_jax.parallel.mesh import logical_axes
from stepaudio_jax.tasks.registry import load_config

TINY = load_config("configs/tiny.yaml").model


def _packed_batch(vocab):
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, vocab)
  seg = jnp.asarray([[1] * 7 + [2] * 9, [1] * 12 + [0] * 4])
  pos = jnp.asarray([list(range(7)) + list(range(9)), list(range(12)) + [0] * 4])
  return tokens, seg, pos


def test_backbone_without_lm_head_has_none_and_gives_what_the_lm_head_reads():
  """The trunk's output is the final norm's (unit RMS times its scale), and the full LM's logits
  are that output times lm_head, computed here in numpy."""
  cfg = dataclasses.replace(TINY, rms_norm_eps=1e-12)  # so the RMS is 1 to float precision
  full = Step1(cfg, rngs=nnx.Rngs(0))
  trunk = Step1(cfg, with_lm_head=False, rngs=nnx.Rngs(1))
  params = nnx.to_pure_dict(nnx.state(trunk))
  assert set(params) == {"embed", "layers", "final_norm"}
  n = sum(x.size for x in jax.tree.leaves(params))
  assert n == TINY.num_params() - TINY.hidden_size * TINY.vocab_size
  full_params = nnx.to_pure_dict(nnx.state(full))
  scale = np.random.default_rng(0).uniform(0.5, 2.0, TINY.hidden_size).astype(np.float32)
  full_params["final_norm"]["scale"] = scale
  nnx.update(full, full_params)
  nnx.update(trunk, {k: v for k, v in full_params.items() if k != "lm_head"})
  tokens, seg, pos = _packed_batch(TINY.vocab_size)
  h = np.asarray(jax.jit(lambda m: m.hidden_states(m.embed_tokens(tokens), seg, pos)[0])(trunk))
  assert h.shape == (2, 16, TINY.hidden_size)
  np.testing.assert_allclose(np.sqrt(np.mean((h / scale) ** 2, axis=-1)), 1.0, rtol=1e-5)
  logits = np.asarray(jax.jit(lambda m: m(tokens, seg, pos))(full))
  np.testing.assert_allclose(logits, h @ np.asarray(full_params["lm_head"]), rtol=1e-4,
                             atol=1e-5)


def test_scalar_head_is_h_times_w_plus_b():
  head = ScalarHead(TINY, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  w = rng.standard_normal((TINY.hidden_size, 1)).astype(np.float32)
  nnx.update(head, {"weight": w, "bias": np.array([0.25], np.float32)})
  h = rng.standard_normal((2, 3, TINY.hidden_size)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(head(jnp.asarray(h))), h @ w[:, 0] + 0.25, rtol=1e-5,
                             atol=1e-5)


def test_scalar_head_shape_dtype_axes_and_initial_scale():
  cfg = dataclasses.replace(TINY, compute_dtype="bfloat16")
  trunk = Step1(cfg, with_lm_head=False, rngs=nnx.Rngs(0))
  head = ScalarHead(cfg, rngs=nnx.Rngs(1))
  assert logical_axes(nnx.state(head)) == {"weight": ("embed", None), "bias": (None,)}
  tokens, seg, pos = _packed_batch(cfg.vocab_size)
  h = trunk.hidden_states(trunk.embed_tokens(tokens), seg, pos)[0]
  assert h.dtype == jnp.bfloat16
  scores = head(h)
  assert scores.shape == (2, 16) and scores.dtype == jnp.float32
  # unit-RMS hidden states and weights of std 1/sqrt(D + 1): first scores of order one
  unit = jax.random.normal(jax.random.key(2), (64, 32, cfg.hidden_size))
  assert 0.6 < float(head(unit).std()) < 1.4
