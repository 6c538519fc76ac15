"""The XLA reference attention against a direct per-head loop, and the ALiBi slope recipe."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stepaudio_jax import kernels
from stepaudio_jax.kernels.alibi import alibi_slopes


def _slopes_by_interleaving(h):
  """The original ALiBi code's recipe: every other slope of the next power of two."""
  def pow2(n):
    return [2.0 ** (-8.0 * (k + 1) / n) for k in range(n)]

  n = 2 ** math.floor(math.log2(h))
  return pow2(n) + pow2(2 * n)[0::2][: h - n]


@pytest.mark.parametrize("heads", [1, 4, 8, 12, 48, 96])
def test_slopes_match_recipe(heads):
  np.testing.assert_allclose(alibi_slopes(heads), _slopes_by_interleaving(heads), rtol=1e-6)


def test_slopes_96_heads_are_64_plus_32():
  s = alibi_slopes(96)
  np.testing.assert_allclose(s[:64], 2.0 ** (-8.0 * np.arange(1, 65) / 64), rtol=1e-6)
  np.testing.assert_allclose(s[64:], (2.0 ** (-4.0 / 64)) ** (2 * np.arange(1, 33) - 1), rtol=1e-6)


def _loop_attention(q, k, v, seg, pos, use_bias):
  """Dense per-(batch, head, query) loop: the definition in facts.md section 1."""
  b, t, n, h = q.shape
  g = n // k.shape[2]
  slopes = alibi_slopes(n)
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(n):
      kh = hi // g
      for i in range(t):
        js = [j for j in range(i + 1) if seg[bi, j] == seg[bi, i]]
        logits = np.array([q[bi, i, hi] @ k[bi, j, kh] / math.sqrt(h) for j in js])
        if use_bias:
          logits -= slopes[hi] * np.sqrt(pos[bi, i] - pos[bi, js])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[bi, i, hi] = sum(pj * v[bi, j, kh] for pj, j in zip(p, js))
  return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1), (6, 2)])
@pytest.mark.parametrize("bias", ["alibi_sqrt", "none"])
def test_reference_matches_loop_with_segments(heads, kv_heads, bias):
  b, t, h = 2, 11, 8
  rng = np.random.default_rng(0)
  q = rng.normal(size=(b, t, heads, h)).astype(np.float32)
  k = rng.normal(size=(b, t, kv_heads, h)).astype(np.float32)
  v = rng.normal(size=(b, t, kv_heads, h)).astype(np.float32)
  seg = np.array([[1] * 4 + [2] * 5 + [0] * 2, [1] * 11], np.int32)
  pos = np.array([list(range(4)) + list(range(5)) + [0, 1], list(range(11))], np.int32)
  got = kernels.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                          q_segment_ids=jnp.asarray(seg), q_positions=jnp.asarray(pos), bias=bias)
  want = _loop_attention(q, k, v, seg, pos, bias == "alibi_sqrt")
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


def test_causal_by_gradient():
  """Output at position i has zero gradient from keys/values after i."""
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 9, 4, 8)), jnp.float32) for _ in range(3))
  i = 4
  gk, gv = jax.grad(lambda k, v: kernels.attention(q, k, v)[0, i].sum(), argnums=(0, 1))(k, v)
  assert float(jnp.abs(gk[0, i + 1 :]).max()) == 0.0
  assert float(jnp.abs(gv[0, i + 1 :]).max()) == 0.0
  assert float(jnp.abs(gk[0, : i + 1]).max()) > 0.0


def test_bad_arguments_are_named():
  q = jnp.zeros((1, 4, 6, 8))
  kv = jnp.zeros((1, 4, 4, 8))
  with pytest.raises(ValueError, match="not a multiple of kv heads"):
    kernels.attention(q, kv, kv)
  kv = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="implementation 'nope'"):
    kernels.attention(q, kv, kv, implementation="nope")
  with pytest.raises(ValueError, match="unknown attention bias"):
    kernels.attention(q, kv, kv, bias="alibi")
  with pytest.raises(ValueError, match="go together"):
    kernels.attention(q, kv, kv, kv_positions=jnp.zeros((1, 4), jnp.int32))
  longer = jnp.zeros((1, 6, 2, 8))
  with pytest.raises(ValueError, match="as many keys as queries"):
    kernels.attention(q, longer, longer)


