"""PPO with a critic against the reward model (report section 5.4), in one jitted step.

Models: `policy` (a Step1 LM from the SFT run, trained with `optimizer:`), `reference` (the
same LM, frozen), `critic` (the reward model's backbone and head, trained with
`ppo.critic_optimizer`; loaded from `ppo.reward_from`, never a random head), `reward` (the
reward model, frozen).

Each step (Task.prepare, no gradients): sample a response for every prompt with the current
policy (inference/sampler.py), then score the rollout with the trainer's own forward passes:
the policy's and reference's logprobs of the sampled tokens (token_logprobs, the function the
sampler uses, at the sampling temperature), the critic's values, and the reward model's score
at the response's EOS, normalised with the reward model's held-out mean and std and clipped.
Per-token rewards are -kl_coef x KL(policy, reference) (k1 or k3), plus the score on the last
token; a response with no EOS loses `truncation_penalty` from its score, and an optional rule
(`rule_answer` to a spoken question) subtracts `rule_penalty`. GAE (gamma, lambda) by a reverse
scan, returns = advantages + values, advantages whitened over response tokens. Then the
updates: the clipped-ratio policy loss (from step `critic_warmup_steps` on) and the clipped
value loss, each `epochs` x `minibatches` optimizer updates over the rollout. The old logprobs
come from the trainer's forward on the same minibatch blocks the first pass uses, so the ratio
of the very first minibatch is 1 (`policy/first/ratio`), and the sampler's logprobs are
compared with them (`rollout/logprob_gap`, the max absolute difference).
"""

import dataclasses
import enum

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepaudio_jax.config.fields import coerce_enums, input_path
from stepaudio_jax.config.training import OptimizerConfig
from stepaudio_jax.data.pairs import PromptSource
from stepaudio_jax.data.source import BatchSource
from stepaudio_jax.data.templates import template_context
from stepaudio_jax.inference.decode import Prompts
from stepaudio_jax.inference.sampler import SamplingConfig, sample, sequences, token_logprobs
from stepaudio_jax.models.reward import RewardModel
from stepaudio_jax.models.step1 import Step1
from stepaudio_jax.tasks.base import (BatchField, Deliverable, Model, Split, Task, Update,
                                      map_first_pass)
from stepaudio_jax.tasks.lm_config import check_lm_config
from stepaudio_jax.tasks.reward import read_score_stats


