"""Sampling on the KV cache: greedy, temperature, top-k, top-p, a no-repeat n-gram guard, EOS.

Axes: B batch, P prompt length, N new tokens, T positions, V vocabulary.

`sample` is pure in (params, prompts, rng), so a jitted train step can roll out its policy's
current parameters; `make_sampler` jits it with explicit shardings for direct use. Prefill,
then one token per row per iteration of a `lax.while_loop` that ends when every row has emitted
EOS or after max_new_tokens. A finished row emits pad with logprob 0 from then on.

The logprob contract (rollout logprobs must equal the trainer's): `token_logprobs` is the one
function both sides apply to their fp32 logits. A sampled token's logprob is that of the model
at the sampling temperature, log_softmax(logits / T), taken BEFORE the n-gram block, top-k and
top-p: those filters only choose which tokens may be drawn, while the policy whose ratio PPO
takes is the temperature-scaled model. Greedy (T = 0) reports the model's own logprob (T = 1).
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jaxtyping import Array, Bool, Float, Int

from stepaudio_jax.inference import decode
from stepaudio_jax.inference.decode import Prompts
from stepaudio_jax.kernels.layout import ONE_SEGMENT
from stepaudio_jax.models.step1 import Step1
from stepaudio_jax.parallel.mesh import LogicalSharding, logical_axes


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How each new token is chosen; hashable, so jit takes it as a static argument.

  The repetition guard is a no-repeat n-gram block on the row's own output (quoting the prompt
  stays allowed): it forbids only the token that would repeat an n-gram, so the distribution is
  untouched until a loop forms, where a repetition penalty lowers every token already seen at
  every step (audio codes recur all the time: silence and steady sounds repeat one code).
  Speech repeats short n-grams too, so for audio choose n large or leave the guard off.
  """

  max_new_tokens: int
  temperature: float = 1.0  # 0 = greedy (argmax)
  top_k: int = 0  # keep the k most likely tokens; 0 = off
  top_p: float = 1.0  # keep the most likely tokens holding top_p of the mass; 1 = off
  no_repeat_ngram: int = 0  # never emit an n-gram this row has already emitted; 0 = off
  eos_id: int = 3
  pad_id: int = 0

  def __post_init__(self):
    problems = [
        f"{name}={value!r} must be {rule}" for name, value, bad, rule in (
            ("max_new_tokens", self.max_new_tokens, self.max_new_tokens < 1, ">= 1"),
            ("temperature", self.temperature, not self.temperature >= 0, ">= 0 (0 = greedy)"),
            ("top_k", self.top_k, self.top_k < 0, ">= 0 (0 = off)"),
            ("top_p", self.top_p, not 0 < self.top_p <= 1, "in (0, 1] (1 = off)"),
            ("no_repeat_ngram", self.no_repeat_ngram, self.no_repeat_ngram < 0, ">= 0 (0 = off)"),
            ("eos_id", self.eos_id, self.eos_id < 0 or self.eos_id == self.pad_id,
             ">= 0 and differ from pad_id"),
        ) if bad
    ]
    if problems:
      raise ValueError("bad sampling settings: " + "; ".join(problems))


@struct.dataclass
class Samples:
  """New tokens per row: tokens [B, N] (pad after EOS), logprobs [B, N] (0 after EOS),
  lengths [B] (new tokens including EOS), truncated [B] (no EOS within max_new_tokens)."""

  tokens: Int[Array, "B N"]
  logprobs: Float[Array, "B N"]
  lengths: Int[Array, " B"]
  truncated: Bool[Array, " B"]

  def mask(self) -> Bool[Array, "B N"]:
    """The sampled tokens (EOS included), as opposed to the pad after them; a sampled token
    may itself be the pad id."""
    return jnp.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]


def token_logprobs(
    logits: Float[Array, "B T V"], tokens: Int[Array, "B T"], temperature: float
) -> Float[Array, "B T"]:
  """log_softmax(logits / temperature) at each token, in fp32; temperature 0 counts as 1.

  The one definition of a token's logprob for the sampler and the trainer's PPO loss."""
  scaled = logits.astype(jnp.float32) / (temperature if temperature > 0 else 1.0)
  return jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[..., None],
                             axis=-1)[..., 0]


