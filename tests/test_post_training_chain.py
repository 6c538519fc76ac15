"""The post-training chain on the committed corpus, as `make demo` runs it but shortened:
pretraining, TTS SFT, AQTA SFT, the two-stage reward model from the SFT model, and PPO from the
SFT policy and the reward model; every phase through `stepaudio train` and its corpus config.
Then what the chain delivers leaves it: the PPO policy and the reward model exported, loaded in
PyTorch, imported back, sampled from and trained on."""

import json
import os

import numpy as np
import pytest

from stepaudio_jax import cli
from stepaudio_jax.export.safetensors_io import SafetensorsDir
from stepaudio_jax.export.score import score
from tests.conftest import REPO

TOKENS = [1, 5, 9, 200, 7, 3, 4, 12, 64, 301, 2, 11]


def _tensors(directory: str) -> dict[str, bytes]:
  st = SafetensorsDir(directory)
  return {k: st.get(k).tobytes() for k in st.keys()}


def _train(*args) -> None:
  assert cli.main(["train", *args, "train.peak_flops_per_device=1e12"]) == 0


@pytest.mark.slow
def test_corpus_runs_through_sft_reward_model_and_ppo(tmp_path, capsys):
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
  _check_exports(tmp_path, runs, cfg, capsys)


def _check_exports(tmp_path, runs, cfg, capsys):
  torch = pytest.importorskip("torch")
  from stepaudio_jax.export.torch_step1 import Step1ForRewardModel

  hf = {n: str(tmp_path / f"hf-{n}") for n in ("sft", "ppo", "critic", "rm", "again")}
  assert cli.main(["export", runs["aqta"], hf["sft"], "--dtype", "float32"]) == 0
  assert cli.main(["export", runs["ppo"], hf["ppo"], "--dtype", "float32", "--check"]) == 0
  sft, ppo = _tensors(hf["sft"]), _tensors(hf["ppo"])
  assert sft.keys() == ppo.keys() and "lm_head.weight" in ppo
  assert [k for k in ppo if ppo[k] != sft[k]], "the PPO export is its SFT start, unchanged"

  # export -> import -> export: the same tensors, bit for bit.
  imported = str(tmp_path / "imported")
  assert cli.main(["import", hf["ppo"], imported, "--config", cfg("corpus.yaml")]) == 0
  assert cli.main(["export", imported, hf["again"], "--dtype", "float32"]) == 0
  assert _tensors(hf["again"]) == ppo
  # A config that puts the audio ids elsewhere is refused, not silently reshaped.
  capsys.readouterr()
  assert cli.main(["import", hf["ppo"], str(tmp_path / "bad"), "--config",
                   cfg("tiny.yaml")]) == 2
  assert "token_layout.text is [0, 1024] but the config puts it at [0, 320]" in \
      capsys.readouterr().err

  # The reward model: backbone + scalar head, strict in PyTorch, scoring like `stepaudio score`.
  assert cli.main(["export", runs["rm"], hf["rm"], "--dtype", "float32", "--check"]) == 0
  with open(os.path.join(hf["rm"], "config.json")) as f:
    assert json.load(f)["architectures"] == ["Step1ForRewardModel"]
  rm = Step1ForRewardModel.from_pretrained(hf["rm"])
  with torch.no_grad():
    theirs = rm(torch.tensor([TOKENS]))[0].numpy()
  np.testing.assert_allclose(theirs, score(runs["rm"], TOKENS), atol=1e-4)
  # Another model of the run by name: PPO's critic is a reward-model-shaped export.
  assert cli.main(["export", runs["ppo"], hf["critic"], "--model", "critic", "--dtype",
                   "float32"]) == 0
  assert SafetensorsDir(hf["critic"]).get("score.bias").shape == (1,)

  # generate, score and init_from take the PPO run's policy.
  assert cli.main(["generate", runs["ppo"], "--prompt-tokens", "1,5,9", "--temperature", "0",
                   "--max-new-tokens", "4", "--out", str(tmp_path / "gen.json")]) == 0
  with open(tmp_path / "gen.json") as f:
    assert json.load(f)["model"] == "policy"
  assert cli.main(["score", runs["ppo"], "--tokens", "1,5,9", "--out",
                   str(tmp_path / "s.npy")]) == 0
  _train(cfg("sft/corpus_aqta.yaml"), f"train.run_dir={tmp_path / 'after-ppo'}",
         "train.epochs=0", "train.steps=1", f"checkpoint.init_from={runs['ppo']}")
