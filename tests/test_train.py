"""The train step (accumulation, compile-once) and the loop (loss falls, progress, events)."""

import glob
import os
import subprocess
import sys

import jax
import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stepaudio_jax.data.synthetic import SyntheticSource
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training import step as step_lib
from stepaudio_jax.training.setup import setup
from stepaudio_jax.training.trainer import train


def _setup(overrides):
  cfg = load_config("configs/tiny.yaml", ["mesh.fsdp=2", "mesh.data=2", "mesh.tensor=2",
                                          "optimizer.warmup_steps=0"] + overrides)
  run = setup(cfg, donate=False)
  source = SyntheticSource(cfg.synthetic, cfg.tokens, cfg.vision, cfg.train.seq_len, 0)
  host = source.batch(0, 0, range(cfg.train.batch_size))
  with jax.set_mesh(run.mesh):
    state = run.init()
  return run, state, jax.device_put(host, run.batch_shardings), source


def test_grad_accumulation_equals_one_big_batch():
  """Summed microbatch gradients equal the whole batch's, at fp32 precision; so do the step's
  loss, per-type losses and gradient norm."""
  run1, state, batch, _ = _setup([])
  run2, _, _, _ = _setup(["train.grad_accum_steps=2"])
  task = run1.task
  update = task.updates()[0]
  fields = task.batch_fields()
  key = jax.random.key(0)

  def grads(n):
    g, sums = jax.jit(lambda p, f, b: step_lib.accumulated_gradients(
        update, p, f, b, key, fields, n, run1.shard))(state.params, state.frozen, batch)
    return jax.device_get(g), jax.device_get(sums)

  g1, s1 = grads(1)
  g2, s2 = grads(2)
  assert s1["tokens"] == s2["tokens"] > 0
  np.testing.assert_allclose(s1["loss_sum"], s2["loss_sum"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max()), g2, g1)
  _, m1 = run1.train(state, batch)
  _, m2 = run2.train(state, batch)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
  for name in ("text", "audio_linguistic", "audio_semantic", "image_caption"):
    np.testing.assert_allclose(m1[f"loss/{name}"], m2[f"loss/{name}"], rtol=1e-5)


def test_step_compiles_once_and_reports_every_token_type():
  run, state, _, source = _setup([])
  for i in range(3):
    state, metrics = run.train(state, jax.device_put(source.batch(0, i, range(8)),
                                                     run.batch_shardings))
  assert run.train._cache_size() == 1
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


def test_z_loss_adds_its_weighted_gradient_and_is_reported():
  """pretrain.z_loss_weight=w: the reported z_loss is mean(logsumexp(logits)^2) over the loss
  tokens (computed here from the model's logits), and the gradient gains w x its gradient."""
  w = 0.01
  run0, state, batch, _ = _setup([])
  run_w, _, _, _ = _setup([f"pretrain.z_loss_weight={w}"])
  update0, update_w = run0.task.updates()[0], run_w.task.updates()[0]
  fields, key = run0.task.batch_fields(), jax.random.key(0)

  def grads(update, p):
    return step_lib.accumulated_gradients(update, p, state.frozen, batch, key, fields, 1,
                                          run0.shard)

  def z_sum(p):
    model = run0.task.merge("model", p, state.frozen)
    logits = model(batch["tokens"], batch["segment_ids"], batch["positions"], batch["images"])
    lse = jax.nn.logsumexp(logits.astype(np.float32), axis=-1)
    return (lse * lse * batch["loss_mask"]).sum()

  g0, s0 = jax.jit(lambda p: grads(update0, p))(state.params)
  gw, sw = jax.jit(lambda p: grads(update_w, p))(state.params)
  gz = jax.jit(jax.grad(z_sum))(state.params)
  np.testing.assert_allclose(sw["z_loss_sum"], z_sum(state.params), rtol=1e-5)
  assert "z_loss_sum" not in s0 and float(sw["loss_sum"]) == float(s0["loss_sum"])
  # fp32 at the gradients' own scale (the three are computed separately)
  jax.tree.map(lambda a, b, z: np.testing.assert_allclose(
      a, b + w * z, atol=1e-5 * np.abs(a).max()), gw, g0, gz)
  _, metrics = run_w.train(state, batch)
  np.testing.assert_allclose(metrics["z_loss"], z_sum(state.params) / s0["tokens"], rtol=1e-5)