def _ordered_keys(x: Float[Array, "B V"]) -> Int[Array, "B V"]:
  """float32 -> int32 keys in the same order (negative floats: magnitude bits flipped)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def top_p_mask(logits: Float[Array, "B V"], top_p: float) -> Bool[Array, "B V"]:
  """The nucleus: each token whose strictly more likely tokens hold less than top_p of the
  mass (the most likely token always; tokens tied at the edge all or none). The cut-off is
  found by bisection over the float32 order, 32 masked sums, instead of sorting the vocabulary
  (XLA:CPU takes 16 ms to sort 8 x 8192 logits)."""
  probs = jax.nn.softmax(logits, axis=-1)
  keys = _ordered_keys(logits)
  finite = jnp.isfinite(logits)
  top = jnp.iinfo(jnp.int32).max
  lo = jnp.min(jnp.where(finite, keys, top), axis=-1, keepdims=True) - 1  # mass above: 1
  hi = jnp.max(keys, axis=-1, keepdims=True)  # mass above the most likely token: 0

  def halve(_, bounds):  # mass above lo >= top_p > mass above hi
    lo, hi = bounds
    mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor of the mean, without overflow
    over = jnp.sum(jnp.where(keys > mid, probs, 0.0), axis=-1, keepdims=True) >= top_p
    return jnp.where(over, mid, lo), jnp.where(over, hi, mid)

  _, hi = jax.lax.fori_loop(0, 32, halve, (lo, hi))  # hi - lo <= 1: no float in between
  return keys >= hi


def filter_logits(logits: Float[Array, "B V"], top_k: int, top_p: float) -> Float[Array, "B V"]:
  """Top-k, then top-p of what top-k kept (renormalised), as Hugging Face chains them; the
  rest get -inf. Exactly k survive top-k, ties ranked lower id first (lax.top_k)."""
  v = logits.shape[-1]
  if 0 < top_k < v:
    vals, ids = jax.lax.top_k(logits, top_k)
    if top_p < 1.0:
      vals = jnp.where(top_p_mask(vals, top_p), vals, -jnp.inf)
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.full_like(logits, -jnp.inf).at[rows, ids].set(vals)
  return jnp.where(top_p_mask(logits, top_p), logits, -jnp.inf) if top_p < 1.0 else logits


def choose_tokens(
    logits: Float[Array, "B V"], cfg: SamplingConfig, key: jax.Array,
    banned: Bool[Array, "B V"] | None = None,
) -> Int[Array, " B"]:
  """One token per row: the argmax (temperature 0) or a draw from the filtered, temperature-
  scaled distribution; banned tokens are never chosen."""
  if banned is not None:
    logits = jnp.where(banned, -jnp.inf, logits)
  if cfg.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
  return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def ngram_banned(
    history: Int[Array, "B N"], step: Int[Array, ""], n: int, vocab: int
) -> Bool[Array, "B V"]:
  """Tokens that would repeat an n-gram of history[:, :step] as tokens step-n+1..step: for
  each earlier position k whose n-1 predecessors equal the last n-1 tokens, history[k]."""
  b, num = history.shape
  padded = jnp.concatenate([jnp.full((b, n - 1), -1, jnp.int32), history], axis=1)
  last = jax.lax.dynamic_slice_in_dim(padded, step, n - 1, axis=1)  # tokens step-n+1..step-1
  match = jnp.broadcast_to(jnp.arange(num)[None, :] < step, (b, num))
  for j in range(n - 1):  # predecessor j of position k sits at padded[:, k + j]
    match = match & (padded[:, j:j + num] == last[:, j:j + 1])
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, num))
  return jnp.zeros((b, vocab), jnp.int32).at[rows, history].add(match.astype(jnp.int32)) > 0


def sample(
    graphdef: nnx.GraphDef, params: dict, prompts: Prompts, cfg: SamplingConfig, rng: jax.Array
) -> Samples:
  """cfg.max_new_tokens tokens per left-padded prompt from a Step1 graph; step i draws with
  fold_in(rng, i). Pure: call it inside any jit (cfg must be static there)."""
  b, p = prompts.tokens.shape
  n = cfg.max_new_tokens
  logits, cache = decode.prefill(graphdef, params, prompts, p + n - 1)

  def pick(i, logits, tokens, logprobs, done):
    banned = (ngram_banned(tokens, i, cfg.no_repeat_ngram, logits.shape[-1])
              if cfg.no_repeat_ngram else None)
    token = choose_tokens(logits, cfg, jax.random.fold_in(rng, i), banned)
    logprob = token_logprobs(logits[:, None], token[:, None], cfg.temperature)[:, 0]
    token = jnp.where(done, cfg.pad_id, token)
    logprob = jnp.where(done, 0.0, logprob)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, i, axis=1)
    logprobs = jax.lax.dynamic_update_index_in_dim(logprobs, logprob, i, axis=1)
    return token, tokens, logprobs, done | (token == cfg.eos_id)

  tokens = jnp.full((b, n), cfg.pad_id, jnp.int32)
  logprobs = jnp.zeros((b, n), jnp.float32)
  first = pick(0, logits, tokens, logprobs, jnp.zeros((b,), bool))

  def more(carry):
    i, _, _, _, done, _ = carry
    return (i < n) & ~jnp.all(done)

  def body(carry):
    i, token, tokens, logprobs, done, cache = carry
    logits, cache = decode.step(graphdef, params, token, cache)
    return (i + 1, *pick(i, logits, tokens, logprobs, done), cache)

  start = (jnp.int32(1), *first, cache)
  _, _, tokens, logprobs, done, _ = jax.lax.while_loop(more, body, start)
  ended = tokens == cfg.eos_id  # only the first EOS of a row is ever written
  lengths = jnp.where(done, jnp.argmax(ended, axis=1) + 1, n).astype(jnp.int32)
  return Samples(tokens, logprobs, lengths, ~done)


def sequences(prompts: Prompts, samples: Samples) -> Prompts:
  """Prompts and samples as the trainer's forward reads them: [B, P + N] left-padded rows with
  segment id 1 on prompt and sampled tokens, 0 on padding, and their true positions. The logits
  at columns P-1..P+N-2 predict the N sampled tokens."""
  mask = samples.mask()
  positions = prompts.positions[:, -1:] + 1 + jnp.arange(samples.tokens.shape[1])[None, :]
  return Prompts(
      jnp.concatenate([prompts.tokens, samples.tokens], axis=1),
      jnp.concatenate([prompts.segment_ids, jnp.where(mask, ONE_SEGMENT, 0)], axis=1),
      jnp.concatenate([prompts.positions, jnp.where(mask, positions, 0)], axis=1),
  )


def completion_logprobs(
    graphdef: nnx.GraphDef, params: dict, prompts: Prompts, samples: Samples, temperature: float
) -> Float[Array, "B N"]:
  """The trainer's side of the contract: its forward (Step1.__call__, no cache) over
  `sequences(prompts, samples)`, then token_logprobs of the sampled tokens; 0 after EOS."""
  rows = sequences(prompts, samples)
  logits = nnx.merge(graphdef, params)(rows.tokens, rows.segment_ids, rows.positions)
  p = prompts.tokens.shape[1]
  logprobs = token_logprobs(logits[:, p - 1:-1], samples.tokens, temperature)
  return jnp.where(samples.mask(), logprobs, 0.0)


def make_sampler(
    model: Step1, shard: LogicalSharding | None = None
) -> Callable[[dict, Prompts, SamplingConfig, jax.Array], Samples]:
  """`sample` of model's graph (it may be abstract), jitted with the config static:
  sampler(params, prompts, cfg, rng). With shard, parameters are sharded by their logical
  axes, prompts and samples on act_batch, and the key is replicated."""
  graphdef, state = nnx.split(model)
  fn = functools.partial(sample, graphdef)
  if shard is None:
    return jax.jit(fn, static_argnums=2)
  rows, row = shard.named(("act_batch", None)), shard.named(("act_batch",))
  return jax.jit(fn, static_argnums=2,
                 in_shardings=(shard.tree(logical_axes(state)), Prompts(rows, rows, rows),
                               shard.named(())),
                 out_shardings=Samples(rows, rows, row, row))
