"""Reward model and PPO: losses against hand-computed values, GAE against a Python loop, a reward
model that learns a preference, PPO that raises a known reward under a KL bound with a first
ratio of 1, resume, and 8 devices against 1."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stepaudio_jax.config import ConfigError
from stepaudio_jax.data.records import Example, PREFERENCE, write_shard
from stepaudio_jax.data.source import BatchSource, process_rows
from stepaudio_jax.tasks import ppo
from stepaudio_jax.tasks.base import EVAL_METRICS, Split
from stepaudio_jax.tasks.ppo import KLEstimator
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.tasks.reward import RewardTask, bradley_terry, read_score_stats
from stepaudio_jax.training.setup import setup
from stepaudio_jax.training.trainer import train
from tests.conftest import REPO

TINY = os.path.join(REPO, "configs", "tiny.yaml")
QUIET = {"print_fn": lambda *a, **k: None}


def test_bradley_terry_and_kl_against_hand_values():
  # -log sigmoid(x) = log(1 + e^-x)
  np.testing.assert_allclose(bradley_terry(2.0, 0.5, 0.0), math.log(1 + math.exp(-1.5)),
                             rtol=1e-6)
  np.testing.assert_allclose(bradley_terry(2.0, 0.5, 1.0), math.log(1 + math.exp(-0.5)),
                             rtol=1e-6)
  logp, ref = jnp.array([-1.0, -2.0]), jnp.array([-2.0, -1.0])
  np.testing.assert_allclose(ppo.kl_per_token(logp, ref, KLEstimator.K1), [1.0, -1.0])
  # k3 = e^(ref - logp) - (ref - logp) - 1, never negative
  np.testing.assert_allclose(ppo.kl_per_token(logp, ref, KLEstimator.K3),
                             [math.exp(-1) + 1 - 1, math.exp(1) - 1 - 1], rtol=1e-6)


def test_clipped_losses_against_hand_values():
  # ratio e^0.5 = 1.6487 > 1.2: with A = 2 the clipped term binds (loss -2.4); with A = -1 the
  # unclipped one does (loss 1.6487); ratio e^-0.5 = 0.6065 < 0.8 with A = 2: -2 * 0.6065.
  logp, old = jnp.array([0.5, 0.5, -0.5]), jnp.zeros(3)
  loss, ratio = ppo.clipped_surrogate(logp, old, jnp.array([2.0, -1.0, 2.0]), 0.2)
  np.testing.assert_allclose(ratio, np.exp([0.5, 0.5, -0.5]), rtol=1e-6)
  np.testing.assert_allclose(loss, [-2.4, math.exp(0.5), -2 * math.exp(-0.5)], rtol=1e-6)
  # V 1.5 from V_old 1.0 (clipped to 1.2), R 2: max(0.25, 0.64) / 2; V 0.9, R 1: max(0.01, 0.01)
  values = ppo.clipped_value_loss(jnp.array([1.5, 0.9]), jnp.array([1.0, 0.9]),
                                  jnp.array([2.0, 1.0]), 0.2)
  np.testing.assert_allclose(values, [0.32, 0.005], rtol=1e-6)


def test_gae_equals_a_python_loop():
  rng = np.random.default_rng(0)
  b, n, gamma, lam = 3, 7, 0.97, 0.9
  rewards, values = rng.normal(size=(b, n)), rng.normal(size=(b, n))
  mask = (np.arange(n)[None] < np.array([[7], [4], [1]])).astype(np.float32)
  want = np.zeros((b, n))
  for row in range(b):
    adv = 0.0
    for t in reversed(range(n)):
      if not mask[row, t]:
        continue
      next_v = values[row, t + 1] if t + 1 < n and mask[row, t + 1] else 0.0
      adv = rewards[row, t] + gamma * next_v - values[row, t] + gamma * lam * adv
      want[row, t] = adv
  got = ppo.gae(jnp.asarray(rewards * mask, jnp.float32), jnp.asarray(values * mask, jnp.float32),
                jnp.asarray(mask), gamma, lam)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  white = ppo.whiten(got, jnp.asarray(mask))
  assert abs(float(white.sum() / mask.sum())) < 1e-6
  assert abs(float(((white**2) * mask).sum() / mask.sum()) - 1) < 1e-4


# --- reward model -----------------------------------------------------------------------------

def _pairs(path, count: int, seed: int) -> str:
  """Text-question pairs whose chosen answers are low ids and rejected answers high ids."""
  rng = np.random.default_rng(seed)
  empty = np.zeros(0, np.int32)

  def ids(lo, hi, n):
    return rng.integers(lo, hi, n).astype(np.int32)

  write_shard(str(path), (Example(PREFERENCE, [ids(16, 300, 6), ids(16, 100, 5), ids(200, 300, 5)],
                                  [empty] * 3, [empty] * 3, None, {}) for _ in range(count)))
  return str(path)


REWARD = ["task=reward", "vision.enabled=false", "model.max_seq_len=64", "train.seq_len=64",
          "train.peak_flops_per_device=1e12", "optimizer.learning_rate=2e-3",
          "optimizer.warmup_steps=0", "optimizer.schedule=constant", "train.log_every=50"]


@pytest.mark.slow
def test_reward_model_learns_a_preference_and_flags_rows_without_eos(tmp_path):
  train_pairs, held_out = _pairs(tmp_path / "train", 320, 0), _pairs(tmp_path / "eval", 64, 1)
  stages = (f"reward.stages=[{{shards: [{train_pairs}], eval_shards: [{held_out}], "
            "epochs: 3}]")
  cfg = load_config(TINY, [*REWARD, stages, f"train.run_dir={tmp_path / 'run'}",
                           "train.eval_every=1000", "train.eval_batches=8"])
  history = train(cfg, **QUIET)
  assert len(history) == 3 * 320 // 8
  with open(tmp_path / "run" / "eval_metrics.json") as f:
    held = __import__("json").load(f)
  assert held["accuracy"] > 0.9, held  # measured: 1.0 after 120 steps
  assert held["reward_std"] > 0 and held["pairs"] == 64

  # A side whose last token is not EOS is flagged and left out of the loss.
  run = setup(cfg, jax.devices()[:1], task=RewardTask)
  task = run.task
  state = run.init()
  batch = task.make_source(Split.EVAL).next_local()
  full = task.loss(state.params, state.frozen, batch, None)[1]
  last = batch["chosen_segment_ids"].sum(1) - 1
  batch["chosen_tokens"][0, last[0]] = 17
  cut = task.loss(state.params, state.frozen, batch, None)[1]
  assert float(cut["pairs"]) == float(full["pairs"]) - 1
  assert float(task.metrics(cut, task.updates()[0])["no_eos_fraction"]) == pytest.approx(1 / 8)


def test_reward_score_stats_are_read_for_ppo_or_refused_in_one_line(tmp_path):
  """PPO's reward normalisation reads the reward run's newest eval; what cannot be used is one
  ConfigError line naming the file and the fix."""
  path = tmp_path / EVAL_METRICS

  def refused(text, match):
    if text is not None:
      path.write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
      read_score_stats(str(tmp_path))
    assert "\n" not in str(e.value)

  refused(None, r"eval_metrics.json is missing: train the reward model with "
                r"train.eval_every > 0")
  refused("{not json", r"eval_metrics.json is not a reward model's eval \(JSON with "
                       r"reward_mean and reward_std\): JSONDecodeError")
  refused('{"step": 3, "reward_mean": 0.5}', r"eval_metrics.json is not a reward model's eval"
                                              r".*KeyError: 'reward_std'")
  refused('[0.5, 1.0]', r"eval_metrics.json is not a reward model's eval.*TypeError")
  for std in ("0.0", "-1.0", "NaN"):
    refused(f'{{"reward_mean": 0.5, "reward_std": {std}}}',
            r"eval_metrics.json: reward_std=\S+ must be positive .*every score would be clipped")
  path.write_text('{"step": 3, "accuracy": 1.0, "reward_mean": 0.5, "reward_std": 2.0}')
  assert read_score_stats(str(tmp_path)) == (0.5, 2.0)
  task = ppo.PPOTask(_toy(tmp_path / "ppo", f"ppo.reward_from={tmp_path}"), None)
  assert task.score_stats == (0.5, 2.0)


# --- PPO on a toy task with a known optimum --------------------------------------------------

TARGET = 7  # the reward counts how often the response emits this token


class PromptRows(BatchSource):
  """Left-padded prompts of 4 tokens, a pure function of (step, row)."""

  def __init__(self, cfg):
    self.cfg, self.step = cfg, 0

  def next_local(self):
    b, p = self.cfg.train.batch_size, self.cfg.ppo.prompt_len
    rows = [np.random.default_rng([self.step, r]).integers(16, 40, 4)
            for r in process_rows(b)]
    self.step += 1
    out = {"prompt_tokens": np.zeros((len(rows), p), np.int32),
           "prompt_segment_ids": np.zeros((len(rows), p), np.int32),
           "prompt_positions": np.zeros((len(rows), p), np.int32),
           "spoken": np.zeros(len(rows), np.int32)}
    for i, row in enumerate(rows):
      out["prompt_tokens"][i, -4:] = row
      out["prompt_segment_ids"][i, -4:] = 1
      out["prompt_positions"][i, -4:] = np.arange(4)
    return out

  def restore(self, step, state):
    self.step = step

  def restart(self, at_step):
    self.step = 0


class ToyPPO(ppo.PPOTask):
  """PPO whose reward is the number of TARGET tokens in the response (no reward model run),
  the policy and reference starting from the same random LM."""

  score_stats = (0.0, 1.0)

  def raw_scores(self, params, frozen, seq, rollout):
    return ((rollout.tokens == TARGET) & rollout.mask()).sum(1).astype(jnp.float32)

  def make_source(self, split):
    return PromptRows(self.cfg)

  def warm_start(self, params, frozen, load):
    return params, {**frozen, "reference": params["policy"]}


TOY = ["task=ppo", "vision.enabled=false", "model.vocab_size=64", "tokens.text_vocab_size=48",
       "tokens.linguistic_codes=0", "tokens.semantic_codes=0", "synthetic.audio_weight=0",
       "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=8",
       "train.peak_flops_per_device=1e12", "train.log_every=100",
       "ppo.prompts=[unused]", "ppo.policy_from=unused", "ppo.reward_from=unused",
       "ppo.prompt_len=8", "ppo.max_new_tokens=8", "ppo.critic_warmup_steps=2",
       "ppo.truncation_penalty=0", "ppo.minibatches=2", "ppo.epochs=2",
       "optimizer.learning_rate=3e-3", "optimizer.schedule=constant", "optimizer.warmup_steps=0",
       "ppo.critic_optimizer.learning_rate=1e-3", "ppo.critic_optimizer.schedule=constant"]


def _toy(tmp_path, *more):
  return load_config(TINY, [*TOY, f"train.run_dir={tmp_path}", *more])


def test_ppo_raises_a_known_reward_within_a_kl_bound(tmp_path):
  cfg = _toy(tmp_path, "train.steps=25", "checkpoint.every=100")
  history = train(cfg, task=ToyPPO, **QUIET)
  scores = [h["rollout/raw_score"] for h in history]
  # 8 new tokens from 64 ids: the random policy emits ~0.125 TARGETs per response; measured
  # 5.1-6.6 of the maximum 8 over the last 5 of 25 updates.
  assert np.mean(scores[:3]) < 0.5 and np.mean(scores[-5:]) > 3.0, scores
  # The KL to the (random) reference grows toward the one-hot optimum's log(64) = 4.16 nats
  # per token; the 0.05 KL penalty keeps it below 3.5 (measured max 3.16).
  assert max(h["rollout/kl"] for h in history) < 3.5
  for h in history[cfg.ppo.critic_warmup_steps:]:
    # the first minibatch of each rollout sees the policy that sampled it
    assert abs(h["policy/first/ratio"] - 1) < 1e-6, h["policy/first/ratio"]
    assert h["rollout/logprob_gap"] < 1e-5, h["rollout/logprob_gap"]
  for h in history[:cfg.ppo.critic_warmup_steps]:  # warm-up: the policy does not move
    assert h["policy/grad_norm"] == 0 and h["rollout/kl"] == pytest.approx(0, abs=1e-6)


@pytest.mark.slow
def test_ppo_resumes_with_the_same_metrics(tmp_path):
  full = train(_toy(tmp_path / "full", "train.steps=4", "checkpoint.every=2"), task=ToyPPO,
               **QUIET)
  train(_toy(tmp_path / "cut", "train.steps=2", "checkpoint.every=2"), task=ToyPPO, **QUIET)
  resumed = train(_toy(tmp_path / "cut", "train.steps=4", "checkpoint.every=2"), task=ToyPPO,
                  **QUIET)
  assert [h["step"] for h in resumed] == [3, 4]
  for a, b in zip(full[2:], resumed):
    for k in a:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_ppo_step_on_8_devices_equals_1(tmp_path):
  metrics = []
  for devices, mesh in ((jax.devices(), ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]),
                        (jax.devices()[:1], ["mesh.fsdp=1"])):
    cfg = _toy(tmp_path, "ppo.temperature=0", "ppo.critic_warmup_steps=0", *mesh)
    run = setup(cfg, devices, task=ToyPPO, donate=False)
    task = run.task
    with jax.set_mesh(run.mesh):
      state = run.init()
      params, frozen = task.warm_start(state.params, state.frozen, None)
      state = state.replace(frozen=jax.device_put(frozen, run.state_shardings.frozen))
      batch = jax.device_put(task.make_source(Split.TRAIN).next_local(), run.batch_shardings)
      metrics.append(jax.device_get(run.train(state, batch)[1]))
  for k, v in metrics[1].items():
    np.testing.assert_allclose(metrics[0][k], v, rtol=2e-4, atol=1e-5, err_msg=k)


def test_sft_takes_chat_records_from_shards_only():
  corpus = os.path.join(REPO, "configs", "corpus.yaml")
  with pytest.raises(ConfigError, match=r"task=sft trains on chat records.*other tasks \['text'"):
    setup(load_config(corpus, ["task=sft"]))
  sft = load_config(os.path.join(REPO, "configs", "sft", "corpus_aqta.yaml"), ["train.epochs=0",
                                                                             "train.steps=7"])
  assert setup(sft).total_steps == 7


@pytest.mark.parametrize("shards,needles", [
    ("tts/train-*.array_record", ("holds tts records, not aqta records",)),
    ("preference/aqta/train-*.array_record",
     ("holds preference records", "task=reward", "ppo.prompts")),
])
def test_sft_refuses_shards_of_another_task_in_one_line(tmp_path, capsys, shards, needles):
  """AQTA SFT on TTS shards or on preference shards is refused in one line naming the shard
  (it would train as TTS, or stop with a traceback naming no shard)."""
  from stepaudio_jax import cli

  corpus = os.path.join(REPO, "data_pipelines", "corpus")
  code = cli.main(["train", os.path.join(REPO, "configs", "sft", "corpus_aqta.yaml"),
                   f"train.run_dir={tmp_path}", f"data.shards.aqta=[{corpus}/{shards}]"])
  err = capsys.readouterr().err
  assert code == 2, err
  (line,) = [ln for ln in err.splitlines() if ln.startswith("stepaudio train: error:")]
  assert f"data.shards.aqta: shard {corpus}/{os.path.dirname(shards)}/train-" in line, line
  for needle in needles:
    assert needle in line, line


def test_tied_and_overlong_pairs_are_counted_and_warned_about_once(tmp_path, caplog):
  """A pair longer than train.seq_len loses its prompt's beginning and a pair whose chosen
  answer equals its rejected one would train at loss ln 2 (accuracy 0): ties are left out and
  counted, cut pairs are counted as drawn, each warned about once."""
  empty = [np.zeros(0, np.int32)] * 3
  ids = lambda *a: np.asarray(a, np.int32)  # noqa: E731
  short = [Example(PREFERENCE, [ids(20, 21), ids(30 + i), ids(40 + i)], empty, empty, None, {})
           for i in range(6)]
  tied = Example(PREFERENCE, [ids(20, 21), ids(50, 51), ids(50, 51)], empty, empty, None, {})
  long = Example(PREFERENCE, [np.arange(16, 76, dtype=np.int32), ids(60), ids(61)], empty, empty,
                 None, {})
  path = str(tmp_path / "pairs")
  write_shard(path, [*short, tied, long])
  cfg = load_config(TINY, [*REWARD, f"reward.stages=[{{shards: [{path}], epochs: 2}}]",
                           f"train.run_dir={tmp_path / 'run'}", "train.batch_size=7",
                           "model.max_seq_len=128", "train.seq_len=128"])
  with caplog.at_level("WARNING"):
    task = RewardTask(cfg, None)
    steps = task.total_steps()
    source = task.make_source(Split.TRAIN)
  warned = [r.getMessage() for r in caplog.records]
  assert len(warned) == 2, warned  # once each, though total_steps read the pairs first
  assert "1 of 8 pairs have the same chosen and rejected answer" in warned[0], warned
  assert f"shard {path} record 6" in warned[0], warned
  assert "1 of 7 pairs are longer than train.seq_len=128" in warned[1], warned
  assert steps == 2  # 2 epochs of the 7 pairs left, 7 a step
  for _ in range(steps):
    batch = source.next_local()
    assert not any((batch["chosen_tokens"][r] == batch["rejected_tokens"][r]).all()
                   for r in range(7))
  assert source.stats() | {"stage": 0} == {"stage": 0, "truncated_pairs": 2.0, "tied_pairs": 1.0}
  source.restore(1, None)  # the count of pairs drawn is a function of the step
  assert source.stats()["truncated_pairs"] == 1.0
  # A tie (equal scores) is never counted as correct.
  run = setup(cfg, jax.devices()[:1], task=RewardTask)
  state = run.init()
  batch = {k: v.copy() for k, v in batch.items()}
  for k in ("tokens", "segment_ids", "positions"):
    batch[f"rejected_{k}"] = batch[f"chosen_{k}"]
  sums = run.task.loss(state.params, state.frozen, batch, None)[1]
  assert float(sums["correct"]) == 0 and float(sums["pairs"]) > 0


def test_errors_name_the_post_training_key_that_was_set(tmp_path):
  """A ppo.reward_from run without checkpoints is reported as ppo.reward_from (not
  checkpoint.init_from), and a ppo.prompts (or reward.stages) glob that matches nothing as
  that key (not data.shards)."""
  from stepaudio_jax.data.records import ShardError
  from stepaudio_jax.training.checkpoint import CheckpointError, restore_deliverable

  run = tmp_path / "rm"
  run.mkdir()
  (run / "config.yaml").write_text("task: reward\n")
  for made in ((), ("checkpoints",)):
    if made:
      (run / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match=rf"^ppo.reward_from='{run}' (has no|holds no)"):
      restore_deliverable(str(run), "ppo.reward_from")
  with pytest.raises(CheckpointError, match=r"^ppo.reward_from='/missing' has no"):
    restore_deliverable("/missing", "ppo.reward_from")
  nothing = str(tmp_path / "none-*.array_record")
  task = ppo.PPOTask(load_config(TINY, ["task=ppo", "vision.enabled=false",
                                        f"ppo.prompts=[{nothing}]", "ppo.policy_from=unused",
                                        "ppo.reward_from=unused"]), None)
  with pytest.raises(ShardError, match=r"^ppo.prompts pattern .*none-\*.array_record' matches no"):
    task.make_source(Split.TRAIN)
  cfg = load_config(TINY, [*REWARD, f"reward.stages=[{{shards: [{nothing}]}}]",
                           f"train.run_dir={tmp_path / 'run'}"])
  with pytest.raises(ShardError, match=r"^reward.stages\[0\].shards pattern"):
    RewardTask(cfg, None).total_steps()
