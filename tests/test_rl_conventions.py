"""The conventions of the reward model and PPO, each against the real task code (ToyPPO in
test_post_training.py replaces the reward and the warm start, and runs without a truncation
penalty, so its tests would not notice them broken):

  - PPO reads the reward model's score at the response's last token (its EOS), not at the pad
    after it nor one token early;
  - the critic starts as the reward model, the reference as the policy;
  - a response cut without EOS loses ppo.truncation_penalty, and only such a response;
  - the policy loss takes logprobs (and entropy) at ppo.temperature, the sampler's;
  - a reward model's tied pair is not counted correct, and reward.margin is in its loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stepaudio_jax.inference.decode import Prompts
from stepaudio_jax.inference.sampler import Samples, sequences
from stepaudio_jax.tasks import ppo
from stepaudio_jax.tasks.base import Deliverable, split_model
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.tasks.reward import RewardTask
from tests.test_post_training import REWARD, TINY, TOY

P, N = 8, 8  # TOY's ppo.prompt_len and ppo.max_new_tokens
EOS, PAD = 3, 0


def _ppo(tmp_path, *more) -> ppo.PPOTask:
  cfg = load_config(TINY, [*TOY, f"train.run_dir={tmp_path}", *more])
  assert (cfg.tokens.eos_id, cfg.tokens.pad_id) == (EOS, PAD)
  return ppo.PPOTask(cfg, None)


def _trees(task, seeds: dict[str, int]) -> tuple[dict, dict]:
  """(params, frozen) as the state holds them: each group built from its own seed and split
  by its trainable filter into pure dicts."""
  params, frozen = {}, {}
  for name, model in task.models().items():
    _, p, f = split_model(model.build(nnx.Rngs(seeds[name])), model.trainable)
    params[name], frozen[name] = nnx.to_pure_dict(p), nnx.to_pure_dict(f)
  return params, frozen


SEEDS = {"policy": 1, "reference": 2, "critic": 3, "reward": 4}


def _prompts(rows: int) -> Prompts:
  """Left-padded prompts of 4 tokens."""
  tokens = np.zeros((rows, P), np.int32)
  seg, pos = np.zeros_like(tokens), np.zeros_like(tokens)
  rng = np.random.default_rng(0)
  tokens[:, -4:] = rng.integers(16, 40, (rows, 4))
  seg[:, -4:] = 1
  pos[:, -4:] = np.arange(4)
  return Prompts(jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos))


def _rollout(lengths: list[int], truncated: list[bool]) -> Samples:
  """Responses of these lengths (EOS included where not truncated), pad after them."""
  rng = np.random.default_rng(1)
  tokens = np.full((len(lengths), N), PAD, np.int32)
  for b, (n, cut) in enumerate(zip(lengths, truncated)):
    tokens[b, :n] = rng.integers(16, 40, n)
    if not cut:
      tokens[b, n - 1] = EOS
  return Samples(jnp.asarray(tokens), jnp.zeros(tokens.shape, jnp.float32),
                 jnp.asarray(lengths, jnp.int32), jnp.asarray(truncated))


def _assert_trees_equal(a: dict, b: dict) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- PPO -------------------------------------------------------------------------------------

def test_ppo_reads_the_reward_at_the_last_response_token(tmp_path):
  """PPOTask.raw_scores with a real (tiny, random) reward model, whose score differs from
  position to position: the score at prompt_len + length - 1 (the EOS, or the last token of a
  cut response), on the rows of each minibatch."""
  task = _ppo(tmp_path, "ppo.minibatches=2", "ppo.truncation_penalty=0.5")
  params, frozen = _trees(task, SEEDS)
  lengths, cut = [3, N, 1, 5], [False, True, False, False]
  prompts, rollout = _prompts(4), _rollout(lengths, cut)
  seq = sequences(prompts, rollout)
  got = np.asarray(jax.jit(task.raw_scores)(params, frozen, seq, rollout))
  rm = task.merge("reward", params, frozen)
  scores = np.asarray(rm(seq.tokens, seq.segment_ids, seq.positions))  # [B, P + N]
  last = P + np.asarray(lengths) - 1
  np.testing.assert_allclose(got, scores[np.arange(4), last], rtol=1e-5, atol=1e-6)
  # The test tells the last token from its neighbours: the pad after it, the token before.
  for b in range(4):
    for other in (last[b] - 1, last[b] + 1):
      if other < P + N:
        assert abs(scores[b, other] - scores[b, last[b]]) > 1e-3, (b, other)


def test_ppo_starts_the_critic_from_the_reward_model_and_the_reference_from_the_policy(
    tmp_path):
  """PPOTask.warm_start with a `load` that gives known trees: the critic (trained) and the
  reward model (frozen) are ppo.reward_from's, the policy and the reference ppo.policy_from's;
  nothing of the random initialisation is left."""
  sft, rm_run = str(tmp_path / "sft"), str(tmp_path / "rm")
  task = _ppo(tmp_path, f"ppo.policy_from={sft}", f"ppo.reward_from={rm_run}")
  params, frozen = _trees(task, SEEDS)
  sft_params, _ = _trees(task, {**SEEDS, "policy": 11})
  lm = sft_params["policy"]  # a Step1 LM other than the initial policy and reference
  _, rm_frozen = _trees(task, {**SEEDS, "reward": 12})
  rm = rm_frozen["reward"]  # a reward model other than the initial critic and reward model
  calls = []

  def load(run_dir, key):
    calls.append((run_dir, key))
    return {sft: (Deliverable("model", "step1"), lm),
            rm_run: (Deliverable("reward", "reward"), rm)}[run_dir]

  new_params, new_frozen = task.warm_start(params, frozen, load)
  assert sorted(calls) == sorted([(rm_run, "ppo.reward_from"), (sft, "ppo.policy_from")])
  _assert_trees_equal(new_params["critic"], rm)
  _assert_trees_equal(new_frozen["reward"], rm)
  _assert_trees_equal(new_params["policy"], lm)
  _assert_trees_equal(new_frozen["reference"], lm)
  # The trees given differ from the initial ones, so a critic left random would fail above.
  assert not np.array_equal(params["critic"]["head"]["weight"], rm["head"]["weight"])
  assert not np.array_equal(params["policy"]["lm_head"], lm["lm_head"])


def test_ppo_takes_the_truncation_penalty_from_cut_responses_only(tmp_path, monkeypatch):
  """PPOTask.prepare on a rollout with known EOS: with gamma = lam = 1 and no KL term the
  return at a response's first token is its final score, 0 - ppo.truncation_penalty for a
  response cut without EOS and 0 for the others (raw scores are set to the normalised mean)."""
  task = _ppo(tmp_path, "ppo.truncation_penalty=0.75", "ppo.kl_coef=0", "ppo.gamma=1",
              "ppo.lam=1", "ppo.minibatches=2")
  lengths, cut = [3, N, 1, N, 5, N, 2, 7], [False, True, False, True, False, True, False, False]
  rollout = _rollout(lengths, cut)
  monkeypatch.setattr(ppo, "sample", lambda *a, **k: rollout)
  monkeypatch.setattr(ppo.PPOTask, "score_stats", (0.0, 1.0))
  monkeypatch.setattr(ppo.PPOTask, "raw_scores", lambda self, *a: jnp.zeros(8, jnp.float32))
  params, frozen = _trees(task, SEEDS)
  p = _prompts(8)
  batch = {"prompt_tokens": p.tokens, "prompt_segment_ids": p.segment_ids,
           "prompt_positions": p.positions, "spoken": jnp.zeros(8, jnp.int32)}
  out, metrics = task.prepare(params, frozen, batch, jax.random.key(0))
  np.testing.assert_allclose(np.asarray(out["returns"])[:, 0],
                             [-0.75 if c else 0.0 for c in cut], atol=1e-5)
  assert float(metrics["rollout/score"]) == pytest.approx(-0.75 * 3 / 8, abs=1e-6)
  assert float(metrics["rollout/truncated_fraction"]) == pytest.approx(3 / 8)


def test_ppo_policy_loss_takes_logprobs_at_the_sampling_temperature(tmp_path):
  """PPOTask.policy_loss against numpy: log_softmax(logits / ppo.temperature) of the response,
  the clipped surrogate over the mask, and the entropy at that temperature."""
  temperature, clip = 0.5, 0.2
  task = _ppo(tmp_path, f"ppo.temperature={temperature}", f"ppo.clip_ratio={clip}")
  params, frozen = _trees(task, SEEDS)
  # Logits of a few units, where the temperature changes the distribution (a random LM's are
  # near zero, where it barely does).
  params["policy"]["lm_head"] = params["policy"]["lm_head"] * 50
  rollout = _rollout([3, N, 1, 5], [False, True, False, False])
  seq = sequences(_prompts(4), rollout)
  mask = np.asarray(rollout.mask(), np.float32)
  logits = np.asarray(task.merge("policy", params, frozen)(
      seq.tokens, seq.segment_ids, seq.positions), np.float64)[:, P - 1:-1]
  scaled = logits / temperature
  logq = scaled - scaled.max(-1, keepdims=True)
  logq = logq - np.log(np.exp(logq).sum(-1, keepdims=True))
  logp = np.take_along_axis(logq, np.asarray(rollout.tokens)[..., None], -1)[..., 0]
  rng = np.random.default_rng(2)
  old = logp + rng.uniform(-0.4, 0.4, logp.shape)  # ratios inside and outside the clip
  adv = rng.standard_normal(logp.shape)
  batch = {"tokens": seq.tokens, "segment_ids": seq.segment_ids, "positions": seq.positions,
           "response": rollout.tokens, "mask": jnp.asarray(mask),
           "old_logprobs": jnp.asarray(old, jnp.float32),
           "advantages": jnp.asarray(adv, jnp.float32)}
  loss, sums = jax.jit(task.policy_loss)(params, frozen, batch, None)
  ratio = np.exp(logp - old)
  want = (np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - clip, 1 + clip)) * mask).sum()
  np.testing.assert_allclose(float(loss), want, rtol=1e-4, atol=1e-5)
  entropy = -(np.exp(logq) * logq).sum(-1)
  np.testing.assert_allclose(float(sums["entropy_sum"]), (entropy * mask).sum(), rtol=1e-4)
  # At temperature 1 both would differ: the test tells the temperatures apart.
  at_one = logits - logits.max(-1, keepdims=True)
  at_one = at_one - np.log(np.exp(at_one).sum(-1, keepdims=True))
  logp_1 = np.take_along_axis(at_one, np.asarray(rollout.tokens)[..., None], -1)[..., 0]
  r1 = np.exp(logp_1 - old)
  other = (np.maximum(-adv * r1, -adv * np.clip(r1, 1 - clip, 1 + clip)) * mask).sum()
  assert abs(other - want) > 0.1 * max(abs(want), 1.0), (other, want)


# --- reward model ----------------------------------------------------------------------------

def _pairs(chosen: np.ndarray, rejected: np.ndarray, own_margin: np.ndarray) -> dict:
  """A reward batch: each side's 12 tokens end in EOS, then padding."""
  batch = {}
  t = chosen.shape[1]
  for side, tokens in (("chosen", chosen.copy()), ("rejected", rejected.copy())):
    tokens[:, 11] = EOS
    tokens[:, 12:] = PAD
    seg = (np.arange(t)[None] < 12).astype(np.int32).repeat(len(tokens), 0)
    batch[f"{side}_tokens"], batch[f"{side}_segment_ids"] = tokens, seg
    batch[f"{side}_positions"] = (np.arange(t)[None] * seg).astype(np.int32)
  batch["margin"] = own_margin.astype(np.float32)
  return jax.tree.map(jnp.asarray, batch)


