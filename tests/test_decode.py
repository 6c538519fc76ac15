"""Decoding on a KV cache against full forwards without one: logits, greedy tokens, 8 devices.

The reference runs the whole model with no cache on each row from index 0, right-padded to one
length: causal attention never lets a position see the padding after it, so each row's logits
are those of the row alone. The decoder gets the same rows left-padded in one batch.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from stepaudio_jax.config.mesh import MeshConfig
from stepaudio_jax.inference import decode
from stepaudio_jax.models.step1 import Step1
from stepaudio_jax.parallel.mesh import LogicalSharding, logical_axes, make_mesh
from stepaudio_jax.tasks.registry import load_config

TINY = load_config("configs/tiny.yaml").model  # fp32, 4 query heads on 2 kv heads, remat, scan
CASES = {
    "alibi": TINY,
    "rope": dataclasses.replace(TINY, position_encoding="rope"),
    "gqa4_loop": dataclasses.replace(TINY, num_heads=8, head_dim=8, remat="none",
                                     scan_layers=False),
}
PROMPT_LENGTHS = (5, 12, 1, 9)
NEW_TOKENS = 64


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [rng.integers(1, vocab, n).tolist() for n in PROMPT_LENGTHS]


@functools.cache
def _model(name):
  """(model, its pure-dict params) of a case, initialised in one (cacheable) jit."""
  build = lambda: Step1(CASES[name], rngs=nnx.Rngs(0))  # noqa: E731
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build())))()
  return nnx.merge(nnx.graphdef(nnx.eval_shape(build)), params), params


def _full_forward(model):
  """logits after each row's last token, from a no-cache forward of [B, L] right-padded rows."""
  graphdef = nnx.graphdef(model)

  @jax.jit
  def last_logits(params, tokens, lengths):
    logits = nnx.merge(graphdef, params)(tokens)
    return logits[jnp.arange(tokens.shape[0]), lengths - 1]

  return last_logits


def _right_padded(rows: list[list[int]], length: int) -> np.ndarray:
  out = np.zeros((len(rows), length), np.int32)
  for r, row in enumerate(rows):
    out[r, :len(row)] = row
  return out


def _max_rel_err(got, want):
  got, want = np.asarray(got), np.asarray(want)
  return float(np.abs(got - want).max() / np.abs(want).max())


def _greedy_by_full_forwards(model, params, prompts, num_tokens):
  forward = _full_forward(model)
  buf = _right_padded(prompts, max(PROMPT_LENGTHS) + num_tokens)
  lengths = np.asarray([len(p) for p in prompts])
  out = []
  for _ in range(num_tokens):
    nxt = np.asarray(forward(params, buf, lengths)).argmax(-1)
    buf[np.arange(len(prompts)), lengths] = nxt
    lengths = lengths + 1
    out.append(nxt)
  return np.stack(out, axis=1)


def test_left_pad_layout():
  p = decode.left_pad([[7, 8, 9], [5]], pad_id=0)
  np.testing.assert_array_equal(p.tokens, [[7, 8, 9], [0, 0, 5]])
  np.testing.assert_array_equal(p.segment_ids, [[1, 1, 1], [0, 0, 1]])
  np.testing.assert_array_equal(p.positions, [[0, 1, 2], [0, 0, 0]])
  with pytest.raises(ValueError, match="at least one token"):
    decode.left_pad([[1], []])


@pytest.mark.parametrize("name", sorted(CASES))
def test_prefill_and_step_logits_match_full_forward(name):
  """Teacher-forced: after the prompt and after each of 4 given tokens; the 16-slot cache is
  exactly full at the end."""
  cfg = CASES[name]
  model, params = _model(name)
  prompts = _prompts(cfg.vocab_size)
  forced = np.random.default_rng(1).integers(1, cfg.vocab_size, (len(prompts), 4))
  decoder = decode.make_decoder(model, cache_length=max(PROMPT_LENGTHS) + 4)
  logits, cache = decoder.prefill(params, decode.left_pad(prompts))
  got = [logits]
  for i in range(4):
    logits, cache = decoder.step(params, jnp.asarray(forced[:, i], jnp.int32), cache)
    got.append(logits)

  forward = _full_forward(model)
  rows = [p + forced[r].tolist() for r, p in enumerate(prompts)]
  buf = _right_padded(rows, max(PROMPT_LENGTHS) + 4)
  for i, g in enumerate(got):
    want = forward(params, buf, np.asarray(PROMPT_LENGTHS) + i)
    err = _max_rel_err(g, want)
    assert err < 1e-5, f"after {i} decoded tokens: max error {err:.2e} of the largest logit"


