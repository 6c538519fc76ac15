"""Step-Omni: vocabulary expansion, image features at placeholders, frozen image encoder."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepaudio_jax.data.synthetic import SyntheticSource
from stepaudio_jax.models.omni import StepOmni, expand_vocabulary, place_image_features
from stepaudio_jax.models.step1 import Step1
from stepaudio_jax.tasks.registry import load_config
from stepaudio_jax.training.setup import setup

CFG = load_config("configs/tiny.yaml", ["mesh.fsdp=1"])


def test_expansion_keeps_text_rows_and_text_distribution():
  text_cfg = CFG.model.__class__(**{**CFG.model.__dict__, "vocab_size": 320})
  text_model = Step1(text_cfg, rngs=nnx.Rngs(3))
  params = {"lm": nnx.to_pure_dict(nnx.state(text_model, nnx.Param))}
  grown = expand_vocabulary(params, 512, jax.random.key(0))
  embed, head = grown["lm"]["embed"], grown["lm"]["lm_head"]
  old_embed = np.asarray(params["lm"]["embed"])
  assert embed.shape == (512, 64) and head.shape == (64, 512)
  np.testing.assert_array_equal(embed[:320], old_embed)
  np.testing.assert_array_equal(head[:, :320], params["lm"]["lm_head"])
  np.testing.assert_allclose(head[:, 320:], np.repeat(head[:, :320].mean(1, keepdims=True),
                                                      192, 1), rtol=1e-6)
  # new rows: Gaussian around the old rows' mean with their per-dimension spread
  np.testing.assert_allclose(embed[320:].mean(0), old_embed.mean(0), atol=4 * 0.02 / np.sqrt(192))
  np.testing.assert_allclose(embed[320:].std(0).mean(), old_embed.std(0).mean(), rtol=0.15)

  big = Step1(CFG.model, rngs=nnx.Rngs(0))
  graphdef, _ = nnx.split(big)
  grown_model = nnx.merge(graphdef, grown["lm"])
  toks = jax.random.randint(jax.random.key(1), (2, 12), 0, 320)
  old_logp = jax.nn.log_softmax(text_model(toks), -1)
  new_logp = jax.nn.log_softmax(grown_model(toks)[..., :320], -1)
  np.testing.assert_allclose(new_logp, old_logp, atol=1e-5)


def test_image_features_go_to_placeholders_in_order():
  x = jnp.zeros((2, 6, 3))
  is_image = jnp.asarray([[0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0]], bool)
  feats = jnp.arange(2 * 3 * 3, dtype=jnp.float32).reshape(2, 3, 3) + 1
  out = place_image_features(x, is_image, feats)
  np.testing.assert_array_equal(out[0, 1], feats[0, 0])
  np.testing.assert_array_equal(out[0, 2], feats[0, 1])
  np.testing.assert_array_equal(out[0, 4], feats[0, 2])
  np.testing.assert_array_equal(out[1, 0], feats[1, 0])
  assert float(jnp.abs(out[0, jnp.asarray([0, 3, 5])]).max()) == 0.0


def test_images_change_the_output():
  model = StepOmni(CFG.model, CFG.vision, CFG.tokens, rngs=nnx.Rngs(0))
  p = CFG.vision.tokens_per_image
  toks = jnp.concatenate([jnp.full((1, p), CFG.tokens.image_placeholder_id), jnp.ones((1, 4),
                                                                                    jnp.int32)], 1)
  seg, pos = jnp.ones_like(toks), jnp.arange(toks.shape[1])[None]
  a = model(toks, seg, pos, -jnp.ones((1, 1, 16, 16, 3)))
  b = model(toks, seg, pos, jnp.ones((1, 1, 16, 16, 3)))
  assert float(jnp.abs(a[:, p:] - b[:, p:]).max()) > 1e-4


def test_frozen_encoder_has_no_grad_no_state_and_stays_put():
  run = setup(dataclasses.replace(CFG, optimizer=dataclasses.replace(CFG.optimizer,
                                                                     warmup_steps=0)),
              jax.devices()[:1], donate=False)
  with jax.set_mesh(run.mesh):
    state = run.init()
  params, frozen = state.params["model"], state.frozen["model"]
  assert "vision_encoder" not in params and "vision_encoder" in frozen
  assert "projector" in params
  opt_paths = [jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_leaves_with_path(state.opt_state)]
  assert not any("vision_encoder" in p for p in opt_paths)
  source = SyntheticSource(CFG.synthetic, CFG.tokens, CFG.vision, CFG.train.seq_len, 0)
  batch = source.batch(0, 0, range(CFG.train.batch_size))
  assert int((batch["tokens"] == CFG.tokens.image_placeholder_id).sum()) > 0
  new, _ = run.train(state, jax.device_put(batch, run.batch_shardings))
  jax.tree.map(np.testing.assert_array_equal, new.frozen, state.frozen)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new.params["model"]["projector"],
                       params["projector"])
  assert max(jax.tree.leaves(moved)) > 0
