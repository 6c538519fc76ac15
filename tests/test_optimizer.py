"""Parameter groups, schedules, weight-decay mask, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stepaudio_jax.config.training import OptimizerConfig
from stepaudio_jax.training.optimizer import learning_rate_schedule, make_optimizer

PARAMS = {"lm": {"embed": jnp.ones((8, 4)), "lm_head": jnp.ones((4, 8)),
                 "layers": {"wq": jnp.ones((2, 4, 4)), "input_norm": {"scale": jnp.ones((2, 4))}},
                 "final_norm": {"scale": jnp.ones((4,))}},
          "projector": {"w1": jnp.ones((3, 4))}}


def _first_update(cfg, grads):
  tx = make_optimizer(cfg, total_steps=10)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  return updates


def test_embedding_and_head_run_at_the_multiplier():
  """Adam's first step moves every element by lr (sign of the gradient) before scaling."""
  cfg = OptimizerConfig(learning_rate=1e-3, embed_lr_multiplier=5.0, weight_decay=0.0,
                        grad_clip_norm=0.0)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), PARAMS)
  up = _first_update(cfg, grads)
  np.testing.assert_allclose(up["lm"]["embed"], -5e-3, rtol=1e-4)
  np.testing.assert_allclose(up["lm"]["lm_head"], -5e-3, rtol=1e-4)
  np.testing.assert_allclose(up["lm"]["layers"]["wq"], -1e-3, rtol=1e-4)
  np.testing.assert_allclose(up["projector"]["w1"], -1e-3, rtol=1e-4)


def test_no_weight_decay_on_norms():
  cfg = OptimizerConfig(learning_rate=1e-2, weight_decay=0.5, embed_lr_multiplier=1.0,
                        grad_clip_norm=0.0)
  up = _first_update(cfg, jax.tree.map(jnp.zeros_like, PARAMS))
  np.testing.assert_allclose(up["lm"]["layers"]["wq"], -1e-2 * 0.5, rtol=1e-5)
  assert float(jnp.abs(up["lm"]["layers"]["input_norm"]["scale"]).max()) == 0.0
  assert float(jnp.abs(up["lm"]["final_norm"]["scale"]).max()) == 0.0


def test_global_norm_clipping_feeds_adam():
  """Adam's second moment sees gradients clipped to global norm 1 (nu = (1 - b2) g^2)."""
  cfg = OptimizerConfig(learning_rate=1.0, grad_clip_norm=1.0, weight_decay=0.0)
  tx = make_optimizer(cfg, 10)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 10.0), PARAMS)
  _, state = tx.update(grads, tx.init(PARAMS), PARAMS)
  nu = state[1].nu
  clipped = jax.tree.map(lambda v: jnp.sqrt(v / (1 - cfg.b2)), nu)
  assert abs(float(optax.tree.norm(clipped)) - 1.0) < 1e-4


def test_schedules():
  const = learning_rate_schedule(OptimizerConfig(learning_rate=2e-5, warmup_steps=10), 100)
  assert float(const(0)) == 0.0 and float(const(5)) == pytest.approx(1e-5)
  assert float(const(50)) == pytest.approx(2e-5)
  cos = learning_rate_schedule(OptimizerConfig(learning_rate=2e-5, end_learning_rate=5e-6,
                                               schedule="cosine"), 100)
  assert float(cos(0)) == pytest.approx(2e-5)
  assert float(cos(50)) == pytest.approx((2e-5 + 5e-6) / 2, rel=1e-3)
  assert float(cos(100)) == pytest.approx(5e-6) and float(cos(500)) == pytest.approx(5e-6)
  scaled = learning_rate_schedule(OptimizerConfig(learning_rate=2e-5, end_learning_rate=5e-6,
                                                  schedule="cosine"), 100, scale=5.0)
  assert float(scaled(100)) == pytest.approx(2.5e-5)


def test_bad_values():
  with pytest.raises(ValueError, match="end_learning_rate"):
    OptimizerConfig(learning_rate=1e-5, end_learning_rate=1e-4)
  with pytest.raises(ValueError, match="embed_lr_multiplier"):
    OptimizerConfig(embed_lr_multiplier=0)
