"""Sharded numbers equal unsharded numbers; logical rules give the intended layouts."""

import jax
import numpy as np
import pytest

from stepaudio_jax.data.synthetic import SyntheticSource
from stepaudio_jax.parallel.mesh import LogicalSharding, make_mesh
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training import step as step_lib
from stepaudio_jax.training.setup import setup


def _loss_and_grads(cfg, devices):
  run = setup(cfg, devices)
  source = SyntheticSource(cfg.synthetic, cfg.tokens, cfg.vision, cfg.train.seq_len, 0)
  batch = jax.device_put(source.batch(0, 0, range(cfg.train.batch_size)), run.batch_shardings)
  update = run.task.updates()[0]
  fields = run.task.batch_fields()

  def loss_grads(state, batch):
    grads, sums = step_lib.accumulated_gradients(update, state.params, state.frozen, batch,
                                                 jax.random.key(0), fields, 1, run.shard)
    return sums["loss_sum"] / sums["tokens"], jax.tree.map(lambda g: g / sums["tokens"], grads)

  with jax.set_mesh(run.mesh):
    state = run.init()
    loss, grads = jax.jit(loss_grads, in_shardings=(run.state_shardings, run.batch_shardings))(
        state, batch)
  return jax.device_get(loss), jax.device_get(grads), state


def test_eight_devices_match_one():
  """fp32 loss and every gradient within 1e-5 relative (of the gradient's own scale)."""
  cfg = load_config("configs/tiny.yaml", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
  loss8, grads8, state8 = _loss_and_grads(cfg, jax.devices())
  cfg1 = load_config("configs/tiny.yaml", ["mesh.fsdp=1"])
  loss1, grads1, _ = _loss_and_grads(cfg1, jax.devices()[:1])
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  _assert_gradients_close(grads8, grads1)
  wq = state8.params["model"]["lm"]["layers"]["wq"]
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert len(wq.sharding.device_set) == 8


def _assert_gradients_close(got, want):
  """Every gradient within 1e-5 of its own largest entry."""
  def close(path, a, b):
    scale = np.abs(b).max()
    assert np.abs(a - b).max() <= 1e-5 * scale + 1e-9, jax.tree_util.keystr(path)

  jax.tree_util.tree_map_with_path(close, got, want)


@pytest.mark.parametrize("attention", ["xla", "pallas"])
def test_sequence_axis_matches_one_device(attention):
  """mesh.sequence=2 splits each row's tokens outside attention and the heads inside it: the
  loss and gradients of one device, parameters sharded over fsdp x sequence, and the step moves
  q/k/v between the two layouts by all-to-all (none without the sequence axis)."""
  mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.sequence=2", f"model.attention={attention}"]
  cfg = load_config("configs/tiny.yaml", mesh)
  loss8, grads8, state8 = _loss_and_grads(cfg, jax.devices())
  cfg1 = load_config("configs/tiny.yaml", ["mesh.fsdp=1", f"model.attention={attention}"])
  loss1, grads1, _ = _loss_and_grads(cfg1, jax.devices()[:1])
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  _assert_gradients_close(grads8, grads1)
  wq = state8.params["model"]["lm"]["layers"]["wq"]
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, ("fsdp", "sequence"), None, None)
  if attention == "xla":
    def all_to_alls(cfg):
      run = setup(cfg)
      return run.train.lower(run.abstract_state, run.batch).compile().as_text().count(
          " all-to-all(")
    without = load_config("configs/tiny.yaml", ["mesh.data=2", "mesh.fsdp=4"])
    assert all_to_alls(cfg) >= 4 * cfg.model.num_layers > all_to_alls(without)


def test_optimizer_moments_follow_their_parameters():
  cfg = load_config("configs/tiny.yaml", ["mesh.fsdp=4", "mesh.tensor=2"])
  _, _, state = _loss_and_grads(cfg, jax.devices())
  adam = state.opt_state["model"][1]
  params = state.params["model"]
  assert adam.mu["lm"]["embed"].sharding.spec == params["lm"]["embed"].sharding.spec
  assert adam.nu["lm"]["layers"]["w_down"].sharding.spec == jax.sharding.PartitionSpec(
      None, "tensor", "fsdp")
  assert "vision_encoder" not in state.opt_state["model"][1].mu


def test_mesh_that_does_not_divide_the_model_is_named():
  cfg = load_config("configs/tiny.yaml", ["mesh.fsdp=8", "model.hidden_size=68"])
  with pytest.raises(ValueError, match=r"model/lm/embed of shape \(512, 68\) \(axes "
                                       r"\('vocab', 'embed'\)\).*size 68.*'fsdp',\) \(size 8\)"):
    setup(cfg)
  # A size set in the config is checked at load (test_config.py); -1 is known at setup.
  cfg = load_config("configs/tiny.yaml", ["mesh.fsdp=1", "mesh.tensor=-1"])
  with pytest.raises(ValueError, match=r"attention heads \(model.num_heads=4\).*\('tensor',\) "
                                       r"\(size 8\)"):
    setup(cfg)


def test_sequence_axis_must_divide_the_kv_heads():
  cfg = load_config("configs/tiny.yaml", ["mesh.fsdp=2", "mesh.sequence=-1"])  # 4 of 8
  with pytest.raises(ValueError, match=r"attention heads \(model.num_kv_heads=2\).*"
                                       r"\('sequence',\) \(size 4\)"):
    setup(cfg)


def test_sequence_axis_must_divide_the_sequence_length():
  cfg = load_config("configs/tiny.yaml", ["mesh.fsdp=4", "mesh.sequence=2", "train.seq_len=127"])
  with pytest.raises(ValueError, match=r"batch field 'tokens' of shape \(8, 127\) .*"
                                       r"train.seq_len.*size 127.*\('sequence',\) \(size 2\)"):
    setup(cfg)


def test_unknown_logical_axis_rule():
  cfg = load_config("configs/tiny.yaml")
  shard = LogicalSharding.create(make_mesh(cfg.mesh), {"embed": ["fsdp"]})
  with pytest.raises(ValueError, match="logical axis 'mlp' has no rule"):
    shard.spec(("embed", "mlp"))
