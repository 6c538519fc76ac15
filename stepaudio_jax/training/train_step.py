"""Train state, its shardings, and the pure train and eval steps.

The model's graph (GraphDef) is static; the state is a pytree of plain dicts:
  params  - trainable parameters (LM, projector), fp32
  frozen  - the image encoder; no gradient, no optimizer state
  opt_state, step, rng
Shardings come from each parameter's logical axes through the config's rules; optimizer moments
take the sharding of the parameter they mirror.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from stepaudio_jax.models.omni import FROZEN, TRAINABLE, StepOmni
from stepaudio_jax.parallel.mesh import LogicalSharding
from stepaudio_jax.training import loss as loss_lib

BATCH_AXES = ("act_batch", "act_length")


@struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  frozen: dict
  opt_state: Any
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What the steps need to rebuild the model: its graph and its parameters' logical axes."""

  graphdef: Any
  param_axes: dict
  frozen_axes: dict


def build_model(cfg, shard: LogicalSharding | None, seed: int) -> StepOmni:
  return StepOmni(cfg.model, cfg.vision, cfg.tokens, shard, rngs=nnx.Rngs(seed))


def _axes_tree(state: nnx.State) -> dict:
  """Pure dict of logical axes; stacked layer params get a leading 'layers' axis."""
  flat = {}
  for path, var in nnx.to_flat_state(state):
    axes = tuple(var.get_metadata().get("axes") or ())
    ndim = len(var.shape)
    if ndim == len(axes) + 1:
      axes = ("layers",) + axes
    if ndim != len(axes):
      raise ValueError(f"parameter {'/'.join(map(str, path))} has no logical axes for all dims")
    flat[path] = axes
  return nnx.traversals.unflatten_mapping(flat)


def model_spec(cfg, shard: LogicalSharding | None) -> ModelSpec:
  abstract = nnx.eval_shape(lambda: build_model(cfg, shard, 0))
  graphdef, frozen, params = nnx.split(abstract, FROZEN, TRAINABLE)
  return ModelSpec(graphdef, _axes_tree(params), _axes_tree(frozen))


def merge_model(spec: ModelSpec, params: dict, frozen: dict) -> StepOmni:
  return nnx.merge(spec.graphdef, params, frozen)


def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


def param_shardings(shard: LogicalSharding, axes: dict, shapes: dict | None = None) -> dict:
  if shapes is not None:
    jax.tree.map(
        lambda a, s: shard.check_divides(f"parameter of shape {s.shape} (axes {a})", s.shape, a),
        axes, shapes, is_leaf=_is_axes,
    )
  return jax.tree.map(shard.named, axes, is_leaf=_is_axes)


def _key_names(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def mirror_shardings(tree, params_shapes: dict, params_shardings: dict, replicated) -> Any:
  """Leaves whose path ends with a parameter's path and share its shape take its sharding."""
  by_path = {}
  for (path, s), sh in zip(jax.tree_util.tree_leaves_with_path(params_shapes),
                           jax.tree.leaves(params_shardings)):
    by_path[_key_names(path)] = (s.shape, sh)

  def pick(path, leaf):
    names = _key_names(path)
    for start in range(len(names)):
      hit = by_path.get(names[start:])
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)


def state_shardings(spec: ModelSpec, shard: LogicalSharding, abstract_state: TrainState):
  replicated = NamedSharding(shard.mesh, PartitionSpec())
  p_sh = param_shardings(shard, spec.param_axes, abstract_state.params)
  f_sh = param_shardings(shard, spec.frozen_axes, abstract_state.frozen)
  return TrainState(
      step=replicated,
      params=p_sh,
      frozen=f_sh,
      opt_state=mirror_shardings(abstract_state.opt_state, abstract_state.params, p_sh, replicated),
      rng=replicated,
  )


def init_state(cfg, tx: optax.GradientTransformation, shard: LogicalSharding | None, seed: int):
  """Fresh state, built as a function of the seed so it can run under jit with out_shardings."""
  model = build_model(cfg, shard, seed)
  _, frozen, params = nnx.split(model, FROZEN, TRAINABLE)
  params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      frozen=frozen,
      opt_state=tx.init(params),
      rng=jax.random.key_data(jax.random.key(seed + 1)),
  )


def batch_shardings(shard: LogicalSharding, batch_shapes: dict) -> dict:
  def one(x):
    axes = BATCH_AXES[: len(x.shape)] + (None,) * (len(x.shape) - 2)
    return shard.named(axes)

  return jax.tree.map(one, batch_shapes)


