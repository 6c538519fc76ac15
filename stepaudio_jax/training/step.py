"""The generic pure steps: (state, batch) -> (state, metrics) for any task, and eval sums.

A step runs the task's updates in order. Each takes gradients of its loss with respect to its
groups' trainable parameters (the other groups and all frozen parameters are constants),
summed over `grad_accum_steps` microbatches, divides them by the batch's `denominator` sum, and
applies each group's optimizer; the next update sees the new parameters. Every update and
microbatch gets its own key, fold_in(fold_in(fold_in(rng, step), update), microbatch), so
stochastic losses (noise, dropout, CFG drop) draw fresh randomness every step, reproducibly.

Metrics: the task's (from the summed loss terms), plus grad_norm, update_norm and param_norm
over the update's groups, prefixed by the update's name when there are several updates; and
each trained model's learning rate (`learning_rate`, or `learning_rate/<model>` for several).
"""

import jax
import jax.numpy as jnp
import optax

from stepaudio_jax.parallel.mesh import LogicalSharding
from stepaudio_jax.tasks.base import BatchField, Task, Update
from stepaudio_jax.training.optimizer import Optimizer
from stepaudio_jax.training.state import TrainState

EVAL_STREAM = 0x7FFFFFFF  # eval keys do not depend on the step: evals stay comparable


def step_key(state: TrainState) -> jax.Array:
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def _microbatches(batch: dict, fields: dict[str, BatchField], n: int,
                  shard: LogicalSharding | None) -> dict:
  """[B, ...] -> [n, B/n, ...]; microbatch j takes rows j, j+n, ... so every shard contributes."""
  def split(name, x):
    y = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return y if shard is None else shard.constrain(y, (None,) + fields[name].axes)

  return {k: split(k, v) for k, v in batch.items()}


def accumulated_gradients(update: Update, params: dict, frozen: dict, batch: dict,
                          key: jax.Array, fields: dict[str, BatchField], grad_accum_steps: int,
                          shard: LogicalSharding | None) -> tuple[dict, dict]:
  """Summed gradients over the update's groups and summed loss terms over the batch."""
  def loss_of(trained, mb, k):
    return update.loss({**params, **trained}, frozen, mb, k)

  grad_fn = jax.grad(loss_of, has_aux=True)
  trained = {g: params[g] for g in update.groups}
  if grad_accum_steps == 1:
    return grad_fn(trained, batch, key)
  mbs = _microbatches(batch, fields, grad_accum_steps, shard)

  def micro(carry, xs):
    grads, sums = carry
    mb, j = xs
    g, s = grad_fn(trained, mb, jax.random.fold_in(key, j))
    return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s)), None

  first = jax.tree.map(lambda x: x[0], mbs)
  zero_s = jax.eval_shape(lambda: loss_of(trained, first, key)[1])
  zero_s = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_s)
  zero_g = jax.tree.map(jnp.zeros_like, trained)
  (grads, sums), _ = jax.lax.scan(micro, (zero_g, zero_s),
                                  (mbs, jnp.arange(grad_accum_steps)))
  return grads, sums


def train_step(state: TrainState, batch: dict, *, task: Task, optimizers: dict[str, Optimizer],
               grad_accum_steps: int, shard: LogicalSharding | None) -> tuple[TrainState, dict]:
  updates = task.updates()
  fields = task.batch_fields()
  key = step_key(state)
  params, opt_state, metrics = dict(state.params), dict(state.opt_state), {}
  for u, update in enumerate(updates):
    grads, sums = accumulated_gradients(update, params, state.frozen, batch,
                                        jax.random.fold_in(key, u), fields, grad_accum_steps,
                                        shard)
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums[update.denominator], 1.0), grads)
    steps = {}
    for g in update.groups:
      steps[g], opt_state[g] = optimizers[g].tx.update(grads[g], opt_state[g], params[g])
      params[g] = optax.apply_updates(params[g], steps[g])
    out = task.metrics(sums, update.denominator)
    out.update(
        grad_norm=optax.tree.norm(grads),
        update_norm=optax.tree.norm(steps),
        param_norm=optax.tree.norm({g: params[g] for g in update.groups}),
    )
    prefix = f"{update.name or '+'.join(update.groups)}/" if len(updates) > 1 else ""
    metrics.update({prefix + k: v for k, v in out.items()})
    for g in update.groups:
      lr_name = "learning_rate" if len(optimizers) == 1 else f"learning_rate/{g}"
      metrics[lr_name] = jnp.asarray(optimizers[g].schedule(state.step), jnp.float32)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(state: TrainState, batch: dict, *, task: Task) -> dict:
  """The task's eval sums for one batch (added up over batches by the caller)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), EVAL_STREAM)
  return task.eval_sums(state.params, state.frozen, batch, key)
