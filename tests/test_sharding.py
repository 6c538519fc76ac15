"""Sharded numbers equal unsharded numbers; logical rules give the intended layouts."""

import functools

import jax
import numpy as np
import pytest

from stepaudio_jax.config import load_config
from stepaudio_jax.data.synthetic import SyntheticSource
from stepaudio_jax.parallel.mesh import LogicalSharding, make_mesh
from stepaudio_jax.training import train_step as ts
from stepaudio_jax.training.optimizer import make_optimizer


def _loss_and_grads(cfg, devices):
  mesh = make_mesh(cfg.mesh, devices)
  shard = LogicalSharding.create(mesh, cfg.mesh.rules)
  tx = make_optimizer(cfg.optimizer, cfg.train.steps)
  spec = ts.model_spec(cfg, shard)
  init = functools.partial(ts.init_state, cfg, tx, shard, 0)
  shardings = ts.state_shardings(spec, shard, jax.eval_shape(init))
  source = SyntheticSource(cfg.synthetic, cfg.tokens, cfg.vision, cfg.train.seq_len, 0)
  host = source.batch(0, 0, range(cfg.train.batch_size))
  batch_sh = ts.batch_shardings(shard, jax.eval_shape(lambda: host))
  batch = jax.device_put(host, batch_sh)

  def loss_grads(state, batch):
    grad_fn = jax.value_and_grad(ts._forward_sums, argnums=1, has_aux=True)
    (_, sums), grads = grad_fn(spec, state.params, state.frozen, batch)
    return sums["loss_sum"] / sums["tokens"], jax.tree.map(lambda g: g / sums["tokens"], grads)

  state = jax.jit(init, out_shardings=shardings)()
  loss, grads = jax.jit(loss_grads, in_shardings=(shardings, batch_sh))(state, batch)
  return jax.device_get(loss), jax.device_get(grads), state


def test_eight_devices_match_one():
  """fp32 loss and every gradient within 1e-5 relative (of the gradient's own scale)."""
  cfg = load_config("configs/tiny.yaml", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
  loss8, grads8, state8 = _loss_and_grads(cfg, jax.devices())
  cfg1 = load_config("configs/tiny.yaml", ["mesh.fsdp=1"])
  loss1, grads1, _ = _loss_and_grads(cfg1, jax.devices()[:1])
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)

  def close(path, a, b):
    scale = np.abs(b).max()
    assert np.abs(a - b).max() <= 1e-5 * scale + 1e-9, jax.tree_util.keystr(path)

  jax.tree_util.tree_map_with_path(close, grads8, grads1)
  wq = state8.params["lm"]["layers"]["wq"]
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert len(wq.sharding.device_set) == 8


def test_optimizer_moments_follow_their_parameters():
  cfg = load_config("configs/tiny.yaml", ["mesh.fsdp=4", "mesh.tensor=2"])
  _, _, state = _loss_and_grads(cfg, jax.devices())
  adam = state.opt_state[1]
  assert adam.mu["lm"]["embed"].sharding.spec == state.params["lm"]["embed"].sharding.spec
  assert adam.nu["lm"]["layers"]["w_down"].sharding.spec == jax.sharding.PartitionSpec(
      None, "tensor", "fsdp")


def test_mesh_that_does_not_divide_the_model_is_named():
  cfg = load_config("configs/tiny.yaml", ["mesh.fsdp=1", "mesh.tensor=8"])
  mesh = make_mesh(cfg.mesh)
  shard = LogicalSharding.create(mesh, cfg.mesh.rules)
  spec = ts.model_spec(cfg, shard)
  abstract = jax.eval_shape(functools.partial(ts.init_state, cfg,
                                              make_optimizer(cfg.optimizer, 1), shard, 0))
  with pytest.raises(ValueError, match=r"axes \('layers', 'embed', 'kv_heads'.*size 2.*tensor"):
    ts.state_shardings(spec, shard, abstract)


def test_unknown_logical_axis_rule():
  cfg = load_config("configs/tiny.yaml")
  shard = LogicalSharding.create(make_mesh(cfg.mesh), {"embed": ["fsdp"]})
  with pytest.raises(ValueError, match="logical axis 'mlp' has no rule"):
    shard.spec(("embed", "mlp"))
