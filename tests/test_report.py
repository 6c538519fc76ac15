"""`stepaudio report`: its numbers are the runs' own (checked against the TensorBoard events the
loop writes through another writer), labels name the keys that differ, seeds group."""

import glob
import json
import math
import os
import warnings

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stepaudio_jax.experiments.report import ReportError, load_run, write_report
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training.trainer import train

TYPES = ("text", "audio_linguistic", "audio_semantic", "image_caption")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  dirs = []
  for seed, lr in ((0, 3e-3), (1, 3e-3), (0, 1e-3)):
    run_dir = str(root / f"lr{lr}-seed{seed}")
    cfg = load_config("configs/tiny.yaml", [
        f"train.run_dir={run_dir}", "train.steps=4", "train.log_every=1", "train.eval_every=2",
        "train.eval_batches=1", f"train.seed={seed}", f"optimizer.learning_rate={lr}",
        "checkpoint.every=4"])
    train(cfg, print_fn=lambda *a, **k: None)
    dirs.append(run_dir)
  return dirs


def _events(run_dir: str) -> dict[str, dict[int, float]]:
  acc = EventAccumulator(os.path.dirname(glob.glob(f"{run_dir}/tensorboard/events*")[0]))
  acc.Reload()
  return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_report_numbers_are_the_runs_metrics(runs, tmp_path):
  content = write_report([load_run(r) for r in runs], str(tmp_path))
  assert content["differing_keys"] == ["optimizer.learning_rate", "train.seed"]
  rows = {r["label"]: r for r in content["runs"]}
  assert sorted(rows) == ["learning_rate=0.001 seed=0", "learning_rate=0.003 seed=0",
                          "learning_rate=0.003 seed=1"]
  for r in content["runs"]:
    events = _events(r["path"])
    s = r["summary"]
    assert s["step"] == 4
    np.testing.assert_allclose(s["train/loss"], events["train/loss"][4], rtol=1e-6)
    np.testing.assert_allclose(s["eval/loss"], events["eval/loss"][4], rtol=1e-6)
    for t in TYPES:  # every token type the tiny synthetic mixture has
      np.testing.assert_allclose(s[f"eval/ppl/{t}"], math.exp(events[f"eval/loss/{t}"][4]),
                                 rtol=1e-6)

  # Seeds of one learning rate form a group: mean and sample std over them.
  group = content["groups"]["learning_rate=0.003"]["eval/loss"]
  losses = [_events(r["path"])["eval/loss"][4] for r in content["runs"]
            if r["group"] == "learning_rate=0.003"]
  assert group["n"] == 2
  np.testing.assert_allclose(group["mean"], np.mean(losses), rtol=1e-6)
  np.testing.assert_allclose(group["std"], abs(losses[0] - losses[1]) / math.sqrt(2), rtol=1e-5)

  md = (tmp_path / "report.md").read_text()
  first = content["runs"][0]
  assert f"| {first['label']} | pretrain | 4 | yes | {first['summary']['train/loss']:.4g} |" in md
  assert content["plots"] == ["perplexity.png", "train_loss.png"]  # synthetic data: no shares
  for name in content["plots"]:
    data = (tmp_path / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert f"]({name})" in md


def test_a_resumed_runs_repeated_steps_count_once(runs, tmp_path):
  """After a resume the loop logs some steps again: the newest line of a step is the one."""
  src = runs[0]
  dst = tmp_path / "run"
  dst.mkdir()
  (dst / "config.yaml").write_text(open(os.path.join(src, "config.yaml")).read())
  lines = open(os.path.join(src, "metrics.jsonl")).read().splitlines()
  again = json.loads(lines[-1])
  again["loss"] = 123.0
  (dst / "metrics.jsonl").write_text("\n".join(lines + [json.dumps(again)]) + "\n{\"kind\": ")
  run = load_run(str(dst))
  assert [r["step"] for r in run.train] == [1, 2, 3, 4]
  assert run.train[-1]["loss"] == 123.0  # and the cut-off last line of a killed run is skipped


def test_not_a_run_directory_is_named(tmp_path):
  with pytest.raises(ReportError, match=f"{tmp_path} is not a run directory"):
    load_run(str(tmp_path))


def test_runs_without_metrics_are_named_and_not_plotted(tmp_path, capsys):
  """A run that logged no step (no metrics.jsonl, or an empty one) is named in report.md and on
  stdout; no empty plot is written for it and matplotlib warns of nothing."""
  from stepaudio_jax.cli import main

  def run_dir(name, task, metrics=None):
    d = tmp_path / name
    d.mkdir()
    (d / "config.yaml").write_text(f"task: {task}\ntrain:\n  seed: 0\n")
    if metrics is not None:
      (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return str(d)

  quiet = [run_dir("ppo_quiet", "ppo"), run_dir("reward_quiet", "reward", [])]
  out = tmp_path / "report"
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert main(["report", *quiet, "--out", str(out)]) == 0
  stdout = capsys.readouterr().out
  assert "plots: none" in stdout
  assert f"no metrics (the run logged no step) in: {quiet[0]}, {quiet[1]}" in stdout
  md = (out / "report.md").read_text()
  assert f"No metrics in task=ppo ({quiet[0]}), task=reward ({quiet[1]}): " in md
  assert sorted(os.listdir(out)) == ["report.json", "report.md"]

  # Beside a PPO run that logged (PPO's lines have no `loss`: no training-loss plot either).
  logged = run_dir("ppo_logged", "ppo", [{"kind": "train", "step": s, "rollout/score": 0.1 * s,
                                          "rollout/kl": 0.01 * s} for s in (1, 2, 3)])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    content = write_report([load_run(logged), load_run(quiet[0])], str(out))
  assert content["plots"] == ["ppo.png"]
  assert [r["has_metrics"] for r in content["runs"]] == [True, False]
