"""setup(cfg, devices): the one place a run is assembled (trainer, aot, benchmarks, import, tests).

Mesh and logical sharding from the config; the task from `task:` (or given); one optimizer per
trained model; the abstract state and every state and batch sharding, with a clear error for a
mesh that does not divide a parameter or the batch; and the jitted init, train and eval steps
with explicit shardings (the train step donates the state). Nothing here runs a step: `init()`
materialises the state, already sharded.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from stepaudio_jax.config import RunConfig
from stepaudio_jax.parallel.mesh import LogicalSharding, make_mesh
from stepaudio_jax.tasks.base import Task
from stepaudio_jax.tasks.registry import make_task
from stepaudio_jax.training import step as step_lib
from stepaudio_jax.training.optimizer import Optimizer
from stepaudio_jax.training.state import TrainState, init_state, state_shardings


@dataclasses.dataclass(frozen=True)
class Setup:
  cfg: RunConfig
  mesh: Mesh
  shard: LogicalSharding
  task: Task
  optimizers: dict[str, Optimizer]
  total_steps: int  # train.steps, or what train.epochs of the task's data come to
  abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
  state_shardings: TrainState
  batch: dict[str, jax.ShapeDtypeStruct]  # the global batch, with shardings
  init: Callable[[], TrainState]
  train: Callable[[TrainState, dict], tuple[TrainState, dict]]
  eval: Callable[[TrainState, dict], dict]

  @property
  def batch_shardings(self) -> dict:
    return {k: v.sharding for k, v in self.batch.items()}


def _optimizers(task: Task, total_steps: int) -> dict[str, Optimizer]:
  out = {}
  for name, model in task.models().items():
    trains = bool(jax.tree.leaves(task.abstract(name)[1]))
    if model.optimizer is None and trains:
      raise ValueError(f"task {type(task).__name__}: model {name!r} has trainable parameters "
                       "but no optimizer; give it one or make its trainable filter match none")
    if model.optimizer is not None:
      if not trains:
        raise ValueError(f"task {type(task).__name__}: model {name!r} has an optimizer but "
                         "its trainable filter matches no parameter")
      out[name] = Optimizer.create(model.optimizer, total_steps)
  return out


TaskFactory = Callable[[RunConfig, LogicalSharding], Task]  # e.g. a Task subclass


def setup(cfg: RunConfig, devices: Sequence[jax.Device] | None = None,
          task: TaskFactory | None = None, donate: bool = True) -> Setup:
  """Everything a run needs on `devices` (default: all); `task` (built with this config and
  sharding) replaces the one `cfg.task` names."""
  mesh = make_mesh(cfg.mesh, devices)
  shard = LogicalSharding.create(mesh, cfg.mesh.rules)
  task = make_task(cfg, shard) if task is None else task(cfg, shard)
  total_steps = task.total_steps()
  optimizers = _optimizers(task, total_steps)
  init = functools.partial(init_state, task, optimizers, cfg.train.seed)
  shapes = jax.eval_shape(init)
  shardings = state_shardings(task, optimizers, shard, shapes)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          shapes, shardings)
  batch = {}
  for name, field in task.batch_fields().items():
    shard.check_divides(f"batch field {name!r} of shape {tuple(field.shape)} (rows: "
                        f"train.batch_size={field.shape[0]}; tokens: train.seq_len)", field.shape,
                        field.axes)
    batch[name] = jax.ShapeDtypeStruct(field.shape, np.dtype(field.dtype),
                                       sharding=shard.named(field.axes))
  batch_sh = {k: v.sharding for k, v in batch.items()}
  train = jax.jit(
      functools.partial(step_lib.train_step, task=task, optimizers=optimizers,
                        grad_accum_steps=cfg.train.grad_accum_steps, shard=shard),
      in_shardings=(shardings, batch_sh),
      out_shardings=(shardings, None),
      donate_argnums=0 if donate else (),
  )
  return Setup(
      cfg=cfg, mesh=mesh, shard=shard, task=task, optimizers=optimizers, total_steps=total_steps,
      abstract_state=abstract, state_shardings=shardings, batch=batch,
      init=jax.jit(init, out_shardings=shardings),
      train=train,
      eval=jax.jit(functools.partial(step_lib.eval_step, task=task),
                   in_shardings=(shardings, batch_sh)),
  )
