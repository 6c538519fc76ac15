"""The generic pure steps: (state, batch) -> (state, metrics) for any task, and eval sums.

A step first lets the task prepare the batch without gradients (`Task.prepare`: e.g. PPO's
rollouts, rewards and advantages, all inside the one jitted step), then runs the task's updates
in order. Each takes gradients of its loss with respect to its groups' trainable parameters
(the other groups and all frozen parameters are constants), summed over `grad_accum_steps`
microbatches, divides them by the batch's `denominator` sum, and applies each group's
optimizer; the next update sees the new parameters. An update may make `epochs` passes of
`minibatches` optimizer updates each over the prepared batch (rows chosen by
tasks/base.py `minibatch`, whose first pass a task can reproduce), and may start only at step
`starts_at` (before it, its groups are left as they are: a critic warm-up). Every update,
pass and microbatch gets its own key folded from fold_in(rng, step), so stochastic losses
(noise, dropout, CFG drop) draw fresh randomness every step, reproducibly.

Metrics: the task's (from the summed loss terms), plus grad_norm, update_norm and param_norm
over the update's groups, prefixed by the update's name when there are several updates; and
each trained model's learning rate (`learning_rate`, or `learning_rate/<model>` for several).
"""

import functools

import jax
import jax.numpy as jnp
import optax

from stepaudio_jax.parallel.mesh import LogicalSharding
from stepaudio_jax.tasks.base import BatchField, Task, Update, minibatch
from stepaudio_jax.training.optimizer import Optimizer
from stepaudio_jax.training.state import TrainState

EVAL_STREAM = 0x7FFFFFFF  # eval keys do not depend on the step: evals stay comparable
PREPARE_STREAM = 0x7FFFFFFE  # the key of Task.prepare (rollouts), apart from the updates'


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


def _apply(update: Update, task: Task, optimizers: dict[str, Optimizer], params: dict,
           opt_state: dict, frozen: dict, batch: dict, key: jax.Array, fields: dict,
           grad_accum_steps: int, shard: LogicalSharding | None):
  """One optimizer update of the update's groups on `batch`: (params, opt_state, metrics)."""
  grads, sums = accumulated_gradients(update, params, frozen, batch, key, fields,
                                      grad_accum_steps, shard)
  grads = jax.tree.map(lambda g: g / jnp.maximum(sums[update.denominator], 1.0), grads)
  params, opt_state, steps = dict(params), dict(opt_state), {}
  with jax.named_scope("optimizer"):
    for g in update.groups:
      steps[g], opt_state[g] = optimizers[g].tx.update(grads[g], opt_state[g], params[g])
      params[g] = optax.apply_updates(params[g], steps[g])
  out = task.metrics(sums, update)
  out.update(
      grad_norm=optax.tree.norm(grads),
      update_norm=optax.tree.norm(steps),
      param_norm=optax.tree.norm({g: params[g] for g in update.groups}),
  )
  return params, opt_state, out


def _run_update(update: Update, task: Task, optimizers, params, opt_state, *, frozen, batch,
                key, fields, grad_accum_steps, shard):
  """The update's `epochs` x `minibatches` optimizer updates; metrics are their mean, plus
  `first/<name>` of the very first for the names in `update.report_first`."""
  run = functools.partial(_apply, update, task, optimizers, frozen=frozen, fields=fields,
                          grad_accum_steps=grad_accum_steps, shard=shard)
  passes = update.epochs * update.minibatches
  if passes == 1:
    return run(params=params, opt_state=opt_state, batch=batch, key=key)

  def body(carry, i):
    params, opt_state = carry
    mb = minibatch(batch, update.minibatches, i % update.minibatches, i // update.minibatches,
                   key)
    params, opt_state, out = run(params=params, opt_state=opt_state, batch=mb,
                                 key=jax.random.fold_in(key, i))
    return (params, opt_state), out

  (params, opt_state), outs = jax.lax.scan(body, (params, opt_state), jnp.arange(passes))
  metrics = {k: v.mean() for k, v in outs.items()}
  metrics.update({f"first/{k}": outs[k][0] for k in update.report_first})
  return params, opt_state, metrics


def _skip(run, params, opt_state):
  """What `run` returns, with the parameters and optimizer state untouched and zero metrics."""
  out = jax.eval_shape(lambda: run(params, opt_state)[2])
  return params, opt_state, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out)


def train_step(state: TrainState, batch: dict, *, task: Task, optimizers: dict[str, Optimizer],
               grad_accum_steps: int, shard: LogicalSharding | None) -> tuple[TrainState, dict]:
  updates = task.updates()
  fields = task.batch_fields()
  key = step_key(state)
  batch, metrics = task.prepare(state.params, state.frozen, batch,
                                jax.random.fold_in(key, PREPARE_STREAM))
  metrics = dict(metrics)
  params, opt_state = dict(state.params), dict(state.opt_state)
  for u, update in enumerate(updates):
    run = functools.partial(_run_update, update, task, optimizers, frozen=state.frozen,
                            batch=batch, key=jax.random.fold_in(key, u), fields=fields,
                            grad_accum_steps=grad_accum_steps, shard=shard)
    if update.starts_at:
      params, opt_state, out = jax.lax.cond(
          state.step >= update.starts_at, run, functools.partial(_skip, run), params, opt_state)
    else:
      params, opt_state, out = run(params, opt_state)
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
