"""The train state of any task, how it starts, and how it is laid out on the mesh.

  step      - optimizer steps done (int32)
  params    - per model, its trainable parameters (pure dicts)
  frozen    - per model, everything else: no gradient, no optimizer state
  opt_state - per trained model, its optimizer state
  rng       - key data; each step's key is fold_in(rng, step), so it needs no update and a
              resumed run draws what an uninterrupted one would
Parameter shardings come from the variables' logical axes through mesh.rules. Optimizer state
shardings come from the parameters' through optax's parameter-tree mapping (tree_map_params):
a state leaf that mirrors a parameter takes its sharding; any other leaf must be a scalar (a
step count) and is replicated, never a silently replicated array.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from stepaudio_jax.parallel.mesh import LogicalSharding, logical_axes
from stepaudio_jax.tasks.base import Task, split_model
from stepaudio_jax.training.optimizer import Optimizer


@struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  frozen: dict
  opt_state: dict
  rng: jax.Array


def init_state(task: Task, optimizers: dict[str, Optimizer], seed: int) -> TrainState:
  """Fresh state as a pure function of the seed (jitted with out_shardings by the setup).

  The task's models are built in order from one nnx.Rngs(seed), so each draws its own keys."""
  rngs = nnx.Rngs(seed)
  params, frozen = {}, {}
  for name, model in task.models().items():
    _, trained, rest = split_model(model.build(rngs), model.trainable)
    params[name], frozen[name] = nnx.to_pure_dict(trained), nnx.to_pure_dict(rest)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      frozen=frozen,
      opt_state={name: opt.tx.init(params[name]) for name, opt in optimizers.items()},
      rng=jax.random.key_data(jax.random.key(seed + 1)),
  )


def model_axes(task: Task) -> tuple[dict, dict]:
  """(params, frozen) trees of logical axes, per model."""
  params, frozen = {}, {}
  for name in task.models():
    _, trained, rest = task.abstract(name)
    params[name], frozen[name] = logical_axes(trained), logical_axes(rest)
  return params, frozen


def opt_state_shardings(name: str, opt: Optimizer, abstract: Any, param_shapes: dict,
                         param_shardings: dict, replicated: NamedSharding) -> Any:
  def mirror(leaf, shape, sharding):
    if leaf.shape != shape.shape:
      raise ValueError(
          f"optimizer state of model {name!r}: a leaf of shape {leaf.shape} mirrors a "
          f"parameter of shape {shape.shape}; the optimizer must keep parameter-shaped state")
    return sharding

  def other(leaf):
    if leaf.shape:
      raise ValueError(
          f"optimizer state of model {name!r}: a leaf of shape {leaf.shape} ({leaf.dtype}) "
          "matches no parameter, so it has no sharding to follow (replicating it could not fit "
          "at scale); keep parameter-shaped state in the optimizer's parameter trees")
    return replicated

  return optax.tree_map_params(opt.tx, mirror, abstract, param_shapes, param_shardings,
                               transform_non_params=other)


def state_shardings(task: Task, optimizers: dict[str, Optimizer], shard: LogicalSharding,
                    abstract: TrainState) -> TrainState:
  """Shardings of every state leaf; errors name a leaf the mesh does not divide."""
  replicated = NamedSharding(shard.mesh, PartitionSpec())
  params_axes, frozen_axes = model_axes(task)
  params = shard.tree(params_axes, abstract.params)
  return TrainState(
      step=replicated,
      params=params,
      frozen=shard.tree(frozen_axes, abstract.frozen, what="frozen parameter"),
      opt_state={name: opt_state_shardings(name, opt, abstract.opt_state[name],
                                            abstract.params[name], params[name], replicated)
                 for name, opt in optimizers.items()},
      rng=replicated,
  )