@pytest.mark.parametrize("name", ["alibi", "rope"])
def test_greedy_matches_argmax_of_full_forwards(name):
  cfg = CASES[name]
  model, params = _model(name)
  prompts = _prompts(cfg.vocab_size, seed=2)
  decoder = decode.make_decoder(model, cache_length=max(PROMPT_LENGTHS) + NEW_TOKENS)
  got = np.asarray(decode.greedy(decoder, params, decode.left_pad(prompts), NEW_TOKENS))
  want = _greedy_by_full_forwards(model, params, prompts, NEW_TOKENS)
  assert got.shape == (len(prompts), NEW_TOKENS)
  np.testing.assert_array_equal(got, want)
  assert len(np.unique(want)) > NEW_TOKENS  # not one token repeated: the cache is exercised


def test_greedy_needs_enough_cache_slots():
  model, params = _model("alibi")
  decoder = decode.make_decoder(model, cache_length=12 + 3)
  with pytest.raises(ValueError, match="need 16 cache slots"):
    decode.greedy(decoder, params, decode.left_pad(_prompts(TINY.vocab_size)), 5)


@pytest.mark.parametrize("name,split", [("alibi", "tensor"), ("rope", "tensor"),
                                        ("alibi", "sequence")])
def test_sharded_decoding_equals_one_device(name, split):
  """Mesh data=2, fsdp=2 and tensor=2 (or sequence=2, a training mesh reused by PPO's sampler):
  parameters by their logical axes, the cache on batch and kv heads; logits within 1e-5 of one
  device and the same greedy tokens."""
  cfg = CASES[name]
  shard = LogicalSharding.create(make_mesh(MeshConfig(data=2, fsdp=2, **{split: 2})),
                                 MeshConfig().rules)
  model, params = _model(name)
  sharded_model = nnx.eval_shape(lambda: Step1(cfg, shard, rngs=nnx.Rngs(0)))
  sharded_params = jax.device_put(params, shard.tree(logical_axes(nnx.state(sharded_model))))
  wq = P(None, "fsdp", "tensor", None) if split == "tensor" else P(None, ("fsdp", "sequence"),
                                                                   None, None)
  assert sharded_params["layers"]["wq"].sharding.spec == wq
  prompts = decode.left_pad(_prompts(cfg.vocab_size, seed=3))
  length = max(PROMPT_LENGTHS) + 32
  one = decode.make_decoder(model, length)
  eight = decode.make_decoder(sharded_model, length, shard)

  (l1, c1), (l8, c8) = one.prefill(params, prompts), eight.prefill(sharded_params, prompts)
  heads = "tensor" if split == "tensor" else None
  assert c8.keys.sharding.spec == P(None, ("data", "fsdp"), None, heads, None)
  assert c8.positions.sharding.spec == P(("data", "fsdp"), None)
  errs = [_max_rel_err(l8, l1)]
  token = jnp.argmax(l1, -1).astype(jnp.int32)
  for _ in range(3):
    (l1, c1), (l8, c8) = one.step(params, token, c1), eight.step(sharded_params, token, c8)
    errs.append(_max_rel_err(l8, l1))
    token = jnp.argmax(l1, -1).astype(jnp.int32)
  assert max(errs) < 1e-5, errs
  np.testing.assert_array_equal(decode.greedy(eight, sharded_params, prompts, 32),
                                decode.greedy(one, params, prompts, 32))
