"""The config's `task:` name -> an instance of its task class (named in config.TASK_REGISTRY)."""

import importlib

from stepaudio_jax.config import TASK_REGISTRY, RunConfig
from stepaudio_jax.parallel.mesh import LogicalSharding
from stepaudio_jax.tasks.base import Task


def task_class(name: str) -> type[Task]:
  module, cls = TASK_REGISTRY[name].split(":")
  return getattr(importlib.import_module(module), cls)


def make_task(cfg: RunConfig, shard: LogicalSharding | None) -> Task:
  return task_class(cfg.task)(cfg, shard)
