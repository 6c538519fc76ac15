"""The sampler: its filters against NumPy, its draws against softmax, greedy and EOS against
decode.greedy, its logprobs against the trainer's forward, 8 devices against one, inside jit;
and benchmarks/sampler.py's arithmetic.

Most cases use the tiny config with init_std 0.2 (logits up to about 6.5, so greedy loops and
top-p cuts deep); the 1e-6 logprob bound is also checked at the config's own init (0.02).
"""

import dataclasses
import functools
import itertools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stepaudio_jax.config.mesh import MeshConfig
from stepaudio_jax.config.model import DType
from stepaudio_jax.inference import decode, sampler as S
from stepaudio_jax.models.step1 import Step1
from stepaudio_jax.parallel.mesh import LogicalSharding, logical_axes, make_mesh
from stepaudio_jax.tasks.registry import load_config
from tests.conftest import REPO

TINY = load_config("configs/tiny.yaml").model  # fp32 compute, init_std 0.02
PEAKED = dataclasses.replace(TINY, init_std=0.2)
PROMPT_LENGTHS = (5, 12, 1, 9, 3, 7, 12, 2)
NEW = 24


@functools.cache
def _model(cfg):
  """(model, its pure-dict params), initialised in one jit."""
  build = lambda: Step1(cfg, rngs=nnx.Rngs(0))  # noqa: E731
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build())))()
  return nnx.merge(nnx.graphdef(nnx.eval_shape(build)), params), params


@functools.cache
def _sampler(cfg):
  return S.make_sampler(_model(cfg)[0])


def _prompts(vocab: int, seed: int = 0, lengths=PROMPT_LENGTHS) -> decode.Prompts:
  rng = np.random.default_rng(seed)
  return decode.left_pad([rng.integers(5, vocab, n).tolist() for n in lengths])


def _host(samples: S.Samples) -> S.Samples:
  return jax.tree.map(np.asarray, samples)


def _check_stops(out: S.Samples, cfg: S.SamplingConfig) -> None:
  """Invariants of any output: each row ends at its first EOS, pad with logprob 0 after it,
  and truncated is exactly the rows that never emitted EOS."""
  for r in range(out.tokens.shape[0]):
    row, n = out.tokens[r], out.lengths[r]
    eos = np.flatnonzero(row == cfg.eos_id)
    assert out.truncated[r] == (eos.size == 0)
    assert n == (eos[0] + 1 if eos.size else cfg.max_new_tokens)
    assert (row[n:] == cfg.pad_id).all() and (out.logprobs[r, n:] == 0).all()
    assert (out.logprobs[r, :n] < 0).all()


def _np_filter(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
  """Reference: rank by logit (lower id first on ties) and keep k, then keep each token whose
  strictly more likely survivors hold less than top_p of their (renormalised) mass; float64."""
  out = np.full_like(logits, -np.inf)
  for r, row in enumerate(logits):
    keep = np.argsort(-row, kind="stable")[:top_k or None]
    if top_p < 1:
      vals = row[keep].astype(np.float64)
      probs = np.exp(vals - vals.max())
      probs /= probs.sum()
      above = np.asarray([probs[vals > x].sum() for x in vals])
      keep = keep[above < top_p]
    out[r, keep] = row[keep]
  return out


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (1, 1.0), (5, 1.0), (64, 1.0), (0, 0.9),
                                         (0, 0.3), (0, 1e-3), (0, 0.999), (7, 0.6), (40, 0.95)])