def _forward_sums(spec: ModelSpec, params, frozen, batch) -> tuple[jax.Array, dict]:
  model = merge_model(spec, params, frozen)
  logits = model(batch["tokens"], batch["segment_ids"], batch["positions"], batch.get("images"))
  sums = loss_lib.loss_sums(logits, batch["targets"], batch["loss_mask"], batch["target_types"])
  return sums["loss_sum"], sums


def _microbatches(batch: dict, n: int, shard: LogicalSharding | None) -> dict:
  """[B, ...] -> [n, B/n, ...]; microbatch j takes rows j, j+n, ... so every shard contributes."""
  def split(x):
    y = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    if shard is not None:
      y = shard.constrain(y, (None,) + BATCH_AXES[: x.ndim] + (None,) * (x.ndim - 2))
    return y

  return jax.tree.map(split, batch)


def train_step(
    state: TrainState,
    batch: dict,
    *,
    spec: ModelSpec,
    tx: optax.GradientTransformation,
    lr_schedule: Callable,
    grad_accum_steps: int,
    shard: LogicalSharding | None,
) -> tuple[TrainState, dict]:
  """One optimizer step over the global batch, accumulating grads over microbatches."""
  grad_fn = jax.grad(_forward_sums, argnums=1, has_aux=True)

  def micro(carry, mb):
    grads, sums = carry
    g, s = grad_fn(spec, state.params, state.frozen, mb)
    return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s)), None

  if grad_accum_steps == 1:
    grads, sums = grad_fn(spec, state.params, state.frozen, batch)
  else:
    mbs = _microbatches(batch, grad_accum_steps, shard)
    zero_g = jax.tree.map(jnp.zeros_like, state.params)
    zero_s = jax.eval_shape(lambda: _forward_sums(spec, state.params, state.frozen,
                                                  jax.tree.map(lambda x: x[0], mbs))[1])
    zero_s = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_s)
    (grads, sums), _ = jax.lax.scan(micro, (zero_g, zero_s), mbs)
  grads = jax.tree.map(lambda g: g / jnp.maximum(sums["tokens"], 1.0), grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = loss_lib.finalize(sums)
  metrics.update(
      grad_norm=optax.tree.norm(grads),
      update_norm=optax.tree.norm(updates),
      param_norm=optax.tree.norm(params),
      learning_rate=jnp.asarray(lr_schedule(state.step), jnp.float32),
  )
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, spec: ModelSpec) -> dict:
  return _forward_sums(spec, state.params, state.frozen, batch)[1]


@dataclasses.dataclass(frozen=True)
class Steps:
  """Everything a loop needs, jitted with explicit shardings: built once per run."""

  spec: ModelSpec
  abstract_state: TrainState
  state_shardings: TrainState
  batch_shardings: dict
  init: Callable  # () -> TrainState, sharded
  train: Callable  # (state, batch) -> (state, metrics); state donated
  eval: Callable  # (state, batch) -> loss sums


def build_steps(cfg, shard: LogicalSharding, tx: optax.GradientTransformation, batch_shapes: dict,
                lr_schedule: Callable, seed: int, donate: bool = True) -> Steps:
  spec = model_spec(cfg, shard)
  init = functools.partial(init_state, cfg, tx, shard, seed)
  abstract = jax.eval_shape(init)
  shardings = state_shardings(spec, shard, abstract)
  for name, s in batch_shapes.items():
    shard.check_divides(f"batch field {name!r} (train.batch_size={s.shape[0]})", s.shape,
                        BATCH_AXES[: len(s.shape)])
  batch_sh = batch_shardings(shard, batch_shapes)
  step = jax.jit(
      functools.partial(train_step, spec=spec, tx=tx, lr_schedule=lr_schedule,
                        grad_accum_steps=cfg.train.grad_accum_steps, shard=shard),
      in_shardings=(shardings, batch_sh),
      out_shardings=(shardings, None),
      donate_argnums=0 if donate else (),
  )
  return Steps(
      spec=spec,
      abstract_state=abstract,
      state_shardings=shardings,
      batch_shardings=batch_sh,
      init=jax.jit(init, out_shardings=shardings),
      train=step,
      eval=jax.jit(functools.partial(eval_step, spec=spec), in_shardings=(shardings, batch_sh)),
  )
