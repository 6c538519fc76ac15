"""Step-Omni on a KV cache: images placed during the prefill, then a decode step, against full
forwards of each row alone (right-padded: causality hides the padding)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepaudio_jax.inference.decode import left_pad
from stepaudio_jax.models.kv_cache import KVCache
from stepaudio_jax.models.omni import StepOmni
from stepaudio_jax.tasks.registry import load_config

CFG = load_config("configs/tiny.yaml")  # vision on: 16 patch features per 16 px image


def _prompts(rng):
  """Two prompts (24 and 30 tokens) with one image's 16 placeholders at different offsets."""
  ph = CFG.tokens.image_placeholder_id
  rows = []
  for length, start in ((24, 3), (30, 10)):
    row = rng.integers(1, CFG.tokens.text_vocab_size, length)
    row[start:start + CFG.vision.tokens_per_image] = ph
    rows.append(row.tolist())
  return rows


def test_omni_prefill_with_images_then_step_matches_full_forward():
  build = lambda: StepOmni(CFG.model, CFG.vision, CFG.tokens, rngs=nnx.Rngs(0))  # noqa: E731
  graphdef = nnx.graphdef(nnx.eval_shape(build))
  state = jax.jit(lambda: nnx.state(build()))()  # one (cacheable) compile for the initialisers
  rng = np.random.default_rng(0)
  rows = _prompts(rng)
  images = jnp.asarray(rng.normal(size=(2, 1, 16, 16, 3)), jnp.float32)
  lengths = np.asarray([len(r) for r in rows])

  @jax.jit
  def prefill_and_step(state, prompts, images):
    m = nnx.merge(graphdef, state)
    cache = KVCache.init(CFG.model, 2, 31)
    logits, cache = m.extend(prompts.tokens, prompts.segment_ids, prompts.positions, cache,
                             images)
    token = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    positions = cache.next_positions()
    step_logits, _ = m.extend(token[:, None], jnp.ones_like(positions), positions, cache)
    return logits[:, -1], token, positions[:, 0], step_logits[:, 0]

  prefill, token, positions, step = prefill_and_step(state, left_pad(rows), images)
  np.testing.assert_array_equal(positions, lengths)  # true positions continue each row

  @jax.jit
  def full(state, tokens, images):
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    return nnx.merge(graphdef, state)(tokens, jnp.ones((b, t), jnp.int32), pos, images)

  buf = np.zeros((2, 31), np.int32)
  for r, row in enumerate(rows):
    buf[r, :len(row)] = row
  buf[np.arange(2), lengths] = np.asarray(token)
  want = full(state, buf, images)
  for got, at in ((prefill, lengths - 1), (step, lengths)):
    ref = np.asarray(want)[np.arange(2), at]
    err = np.abs(np.asarray(got) - ref).max() / np.abs(ref).max()
    assert err < 1e-5, f"max error {err:.2e} of the largest logit"
  # the images matter: without them the prompt's last logits move
  no_images = np.asarray(full(state, buf, None))[np.arange(2), lengths - 1]
  assert np.abs(no_images - np.asarray(prefill)).max() > 1e-3
