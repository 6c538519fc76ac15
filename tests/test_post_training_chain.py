"""The post-training chain on the committed corpus, as `make post-train` runs it but shortened:
pretraining, TTS SFT, AQTA SFT, the two-stage reward model from the SFT model, and PPO from the
SFT policy and the reward model; every phase through `stepaudio train` and its corpus config."""

import json
import os

import pytest

from stepaudio_jax import cli
from tests.conftest import REPO


def _train(*args) -> None:
  assert cli.main(["train", *args, "train.peak_flops_per_device=1e12"]) == 0


@pytest.mark.slow
def test_corpus_runs_through_sft_reward_model_and_ppo(tmp_path):
  runs = {name: str(tmp_path / name) for name in ("pre", "tts", "aqta", "rm", "ppo")}
  cfg = lambda name: os.path.join(REPO, "configs", name)  # noqa: E731
  _train(cfg("corpus.yaml"), f"train.run_dir={runs['pre']}", "train.steps=20",
         "train.eval_every=0")
  _train(cfg("sft/corpus_tts.yaml"), f"train.run_dir={runs['tts']}", "train.epochs=0.2",
         f"checkpoint.init_from={runs['pre']}")
  _train(cfg("sft/corpus_aqta.yaml"), f"train.run_dir={runs['aqta']}", "train.epochs=0.5",
         f"checkpoint.init_from={runs['pre']}")
  pairs = os.path.join(REPO, "data_pipelines", "corpus", "preference")
  stages = ",".join(f"{{shards: [{pairs}/{name}/train-*.array_record], eval_shards: "
                    f"[{pairs}/{name}/eval-*.array_record], epochs: 0.25}}"
                    for name in ("tqta", "aqta"))
  _train(cfg("reward/corpus.yaml"), f"train.run_dir={runs['rm']}",
         f"checkpoint.init_from={runs['aqta']}", f"reward.stages=[{stages}]",
         "train.eval_every=1000", "train.eval_batches=2")
  with open(os.path.join(runs["rm"], "eval_metrics.json")) as f:
    held_out = json.load(f)
  assert held_out["pairs"] == 16 and held_out["reward_std"] > 0
  _train(cfg("ppo/corpus.yaml"), f"train.run_dir={runs['ppo']}", "train.steps=3",
         f"ppo.policy_from={runs['aqta']}", f"ppo.reward_from={runs['rm']}",
         "ppo.critic_warmup_steps=1")
  with open(os.path.join(runs["ppo"], "eval_metrics.json")) as f:
    ppo = json.load(f)
  assert ppo["step"] == 3 and ppo["rollout/logprob_gap"] < 1e-4