class KLEstimator(str, enum.Enum):
  K1 = "k1"  # log p - log q: unbiased, can be negative per token
  K3 = "k3"  # exp(q - p) - (q - p) - 1: unbiased, never negative (Schulman)


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """The `ppo` section; defaults are the report's and the reference RLHF
  implementations' (facts.md sections 4 and 7). The policy's optimizer is `optimizer:`."""

  prompts: list[str] = input_path(default_factory=list)  # preference shards (prompts)
  # run directory of the SFT policy (its model.lm); also the reference
  policy_from: str = input_path(default="")
  # run directory of the reward model; also the critic's start
  reward_from: str = input_path(default="")
  prompt_len: int = 128  # prompts are left-padded (or left-truncated) to this
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  kl_coef: float = 0.05
  kl_estimator: KLEstimator = KLEstimator.K1
  gamma: float = 1.0
  lam: float = 0.95
  clip_ratio: float = 0.2
  value_clip: float = 0.2
  score_clip: float = 5.0  # the normalised reward-model score is clipped to +-this
  truncation_penalty: float = 1.0  # subtracted from the score of a response cut without EOS
  rule_answer: str = ""  # rule-based reward: a response containing this to a spoken question...
  rule_penalty: float = 0.0  # ...loses this much (the report's planned fix for deaf hacking)
  critic_warmup_steps: int = 80  # the critic trains alone (policy frozen) for these steps
  epochs: int = 1  # passes over each rollout batch
  minibatches: int = 1  # optimizer updates per pass
  critic_optimizer: OptimizerConfig = dataclasses.field(
      default_factory=lambda: OptimizerConfig(learning_rate=1e-5, end_learning_rate=1e-6,
                                              schedule="cosine", embed_lr_multiplier=1.0,
                                              weight_decay=0.0))

  def __post_init__(self):
    coerce_enums(self)
    for name in ("prompt_len", "max_new_tokens", "epochs", "minibatches"):
      if getattr(self, name) <= 0:
        raise ValueError(f"ppo.{name} must be positive, got {getattr(self, name)}")
    for name in ("temperature", "kl_coef", "clip_ratio", "value_clip", "score_clip",
                 "truncation_penalty", "rule_penalty", "critic_warmup_steps", "top_k"):
      if getattr(self, name) < 0:
        raise ValueError(f"ppo.{name} must be >= 0, got {getattr(self, name)}")
    if not (0 < self.top_p <= 1 and 0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
      raise ValueError("need 0 < ppo.top_p <= 1 and 0 <= ppo.gamma, ppo.lam <= 1")


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
        ) -> jax.Array:
  """Advantages [B, N] by a reverse scan: delta_t = r_t + gamma V_{t+1} - V_t (V after the last
  response token is 0), A_t = delta_t + gamma lam A_{t+1}; 0 outside the mask."""
  def back(carry, xs):
    next_value, next_adv = carry
    r, v, m = xs
    delta = r + gamma * next_value - v
    adv = (delta + gamma * lam * next_adv) * m
    return (v * m, adv), adv

  zeros = jnp.zeros(rewards.shape[0], jnp.float32)
  _, adv = jax.lax.scan(back, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
  return adv.T


def whiten(x: jax.Array, mask: jax.Array) -> jax.Array:
  n = jnp.maximum(mask.sum(), 1.0)
  mean = (x * mask).sum() / n
  var = (((x - mean) * mask) ** 2).sum() / n
  return (x - mean) * jax.lax.rsqrt(var + 1e-8) * mask


def kl_per_token(logp: jax.Array, ref_logp: jax.Array, estimator: KLEstimator) -> jax.Array:
  log_ratio = logp - ref_logp
  if estimator == KLEstimator.K3:
    return jnp.exp(-log_ratio) + log_ratio - 1.0
  return log_ratio


def clipped_surrogate(logp: jax.Array, old_logp: jax.Array, adv: jax.Array, clip: float
                      ) -> tuple[jax.Array, jax.Array]:
  """(per-token loss max(-A r, -A clip(r, 1 - clip, 1 + clip)), ratio r = exp(logp - old))."""
  ratio = jnp.exp(logp - old_logp)
  return jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1 - clip, 1 + clip)), ratio


def clipped_value_loss(values: jax.Array, old: jax.Array, returns: jax.Array, clip: float
                       ) -> jax.Array:
  """Per token 0.5 max((V - R)^2, (clip(V, V_old +- clip) - R)^2)."""
  clipped = old + jnp.clip(values - old, -clip, clip)
  return 0.5 * jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def contains(tokens: jax.Array, mask: jax.Array, pattern: np.ndarray) -> jax.Array:
  """Whether each row's masked tokens contain `pattern` (a short id sequence) contiguously."""
  n, k = tokens.shape[1], len(pattern)
  hit = jnp.zeros(tokens.shape[0], bool)
  for start in range(n - k + 1):
    window = tokens[:, start:start + k]
    hit = hit | (jnp.all(window == pattern[None], axis=1) & mask[:, start + k - 1])
  return hit