@pytest.mark.parametrize("query_block", [3, 4, 11])
@pytest.mark.parametrize("causal", [True, False])
def test_query_blocks_do_not_change_the_result(query_block, causal):
  """Skipping the causal upper triangle block by block gives the one-block numbers."""
  from stepaudio_jax.kernels.reference import xla_attention

  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.normal(size=(2, 11, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 11, 2, 8)), jnp.float32) for _ in range(2))
  seg = jnp.asarray([[1] * 6 + [2] * 5, [1] * 11], jnp.int32)
  pos = jnp.asarray([list(range(6)) + list(range(5)), list(range(11))], jnp.int32)
  common = dict(q_segment_ids=seg, q_positions=pos, bias="alibi_sqrt", causal=causal)
  whole = xla_attention(q, k, v, **common)
  blocked = xla_attention(q, k, v, **common, query_block=query_block)
  np.testing.assert_allclose(blocked, whole, atol=1e-6)


def _loop_cache_attention(q, k, v, q_seg, q_pos, kv_seg, kv_pos, use_bias, causal):
  """Per (batch, head, query) over every slot: visible iff same segment and, when causal,
  kv_pos <= q_pos; bias -slope * sqrt(q_pos - kv_pos) between true positions."""
  b, t, n, h = q.shape
  g = n // k.shape[2]
  slopes = alibi_slopes(n)
  out = np.zeros_like(q)
  for bi, hi, i in itertools.product(range(b), range(n), range(t)):
    kh = hi // g
    js = [j for j in range(k.shape[1]) if kv_seg[bi, j] == q_seg[bi, i]
          and (not causal or kv_pos[bi, j] <= q_pos[bi, i])]
    logits = np.array([q[bi, i, hi] @ k[bi, j, kh] / math.sqrt(h) for j in js])
    if use_bias:
      logits -= slopes[hi] * np.sqrt(q_pos[bi, i] - kv_pos[bi, js])
    p = np.exp(logits - logits.max())
    p /= p.sum()
    out[bi, i, hi] = sum(pj * v[bi, j, kh] for pj, j in zip(p, js))
  return out


@pytest.mark.parametrize("implementation", ["xla", "pallas", "auto"])
@pytest.mark.parametrize("bias,causal", [("alibi_sqrt", True), ("none", True), ("none", False)])
def test_queries_against_a_cache_match_loop(implementation, bias, causal):
  """Row 0: 3 left-pad slots, a prompt at true positions 0..6, 2 empty slots; its queries are a
  pad and the tokens at positions 5 and 6. Row 1: two packed segments, queries from both.
  Slot numbers never equal true positions, so an index-based mask or distance would show."""
  rng = np.random.default_rng(3)
  b, t, s, n, kvh, h = 2, 3, 12, 4, 2, 8
  q = rng.normal(size=(b, t, n, h)).astype(np.float32)
  k = rng.normal(size=(b, s, kvh, h)).astype(np.float32)
  v = rng.normal(size=(b, s, kvh, h)).astype(np.float32)
  kv_seg = np.array([[0] * 3 + [1] * 7 + [0] * 2, [1] * 5 + [2] * 7], np.int32)
  kv_pos = np.array([[0] * 3 + list(range(7)) + [0] * 2, list(range(5)) + list(range(7))],
                    np.int32)
  q_seg = np.array([[0, 1, 1], [2, 1, 2]], np.int32)
  q_pos = np.array([[0, 5, 6], [2, 4, 6]], np.int32)
  fn = jax.jit(functools.partial(kernels.attention, bias=bias, causal=causal,
                                 implementation=implementation))
  args = dict(q_segment_ids=q_seg, q_positions=q_pos, kv_segment_ids=kv_seg, kv_positions=kv_pos)
  got = fn(q, k, v, **args)
  want = _loop_cache_attention(q, k, v, q_seg, q_pos, kv_seg, kv_pos, bias == "alibi_sqrt",
                               causal)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)
  # pallas: the decode kernel (interpret mode here); auto picks it on TPU only
  assert ("pallas_call" in str(jax.make_jaxpr(fn)(q, k, v, **args))) == (implementation == "pallas")