def test_filter_logits_keeps_what_numpy_keeps(top_k, top_p):
  """Random logits of both signs and magnitudes (tiny ones too), ties, banned (-inf) tokens."""
  rng = np.random.default_rng(top_k)
  logits = (rng.normal(size=(16, 40)) * 2).astype(np.float32)
  logits[:4] = np.round(logits[:4]) + 0.0  # ties, ranked by id (+ 0.0: no -0.0 vs 0.0)
  logits[4:8] *= 1e-6
  logits[8:10, ::3] = -np.inf
  got = np.asarray(S.filter_logits(jnp.asarray(logits), top_k, top_p))
  want = _np_filter(logits, top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  np.testing.assert_array_equal(got[np.isfinite(want)], logits[np.isfinite(want)])
  if top_p == 1:
    kept = np.minimum(top_k or 40, np.isfinite(logits).sum(-1))
    assert (np.isfinite(got).sum(-1) == kept).all()


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.5, 4, 0.8)])
def test_draws_follow_the_filtered_softmax(temperature, top_k, top_p):
  """200,000 draws from one fixed distribution: every frequency within 5 standard errors of
  softmax(logits / T) after the filters (sqrt(p (1 - p) / n) per token), removed tokens never."""
  logits = np.asarray([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)
  n = 200_000
  cfg = S.SamplingConfig(1, temperature=temperature, top_k=top_k, top_p=top_p)
  draws = S.choose_tokens(jnp.broadcast_to(jnp.asarray(logits), (n, logits.size)), cfg,
                          jax.random.key(7))
  freq = np.bincount(np.asarray(draws), minlength=logits.size) / n
  kept = _np_filter((logits / temperature)[None], top_k, top_p)[0].astype(np.float64)
  p = np.exp(kept - kept.max())
  p /= p.sum()
  assert (freq[p == 0] == 0).all()
  bound = 5 * np.sqrt(p * (1 - p) / n)
  assert (np.abs(freq - p) <= bound).all(), (freq, p, bound)


def test_token_logprobs_is_log_softmax_at_temperature():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 11)) * 3
  tokens = jnp.asarray([[0, 5, 10], [3, 3, 7]], jnp.int32)
  for t, scale in ((0.0, 1.0), (1.0, 1.0), (0.5, 0.5)):
    want = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits / scale)),
                              np.asarray(tokens)[..., None], -1)[..., 0]
    np.testing.assert_allclose(S.token_logprobs(logits, tokens, t), want, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ngram_banned_matches_brute_force(n):
  rng = np.random.default_rng(n)
  history = rng.integers(0, 4, (6, 20)).astype(np.int32)  # 4 symbols: many repeats
  for step in range(20):
    got = np.asarray(S.ngram_banned(jnp.asarray(history), jnp.int32(step), n, 5))
    for r in range(6):
      seen = history[r, :step].tolist()
      tail = seen[len(seen) - (n - 1):] if n > 1 else []
      want = {seen[k] for k in range(n - 1, step) if seen[k - n + 1:k] == tail}
      assert set(np.flatnonzero(got[r])) == want, (r, step)


def _greedy_until(greedy: np.ndarray, eos: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
  """decode.greedy's rows cut after their first eos and padded: (tokens, lengths)."""
  tokens, lengths = np.full_like(greedy, pad), np.full(len(greedy), greedy.shape[1])
  for r, row in enumerate(greedy):
    hit = np.flatnonzero(row == eos)
    lengths[r] = hit[0] + 1 if hit.size else row.size
    tokens[r, :lengths[r]] = row[:lengths[r]]
  return tokens, lengths


def _shared_token(greedy: np.ndarray) -> int:
  """A token that some greedy rows emit after their first step and others never emit."""
  counts = {t: sum(t in row[1:] for row in greedy) for t in np.unique(greedy[:, 1:])}
  counts = {t: c for t, c in counts.items() if c < len(greedy) and t not in (0, 3)}
  return int(max(counts, key=counts.get))


@pytest.mark.parametrize("eos", ["default", "frequent"])
def test_greedy_equals_decode_greedy_and_stops_at_eos(eos):
  """temperature 0 = decode.greedy up to each row's first EOS, pad and logprob 0 after it; with
  a token the model emits in some rows as EOS, those rows stop there and only they do."""
  model, params = _model(PEAKED)
  prompts = _prompts(PEAKED.vocab_size)
  decoder = decode.make_decoder(model, max(PROMPT_LENGTHS) + NEW)
  greedy = np.asarray(decode.greedy(decoder, params, prompts, NEW))
  cfg = S.SamplingConfig(NEW, temperature=0.0)
  if eos == "frequent":
    cfg = dataclasses.replace(cfg, eos_id=_shared_token(greedy))
  out = _host(_sampler(PEAKED)(params, prompts, cfg, jax.random.key(0)))
  tokens, lengths = _greedy_until(greedy, cfg.eos_id, cfg.pad_id)
  np.testing.assert_array_equal(out.tokens, tokens)
  np.testing.assert_array_equal(out.lengths, lengths)
  _check_stops(out, cfg)
  if eos == "frequent":
    assert 0 < out.truncated.sum() < len(lengths) and (lengths < NEW // 2).any()


def test_top_k_1_equals_greedy():
  """top_k 1 draws the argmax, and both report the model's own (temperature 1) logprob."""
  _, params = _model(PEAKED)
  prompts = _prompts(PEAKED.vocab_size, seed=1)
  sampler = _sampler(PEAKED)
  greedy = _host(sampler(params, prompts, S.SamplingConfig(NEW, temperature=0.0),
                         jax.random.key(0)))
  top1 = _host(sampler(params, prompts, S.SamplingConfig(NEW, temperature=1.0, top_k=1),
                       jax.random.key(3)))
  np.testing.assert_array_equal(top1.tokens, greedy.tokens)
  np.testing.assert_allclose(top1.logprobs, greedy.logprobs, atol=1e-6)


def test_eos_stops_sampled_rows():
  """32 rows sampled at temperature 1 (top-p 0.9), first with EOS 3, then with a token the first
  run emits most as EOS: same key, so each row draws the same stream until one of them stops;
  the second stops some rows early and truncates the rest."""
  _, params = _model(PEAKED)
  prompts = _prompts(PEAKED.vocab_size, seed=2, lengths=[3, 7, 1, 12] * 8)
  sampler, key = _sampler(PEAKED), jax.random.key(11)
  first_cfg = S.SamplingConfig(NEW, temperature=1.0, top_p=0.9)
  first = _host(sampler(params, prompts, first_cfg, key))
  _check_stops(first, first_cfg)
  emitted = np.concatenate([row[1:n] for row, n in zip(first.tokens, first.lengths)])
  counts = np.bincount(emitted[(emitted != 0) & (emitted != 3)])
  cfg = dataclasses.replace(first_cfg, eos_id=int(counts.argmax()))
  second = _host(sampler(params, prompts, cfg, key))
  _check_stops(second, cfg)
  assert 4 <= (~second.truncated).sum() < 32
  for r in range(32):
    same = min(first.lengths[r], second.lengths[r])
    np.testing.assert_array_equal(second.tokens[r, :same], first.tokens[r, :same])
    np.testing.assert_array_equal(second.logprobs[r, :same], first.logprobs[r, :same])


def test_no_repeat_ngram_blocks_loops():
  """Greedy loops on this model; with the guard no row repeats a bigram, and rows agree with
  plain greedy until plain greedy first closes a repeated bigram."""
  _, params = _model(PEAKED)
  prompts = _prompts(PEAKED.vocab_size, seed=3)
  sampler, key = _sampler(PEAKED), jax.random.key(0)
  plain = _host(sampler(params, prompts, S.SamplingConfig(2 * NEW, temperature=0.0), key))
  cfg = S.SamplingConfig(2 * NEW, temperature=0.0, no_repeat_ngram=2)
  guarded = _host(sampler(params, prompts, cfg, key))
  _check_stops(guarded, cfg)

  def first_repeat(row):
    pairs = list(itertools.pairwise(row))
    return next((i + 1 for i, pair in enumerate(pairs) if pair in pairs[:i]), None)

  repeats = [first_repeat(row[:n].tolist()) for row, n in zip(plain.tokens, plain.lengths)]
  assert sum(r is not None for r in repeats) >= 4
  for r, row in enumerate(guarded.tokens):
    assert first_repeat(row[:guarded.lengths[r]].tolist()) is None
    agree = repeats[r] if repeats[r] is not None else 2 * NEW
    np.testing.assert_array_equal(row[:agree], plain.tokens[r, :agree])


# Bounds on max |sampler - trainer| logprob; measured here 4.8e-7, 9.1e-6 and 1.2e-2. Past
# logits of about 1 the gap is floating-point reassociation at the trainer's own scale: its
# forward of the same rows right-padded instead of left-padded moves them by 6.7e-6 (fp32) and
# 1.7e-2 (bf16) on the peaked model.
LOGPROB_CASES = {
    "fp32": (TINY, 1e-6),  # logits within about +-0.7
    "fp32_peaked": (PEAKED, 2e-5),  # logits up to 7
    "bf16_peaked": (dataclasses.replace(PEAKED, compute_dtype=DType.BFLOAT16), 3e-2),
}


@pytest.mark.parametrize("name", sorted(LOGPROB_CASES))
def test_logprobs_equal_the_trainer_forward(name):
  """temperature 1, top-p 0.9, left-padded prompts: the logprobs the sampler returned against
  token_logprobs of Step1.__call__ over the left-padded rows (prompt + sampled tokens)."""
  cfg, bound = LOGPROB_CASES[name]
  model, params = _model(cfg)
  prompts = _prompts(cfg.vocab_size, seed=4)
  sampling = S.SamplingConfig(NEW, temperature=1.0, top_p=0.9)
  out = _sampler(cfg)(params, prompts, sampling, jax.random.key(5))
  trainer = jax.jit(S.completion_logprobs, static_argnums=(0, 4))(
      nnx.graphdef(model), params, prompts, out, sampling.temperature)
  diff = float(jnp.abs(trainer - out.logprobs).max())
  print(f"{name}: max |sampler - trainer| logprob {diff:.2e} (bound {bound:.0e})")
  assert diff <= bound
  assert np.asarray(out.lengths).sum() > 4 * NEW  # most rows sampled far


def test_sharded_sampler_equals_one_device():
  """Mesh data=2, fsdp=2, tensor=2 with parameters sharded by their logical axes: greedy tokens
  equal and logprobs within 1e-5 of one device; sampled tokens (the same key) equal too."""
  shard = LogicalSharding.create(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)),
                                 MeshConfig().rules)
  _, params = _model(PEAKED)
  sharded_model = nnx.eval_shape(lambda: Step1(PEAKED, shard, rngs=nnx.Rngs(0)))
  sharded_params = jax.device_put(params, shard.tree(logical_axes(nnx.state(sharded_model))))
  eight = S.make_sampler(sharded_model, shard)
  prompts = _prompts(PEAKED.vocab_size, seed=6)
  for cfg in (S.SamplingConfig(NEW, temperature=0.0),
              S.SamplingConfig(NEW, temperature=1.0, top_p=0.9)):
    one_out = _host(_sampler(PEAKED)(params, prompts, cfg, jax.random.key(1)))
    eight_out = eight(sharded_params, prompts, cfg, jax.random.key(1))
    assert eight_out.tokens.sharding.spec[0] == ("data", "fsdp")
    eight_out = _host(eight_out)
    np.testing.assert_array_equal(eight_out.tokens, one_out.tokens)
    np.testing.assert_array_equal(eight_out.lengths, one_out.lengths)
    np.testing.assert_allclose(eight_out.logprobs, one_out.logprobs, atol=1e-5)


def test_sample_traces_inside_jit_with_a_gradient():
  """One jitted program rolls out and takes the gradient of the trainer's logprobs of its own
  samples (a PPO step's shape): same samples as the jitted sampler, traced once, first-step
  ratio exp(trainer - sampler) within 1e-6 of 1, a finite, non-zero gradient."""
  model, params = _model(TINY)
  graphdef = nnx.graphdef(model)
  prompts = _prompts(TINY.vocab_size, seed=7)
  cfg = S.SamplingConfig(16, temperature=1.0, top_k=50)
  traces = []

  @jax.jit
  def rollout_and_grad(p, rng):
    traces.append(1)
    samples = S.sample(graphdef, p, prompts, cfg, rng)

    def objective(q):
      logprobs = S.completion_logprobs(graphdef, q, prompts, samples, cfg.temperature)
      return logprobs.sum(), logprobs

    (_, logprobs), grads = jax.value_and_grad(objective, has_aux=True)(p)
    return samples, jnp.exp(logprobs - samples.logprobs), grads

  for seed in (0, 1):
    samples, ratio, grads = rollout_and_grad(params, jax.random.key(seed))
    direct = _sampler(TINY)(params, prompts, cfg, jax.random.key(seed))
    np.testing.assert_array_equal(samples.tokens, direct.tokens)
    np.testing.assert_allclose(samples.logprobs, direct.logprobs, atol=1e-6)
    assert float(jnp.abs(ratio - 1).max()) <= 1e-6
  assert len(traces) == 1
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(g).all() for g in leaves)
  assert float(jnp.abs(grads["lm_head"]).max()) > 0


