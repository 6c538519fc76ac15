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


def test_backbone_without_lm_head_has_none_and_the_same_hidden_states():
  full = Step1(TINY, rngs=nnx.Rngs(0))
  trunk = Step1(TINY, with_lm_head=False, rngs=nnx.Rngs(1))
  params = nnx.to_pure_dict(nnx.state(trunk))
  assert set(params) == {"embed", "layers", "final_norm"}
  n = sum(x.size for x in jax.tree.leaves(params))
  assert n == TINY.num_params() - TINY.hidden_size * TINY.vocab_size
  backbone = {k: v for k, v in nnx.to_pure_dict(nnx.state(full)).items() if k != "lm_head"}
  nnx.update(trunk, backbone)
  tokens, seg, pos = _packed_batch(TINY.vocab_size)
  hidden = jax.jit(lambda m: m.hidden_states(m.embed_tokens(tokens), seg, pos)[0])
  h_trunk, h_full = hidden(trunk), hidden(full)
  assert h_trunk.shape == (2, 16, TINY.hidden_size)
  np.testing.assert_array_equal(h_trunk, h_full)


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