class PPOTask(Task):
  progress_keys = ("rollout/score", "rollout/kl", "policy/loss", "critic/loss",
                   "rollout/response_length", "learning_rate/policy")

  sections = {"ppo": PPOConfig}
  scans_step1_layers = True  # policy, reference, critic and reward model: Step1 backbones
  deliverables = {"policy": Deliverable("policy", "step1"),  # never the frozen reference
                  "critic": Deliverable("critic", "reward"),
                  "reference": Deliverable("reference", "step1"),
                  "reward": Deliverable("reward", "reward")}
  optimizer_keys = ("optimizer", "ppo.critic_optimizer")

  @classmethod
  def check_config(cls, cfg):
    check_lm_config(cfg)
    p = cfg.ppo
    if not (p.prompts and p.policy_from and p.reward_from):
      raise ValueError("task=ppo needs ppo.prompts (preference shards), ppo.policy_from (the SFT "
                       "run) and ppo.reward_from (the reward-model run)")
    if p.prompt_len + p.max_new_tokens > cfg.model.max_seq_len:
      raise ValueError(f"ppo.prompt_len + ppo.max_new_tokens = "
                       f"{p.prompt_len + p.max_new_tokens} exceeds model.max_seq_len")
    if cfg.train.batch_size % p.minibatches:
      raise ValueError(f"train.batch_size={cfg.train.batch_size} (prompts per step) does not "
                       f"split into ppo.minibatches={p.minibatches}")

  def __init__(self, cfg, shard):
    super().__init__(cfg, shard)
    p = cfg.ppo
    self.sampling = SamplingConfig(max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                                   top_k=p.top_k, top_p=p.top_p, eos_id=cfg.tokens.eos_id,
                                   pad_id=cfg.tokens.pad_id)
    self._ctx = None

  @property
  def ctx(self):
    if self._ctx is None:
      self._ctx = template_context(self.cfg.data, self.cfg.tokens, self.cfg.vision)
    return self._ctx

  def models(self):
    cfg, shard = self.cfg, self.shard
    lm = lambda rngs: Step1(cfg.model, shard, rngs=rngs)  # noqa: E731
    rm = lambda rngs: RewardModel(cfg.model, shard, rngs=rngs)  # noqa: E731
    return {
        "policy": Model(lm, optimizer=cfg.optimizer),
        "reference": Model(lm, trainable=nnx.Nothing),
        "critic": Model(rm, optimizer=cfg.ppo.critic_optimizer),
        "reward": Model(rm, trainable=nnx.Nothing),
    }

  def batch_fields(self):
    b, p = self.cfg.train.batch_size, self.cfg.ppo.prompt_len
    row = ("act_batch", "act_length")
    fields = {f"prompt_{k}": BatchField((b, p), np.int32, row)
              for k in ("tokens", "segment_ids", "positions")}
    fields["spoken"] = BatchField((b,), np.int32, ("act_batch",))
    return fields

  # -- rollout -----------------------------------------------------------------------------

  def _response_logprobs(self, lm, tokens, seg, pos, response):
    p = self.cfg.ppo.prompt_len
    logits = lm(tokens, seg, pos)[:, p - 1:-1]
    return token_logprobs(logits, response, self.cfg.ppo.temperature)

  def prepare(self, params, frozen, batch, rng):
    p = self.cfg.ppo
    prompts = Prompts(batch["prompt_tokens"], batch["prompt_segment_ids"],
                      batch["prompt_positions"])
    rollout = sample(self.graphdef("policy"), params["policy"], prompts, self.sampling, rng)
    rollout = jax.tree.map(jax.lax.stop_gradient, rollout)
    seq = sequences(prompts, rollout)
    mask = rollout.mask().astype(jnp.float32)
    policy, reference = self.merge("policy", params, frozen), self.merge("reference", params,
                                                                         frozen)
    critic = self.merge("critic", params, frozen)

    def trainer_view(tokens, seg, pos, response):
      logp = self._response_logprobs(policy, tokens, seg, pos, response)
      ref = self._response_logprobs(reference, tokens, seg, pos, response)
      return logp, ref, critic(tokens, seg, pos)[:, p.prompt_len - 1:-1]

    # On the first pass's minibatches, so the first update's ratio is exactly 1.
    logp, ref, values = map_first_pass(trainer_view, p.minibatches, seq.tokens, seq.segment_ids,
                                       seq.positions, rollout.tokens)
    raw = self.raw_scores(params, frozen, seq, rollout)
    mean, std = self.score_stats
    norm = jnp.clip((raw - mean) / std, -p.score_clip, p.score_clip)
    final = norm - p.truncation_penalty * rollout.truncated
    if p.rule_answer and p.rule_penalty:
      hit = contains(rollout.tokens, mask > 0, self.rule_ids) & (batch["spoken"] > 0)
      final = final - p.rule_penalty * hit
    else:
      hit = jnp.zeros_like(rollout.truncated)
    kl = kl_per_token(logp, ref, p.kl_estimator) * mask
    end = jax.nn.one_hot(rollout.lengths - 1, mask.shape[1]) * mask
    rewards = -p.kl_coef * kl + final[:, None] * end
    values = values * mask
    adv = gae(rewards, values, mask, p.gamma, p.lam)
    out = {
        "tokens": seq.tokens, "segment_ids": seq.segment_ids, "positions": seq.positions,
        "response": rollout.tokens, "mask": mask, "old_logprobs": logp, "old_values": values,
        "returns": adv + values, "advantages": whiten(adv, mask),
    }
    rows = mask.shape[0]
    metrics = {
        "rollout/score": final.mean(), "rollout/raw_score": raw.mean(),
        "rollout/kl": kl.sum() / jnp.maximum(mask.sum(), 1.0),
        "rollout/response_length": mask.sum() / rows,
        "rollout/truncated_fraction": rollout.truncated.mean(),
        "rollout/rule_hits": hit.mean(),
        "rollout/logprob_gap": jnp.abs((rollout.logprobs - logp) * mask).max(),
    }
    return out, metrics

  def raw_scores(self, params, frozen, seq: Prompts, rollout) -> jax.Array:
    """The reward model's score of each response, read at its last token (the EOS when the
    response has one) [B]; a test overrides this with a known reward."""
    reward = self.merge("reward", params, frozen)
    scores = map_first_pass(reward, self.cfg.ppo.minibatches, seq.tokens, seq.segment_ids,
                            seq.positions)
    last = self.cfg.ppo.prompt_len + rollout.lengths - 1
    return jnp.take_along_axis(scores, last[:, None], axis=1)[:, 0]

  # -- losses ------------------------------------------------------------------------------

  def policy_loss(self, params, frozen, batch, rng):
    p = self.cfg.ppo
    policy = self.merge("policy", params, frozen)
    p_len = p.prompt_len
    logits = policy(batch["tokens"], batch["segment_ids"], batch["positions"])[:, p_len - 1:-1]
    logp = token_logprobs(logits, batch["response"], p.temperature)
    mask = batch["mask"]
    log_ratio = logp - batch["old_logprobs"]
    per_token, ratio = clipped_surrogate(logp, batch["old_logprobs"], batch["advantages"],
                                         p.clip_ratio)
    per_token = per_token * mask
    logq = jax.nn.log_softmax(logits.astype(jnp.float32) / (p.temperature or 1.0), axis=-1)
    entropy = -(jnp.exp(logq) * logq).sum(-1)
    sums = {
        "loss_sum": per_token.sum(), "tokens": mask.sum(), "ratio_sum": (ratio * mask).sum(),
        "clip_sum": ((jnp.abs(ratio - 1) > p.clip_ratio) * mask).sum(),
        "approx_kl_sum": (((ratio - 1) - log_ratio) * mask).sum(),
        "entropy_sum": (entropy * mask).sum(),
    }
    return sums["loss_sum"], sums

  def value_loss(self, params, frozen, batch, rng):
    p = self.cfg.ppo
    critic = self.merge("critic", params, frozen)
    values = critic(batch["tokens"], batch["segment_ids"], batch["positions"])
    values = values[:, p.prompt_len - 1:-1]
    mask, returns, old = batch["mask"], batch["returns"], batch["old_values"]
    per_token = clipped_value_loss(values, old, returns, p.value_clip) * mask
    sums = {"loss_sum": per_token.sum(), "tokens": mask.sum(),
            "value_error_sum": (jnp.abs(values - returns) * mask).sum(),
            "clip_sum": ((jnp.abs(values - old) > p.value_clip) * mask).sum()}
    return sums["loss_sum"], sums

  def metrics(self, sums, update):
    """Per-token means: loss, and ratio / approx_kl / entropy (policy) or value_error
    (critic), and the clipped fraction."""
    n = jnp.maximum(sums[update.denominator], 1.0)
    out = {"loss": sums["loss_sum"] / n, "tokens": sums["tokens"]}
    for k, v in sums.items():
      if k not in ("loss_sum", "tokens"):
        out["clip_fraction" if k == "clip_sum" else k.removesuffix("_sum")] = v / n
    return out

  def updates(self):
    p = self.cfg.ppo
    common = dict(denominator="tokens", epochs=p.epochs, minibatches=p.minibatches)
    return (Update(("critic",), self.value_loss, "critic", **common),
            Update(("policy",), self.policy_loss, "policy", starts_at=p.critic_warmup_steps,
                   report_first=("ratio",), **common))

  def eval_sums(self, params, frozen, batch, rng):
    _, metrics = self.prepare(params, frozen, batch, rng)
    return {k: v * batch["spoken"].shape[0] for k, v in metrics.items()} | {
        "rows": jnp.float32(batch["spoken"].shape[0])}

  def eval_metrics(self, sums):
    return {k: v / sums["rows"] for k, v in sums.items() if k != "rows"}

  # -- data and start ----------------------------------------------------------------------

  def make_source(self, split: Split) -> BatchSource:
    tc, p = self.cfg.train, self.cfg.ppo
    return PromptSource(p.prompts, self.ctx, p.prompt_len, tc.batch_size,
                        tc.seed + (1 if split == Split.EVAL else 0))

  @property
  def rule_ids(self) -> np.ndarray:
    return np.asarray(self.ctx.tokenizer.encode(self.cfg.ppo.rule_answer), np.int32)

  @property
  def score_stats(self) -> tuple[float, float]:
    """The reward model's held-out score mean and std, from its run (ppo.reward_from)."""
    return read_score_stats(self.cfg.ppo.reward_from)

  def warm_start(self, params, frozen, load):
    """Policy and reference from ppo.policy_from (its model.lm); critic and reward model from
    ppo.reward_from (backbone and head): a run without a head is an error, never a random
    head."""
    p = self.cfg.ppo
    got, policy = load(p.policy_from, "ppo.policy_from")
    if got.kind != "step1":
      raise ValueError(f"ppo.policy_from={p.policy_from!r} delivers a {got.kind} model, not a "
                       "Step1 LM; point it at an SFT run")
    got, reward = load(p.reward_from, "ppo.reward_from")
    if got.kind != "reward" or "head" not in reward:
      raise ValueError(f"ppo.reward_from={p.reward_from!r} delivers a {got.kind} model, not a "
                       "reward model with a head; point it at a task=reward run")
    lm = _checked(frozen["reference"], policy, "ppo.policy_from")
    rm = _checked(frozen["reward"], reward, "ppo.reward_from")
    return ({**params, "policy": lm, "critic": rm},
            {**frozen, "reference": lm, "reward": rm})


def _checked(want: dict, got: dict, key: str) -> dict:
  shapes = lambda t: jax.tree.map(lambda x: x.shape, t)  # noqa: E731
  if shapes(want) != shapes(got):
    raise ValueError(f"{key}: the checkpoint's shapes {shapes(got)} do not match the model's "
                     f"{shapes(want)}; use the model config it was trained with")
  return got