def test_sampling_config_rejects_bad_settings():
  with pytest.raises(ValueError, match="top_p=1.5 must be in"):
    S.SamplingConfig(4, top_p=1.5)
  with pytest.raises(ValueError, match="eos_id=0 must be >= 0 and differ from pad_id"):
    S.SamplingConfig(4, eos_id=0)
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    S.SamplingConfig(0)


def test_benchmark_reports_consistent_numbers():
  """benchmarks/sampler.py end to end on the tiny config (one real CPU device)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "sampler.py"), "configs/tiny.yaml",
       "--batch", "2", "--prompt-len", "8", "--new-tokens", "16", "--repeats", "1"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  params = r["parameters"] - TINY.vocab_size * TINY.hidden_size + 2 * TINY.hidden_size
  assert r["weight_bytes_per_step"] == 4 * params
  kv_row = 2 * TINY.num_layers * TINY.num_kv_heads * TINY.head_dim * 4  # bytes per slot and row
  assert r["cache_bytes_per_step"] == pytest.approx(2 * (8 + 16 / 2) * kv_row)
  assert r["bytes_per_step_as_implemented"] == r["weight_bytes_per_step"] + 2 * 23 * kv_row
  assert r["decode_tokens_per_s"] == pytest.approx(2 / r["decode_step_seconds"])
  assert r["bound_tokens_per_s"] == pytest.approx(
      2 * r["bandwidth_bytes_per_s"] / r["bytes_per_step"])
  assert r["prefill_seconds"] > 0 and r["bandwidth_bytes_per_s"] > 1e8
