"""`stepaudio score`: the JAX model's logits for given token ids, the reference side of parity.

Runs the LM alone (no images) in float32, from the parameters of one checkpoint step, so an
exported model can be checked against it on any machine.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Float

from stepaudio_jax.config.model import DType, Step1Config
from stepaudio_jax.export import step1_layout as layout
from stepaudio_jax.export.orbax_reader import CheckpointReader, ExportError, load_run_config
from stepaudio_jax.models.step1 import Step1


def load_lm(checkpoint: str) -> Step1:
  """The Step1 LM of a checkpoint with float32 compute (parameters read array by array)."""
  reader = CheckpointReader(checkpoint)
  cfg = load_run_config(reader.run_dir).model
  cfg = dataclasses.replace(cfg, compute_dtype=DType.FLOAT32, param_dtype=DType.FLOAT32)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Step1(cfg, rngs=nnx.Rngs(0))))
  params: dict = {}
  for path in {m.path for m in layout.tensor_maps(cfg)}:
    node = params
    for key in path[len(layout.LM):-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jnp.asarray(reader.read(path), jnp.float32)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def score(checkpoint: str, tokens: list[int]) -> Float[np.ndarray, "T V"]:
  if not tokens:
    raise ExportError("--tokens is empty; pass comma-separated token ids, e.g. 1,5,9")
  model = load_lm(checkpoint)
  cfg: Step1Config = model.cfg
  bad = [t for t in tokens if not 0 <= t < cfg.vocab_size]
  if bad:
    raise ExportError(f"--tokens {bad} are outside the vocabulary [0, {cfg.vocab_size}) of "
                      f"{checkpoint}; pass ids below {cfg.vocab_size}")
  ids = jnp.asarray(tokens, jnp.int32)[None, :]
  logits = jax.jit(lambda m, x: m(x))(model, ids)
  return np.asarray(logits[0], np.float32)
