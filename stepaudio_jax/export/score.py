"""`stepaudio score`: the JAX model's outputs for given token ids, the reference side of parity.

Runs the run's deliverable (or its model named with --model) alone (no images) in float32, from
the parameters of one checkpoint step, so an exported model can be checked against it on any
machine: a Step1 LM gives logits [T, V], a reward model (or critic) one score per position [T].
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Float

from stepaudio_jax.config.model import DType, Step1Config
from stepaudio_jax.export import step1_layout as layout
from stepaudio_jax.export.orbax_reader import ExportError, ModelReader
from stepaudio_jax.models.reward import RewardModel
from stepaudio_jax.models.step1 import Step1

MODULES = {"step1": Step1, "reward": RewardModel}


def load_model(checkpoint: str, model: str = "", kind: str = "") -> Step1 | RewardModel:
  """A run's Step1 LM or reward model with float32 compute (parameters read array by array):
  its deliverable, or its model named `model`; `kind` refuses a model of another kind."""
  reader = ModelReader(checkpoint, model, kind)
  if reader.deliverable.kind not in MODULES:
    raise ExportError(f"{reader.checkpoint.run_dir}: model {reader.name!r} is a "
                      f"{reader.deliverable.kind} model; score and generate read Step1 LMs and "
                      "reward models (choose one with --model)")
  cfg = dataclasses.replace(reader.config.model, compute_dtype=DType.FLOAT32,
                            param_dtype=DType.FLOAT32)
  build = MODULES[reader.deliverable.kind]
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0))))
  maps = layout.reward_tensor_maps(cfg) if build is RewardModel else layout.tensor_maps(cfg)
  params: dict = {}
  for inner in {m.ours for m in maps}:
    node = params
    for key in inner[:-1]:
      node = node.setdefault(key, {})
    node[inner[-1]] = jnp.asarray(reader.read(inner), jnp.float32)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def load_lm(checkpoint: str, model: str = "") -> Step1:
  """The Step1 LM a run delivers (or its model named `model`), float32."""
  return load_model(checkpoint, model, "step1")


def score(checkpoint: str, tokens: list[int], model: str = ""
          ) -> Float[np.ndarray, "T V"] | Float[np.ndarray, " T"]:
  if not tokens:
    raise ExportError("--tokens is empty; pass comma-separated token ids, e.g. 1,5,9")
  model = load_model(checkpoint, model)
  cfg: Step1Config = model.cfg if isinstance(model, Step1) else model.lm.cfg
  bad = [t for t in tokens if not 0 <= t < cfg.vocab_size]
  if bad:
    raise ExportError(f"--tokens {bad} are outside the vocabulary [0, {cfg.vocab_size}) of "
                      f"{checkpoint}; pass ids below {cfg.vocab_size}")
  ids = jnp.asarray(tokens, jnp.int32)[None, :]
  if isinstance(model, RewardModel):
    seg = jnp.ones_like(ids)
    pos = jnp.arange(ids.shape[1], dtype=jnp.int32)[None, :]
    return np.asarray(jax.jit(lambda m, x: m(x, seg, pos))(model, ids)[0], np.float32)
  logits = jax.jit(lambda m, x: m(x))(model, ids)
  return np.asarray(logits[0], np.float32)
