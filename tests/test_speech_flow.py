"""Flow matching: length regulation, the solver's schedule and guidance, and a short training run
on the committed paired speech."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stepaudio_jax.audio.codes import interleave_codes
from stepaudio_jax.config.speech import FlowConfig, MelConfig
from stepaudio_jax.data.speech_pairs import load_pairs
from stepaudio_jax.models.flow import FlowModel, cosine_times, regulate, solve
from stepaudio_jax.tasks.flow import FlowTask
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training.trainer import train
from tests.conftest import REPO

FLOW = os.path.join(REPO, "configs", "speech", "flow_tiny.yaml")
PAIRS = os.path.join(REPO, "data_pipelines", "corpus", "speech")


def test_regulate_equals_numpy_interp():
  rng = np.random.default_rng(0)
  h = rng.standard_normal((2, 10, 3)).astype(np.float32)
  n, f = np.array([10, 6]), np.array([23, 9])
  got = np.asarray(regulate(jnp.asarray(h), jnp.asarray(n), jnp.asarray(f), 25))
  for b in range(2):
    src = (np.arange(f[b]) + 0.5) * n[b] / f[b] - 0.5
    for d in range(3):
      np.testing.assert_allclose(got[b, :f[b], d], np.interp(src, np.arange(n[b]), h[b, :n[b], d]),
                                 atol=1e-5)
    assert not got[b, f[b]:].any()


def test_cosine_schedule_values():
  np.testing.assert_allclose(cosine_times(2), [0.0, 1 - np.cos(np.pi / 4), 1.0], atol=1e-6)
  assert cosine_times(10).shape == (11,)


class _ConstantVelocity:
  """Stands in for the estimator: velocity c with a condition, u without (mu all zero)."""

  def __init__(self, cfg, c, u):
    self.cfg, self.c, self.u = cfg, c, u

  def velocity(self, x, mask, mu, t, spk, cond):
    has = jnp.any(mu != 0, axis=(1, 2))[:, None, None]
    return jnp.where(has, self.c, self.u) * jnp.ones_like(x)


def test_euler_with_guidance_integrates_the_guided_velocity():
  """Steps sum to t = 1, so x(1) = x(0) + (1 + w) c - w u for constant fields."""
  cfg = FlowConfig(cfg_rate=0.7, steps=10)
  mu = jnp.ones((1, 4, 2))
  mask = jnp.ones((1, 4), bool)
  rng = jax.random.key(3)
  out = solve(_ConstantVelocity(cfg, 2.0, -1.0), mu, mask, jnp.ones((1, 2)), jnp.zeros_like(mu),
              rng)
  x0 = jax.random.normal(rng, mu.shape)
  np.testing.assert_allclose(out, x0 + 1.7 * 2.0 - 0.7 * -1.0, atol=1e-5)


def test_committed_pairs_hold_the_corpus_codes():
  utts = load_pairs(os.path.join(PAIRS, "eval.safetensors"), MelConfig(), 192)
  assert len(utts) == 3
  for u in utts:
    assert len(u.codes) % 5 == 0 and len(u.wave) == len(u.codes) // 5 * 2646
    assert 0 <= u.codes.min() and u.codes.max() < 5120
    assert np.abs(u.wave).max() > 0.1
  np.testing.assert_array_equal(interleave_codes(np.array([1, 2, 3]), np.array([4, 5, 6, 7])),
                                [1, 2, 1028, 1029, 1030])


def test_velocity_ignores_padded_frames():
  """A frame past a row's length changes nothing before it (attention is masked)."""
  cfg = FlowConfig(embed_dim=16, encoder_layers=1, encoder_heads=2, encoder_ffn=32, dim=16,
                   depth=1, heads=2, ffn=32, encoder_kernel=3)
  model = FlowModel(cfg, 8, 4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 6, 8))
  mask = jnp.arange(6)[None] < 4
  args = (mask, jnp.zeros_like(x), jnp.full((1,), 0.3), jnp.ones((1, 8)), jnp.zeros_like(x))
  velocity = jax.jit(lambda x: model.velocity(x, *args))
  a, b = velocity(x), velocity(x.at[:, 5].set(100.0))
  np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-5)


@pytest.mark.slow
def test_flow_loss_falls_on_the_committed_pairs(tmp_path):
  cfg = load_config(FLOW, [f"train.run_dir={tmp_path}", "train.steps=60", "train.log_every=60",
                           "train.eval_every=0", f"speech_data.path={PAIRS}",
                           "flow.optimizer.warmup_steps=5", "speech_data.max_codes=30",
                           "flow.encoder_layers=1", "flow.depth=2", "flow.dim=64"])
  history = train(cfg, print_fn=lambda *a, **k: None)
  first = np.mean([h["loss"] for h in history[:5]])
  last = np.mean([h["loss"] for h in history[-5:]])
  assert last < 0.85 * first, (first, last)


def test_bad_config_is_a_clear_error():
  with pytest.raises(ValueError, match="cfg_drop"):
    FlowConfig(cfg_drop=1.0)


class NanFlow(FlowTask):
  """The flow task with a loss that is NaN from the first step."""

  def loss(self, params, frozen, batch, rng):
    loss, sums = super().loss(params, frozen, batch, rng)
    return loss * jnp.nan, {**sums, "loss_sum": sums["loss_sum"] * jnp.nan}


@pytest.mark.slow
def test_a_diverged_flow_run_names_the_flow_optimizer(tmp_path):
  """The advice after a NaN names the keys that set the flow model's learning rate
  (FlowTask.optimizer_keys), not the `optimizer:` section a flow run does not read."""
  cfg = load_config(FLOW, [f"train.run_dir={tmp_path}", f"speech_data.path={PAIRS}",
                           "train.steps=2", "checkpoint.every=1", "train.eval_every=0"])
  with pytest.raises(FloatingPointError) as e:
    train(cfg, print_fn=lambda *a, **k: None, task=NanFlow)
  assert re.fullmatch(
      r"\S+ became nan at step 1; stopping without checkpointing it \(no checkpoint was written: "
      r"resume from it with a lower flow\.optimizer\.learning_rate or "
      r"flow\.optimizer\.grad_clip_norm, or look at the data of that step\)", str(e.value)), e.value