def test_reward_accuracy_counts_ties_as_wrong_and_the_loss_takes_reward_margin():
  """RewardTask.loss with reward.margin=0.7 and each pair's own margin m. Pairs whose two sides
  are one answer (a tie: equal scores) are never correct and cost log(1 + e^(0.7 + m)), by hand;
  pairs of different answers cost -log sigmoid(diff - 0.7 - m) of their scores."""
  cfg = load_config(TINY, [*REWARD, "reward.margin=0.7", "reward.stages=[{shards: [unused]}]",
                           "train.eval_every=0"])
  task = RewardTask(cfg, None)
  params, frozen = _trees(task, {"reward": 5})
  update = task.updates()[0]
  rng = np.random.default_rng(3)
  own = np.array([0.0, 0.3, -0.2, 1.0, 0.0, 0.5, 0.0, -0.4], np.float32)
  answers = rng.integers(16, 300, (8, 16)).astype(np.int32)

  loss, sums = task.loss(params, frozen, _pairs(answers, answers, own), None)
  np.testing.assert_allclose(float(loss), np.log1p(np.exp(own.astype(np.float64) + 0.7)).sum(),
                             rtol=1e-5)
  assert float(sums["pairs"]) == 8 and float(sums["correct"]) == 0
  assert float(task.metrics(sums, update)["accuracy"]) == 0

  other = answers.copy()
  other[4:, 6:] = rng.integers(16, 300, (4, 10))  # rows 4..7 differ, rows 0..3 tie
  batch = _pairs(answers, other, own)
  loss, sums = task.loss(params, frozen, batch, None)
  r_c, r_r, valid = map(np.asarray, task.scores(params, frozen, batch))
  diff = r_c.astype(np.float64) - r_r
  assert valid.all() and np.all(diff[:4] == 0) and np.all(diff[4:] != 0)
  want = np.log1p(np.exp(-(diff - own - 0.7))).sum()
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert float(sums["correct"]) == (diff[4:] > 0).sum()
  assert float(task.metrics(sums, update)["accuracy"]) == pytest.approx((diff > 0).sum() / 8)
