"""The train step (accumulation, compile-once) and the loop (loss falls, progress, events)."""

import dataclasses
import glob
import os
import subprocess
import sys

import jax
import numpy as np
import optax
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stepaudio_jax.config import load_config
from stepaudio_jax.data.synthetic import SyntheticSource
from stepaudio_jax.parallel.mesh import LogicalSharding, make_mesh
from stepaudio_jax.training import train_step as ts
from stepaudio_jax.training.optimizer import make_optimizer
from stepaudio_jax.training.trainer import train


def _setup(overrides, tx=None):
  cfg = load_config("configs/tiny.yaml", ["mesh.fsdp=2", "mesh.data=2", "mesh.tensor=2"]
                    + overrides)
  shard = LogicalSharding.create(make_mesh(cfg.mesh), cfg.mesh.rules)
  tx = tx or make_optimizer(dataclasses.replace(cfg.optimizer, warmup_steps=0), cfg.train.steps)
  source = SyntheticSource(cfg.synthetic, cfg.tokens, cfg.vision, cfg.train.seq_len, 0)
  host = source.batch(0, 0, range(cfg.train.batch_size))
  steps = ts.build_steps(cfg, shard, tx, jax.eval_shape(lambda: host), lambda s: 0.0, seed=0,
                         donate=False)
  return steps.train, steps.init(), jax.device_put(host, steps.batch_shardings), source, \
      steps.batch_shardings


def test_grad_accumulation_equals_one_big_batch():
  """With SGD(lr=1) the parameter change is the gradient itself: compare it at fp32 precision."""
  step1, state1, batch, _, _ = _setup([], optax.sgd(1.0))
  step4, state4, _, _, _ = _setup(["train.grad_accum_steps=2"], optax.sgd(1.0))
  new1, m1 = step1(state1, batch)
  new4, m4 = step4(state4, batch)
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
  for name in ("text", "audio_linguistic", "audio_semantic", "image_caption"):
    np.testing.assert_allclose(m1[f"loss/{name}"], m4[f"loss/{name}"], rtol=1e-5)
  d1 = jax.tree.map(lambda a, b: a - b, new1.params, state1.params)
  d4 = jax.tree.map(lambda a, b: a - b, new4.params, state4.params)
  # 1e-5 of the gradient scale, plus the rounding of `param - grad` (~8 ulp of the parameter)
  jax.tree.map(lambda a, b, p: np.testing.assert_allclose(
      a, b, atol=1e-5 * np.abs(b).max() + 1e-6 * np.abs(p).max()), d1, d4, state1.params)


def test_step_compiles_once_and_reports_every_token_type():
  step, state, batch, source, batch_sh = _setup([])
  for i in range(3):
    state, metrics = step(state, jax.device_put(source.batch(0, i, range(8)), batch_sh))
  assert step._cache_size() == 1
  assert int(state.step) == 3
  for name in ("text", "audio_linguistic", "audio_semantic", "image_caption"):
    assert float(metrics[f"tokens/{name}"]) > 0, name
    assert np.isfinite(float(metrics[f"loss/{name}"]))
  total = sum(float(metrics[f"tokens/{n}"]) for n in
              ("text", "audio_linguistic", "audio_semantic", "image_caption"))
  assert total == float(metrics["tokens"])


def test_training_loop_learns_and_logs(tmp_path):
  lines = []
  cfg = load_config("configs/tiny.yaml", [f"train.run_dir={tmp_path}", "train.steps=60",
                                          "train.log_every=20", "train.eval_every=30",
                                          "checkpoint.every=30"])
  history = train(cfg, print_fn=lambda *a, **k: lines.append(" ".join(map(str, a))))
  losses = [h["loss"] for h in history]
  assert len(losses) == 60
  assert np.mean(losses[-10:]) < np.mean(losses[:5]) - 1.0, losses
  progress = [l for l in lines if l.startswith("step ")]
  assert len(progress) == 3
  for field in ("loss", "tok/s", "MFU", "ETA"):
    assert field in progress[-1]
  assert sum(l.startswith("eval step") for l in lines) == 2
  events = glob.glob(os.path.join(tmp_path, "tensorboard", "events.*"))
  assert events
  acc = EventAccumulator(os.path.dirname(events[0]))
  acc.Reload()
  tags = acc.Tags()["scalars"]
  for tag in ("train/loss", "train/loss/audio_semantic", "train/mfu", "train/tokens_per_second",
              "train/grad_norm", "eval/loss"):
    assert tag in tags, tag
  assert [e.step for e in acc.Scalars("train/loss")] == [20, 40, 60]


def test_cli_writes_resolved_config_and_reports_errors(tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  run = subprocess.run([sys.executable, "-m", "stepaudio_jax.cli", "train", "configs/tiny.yaml",
                        f"train.run_dir={tmp_path}", "train.steps=2", "train.log_every=1"],
                       capture_output=True, text=True, env=env)
  assert run.returncode == 0, run.stderr
  assert "step 2/2 loss" in run.stdout
  saved = load_config(os.path.join(tmp_path, "config.yaml"))
  assert saved.train.steps == 2 and saved.model.hidden_size == 64
  bad = subprocess.run([sys.executable, "-m", "stepaudio_jax.cli", "train", "configs/tiny.yaml",
                        "mesh.data=3"], capture_output=True, text=True, env=env)
  assert bad.returncode == 2
  assert "mesh" in bad.stderr and "cannot fill 2 devices" in bad.stderr
