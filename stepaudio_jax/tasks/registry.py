"""The task registry: each `task:` name and its class, and the config loader that knows them.

Built-in tasks are named by import path, so loading a config imports only its own task. A task
defined elsewhere (a user's module, a test) joins with `register_task(name, cls)`; from then on
its config loads and trains like any other.
"""

import importlib
from collections.abc import Sequence

from stepaudio_jax.config import ConfigError, RunConfig
from stepaudio_jax.config.loading import load
from stepaudio_jax.parallel.mesh import LogicalSharding
from stepaudio_jax.tasks.base import Deliverable, Task

_TASKS: dict[str, str | type[Task]] = {
    "pretrain": "stepaudio_jax.tasks.pretrain:PretrainTask",  # Step-Omni next-token pretraining
    "sft": "stepaudio_jax.tasks.sft:SFTTask",  # TTS / AQTA / ASR fine-tuning on chat records
    "reward": "stepaudio_jax.tasks.reward:RewardTask",  # Bradley-Terry reward model
    "ppo": "stepaudio_jax.tasks.ppo:PPOTask",  # PPO with a critic against the reward model
    "flow": "stepaudio_jax.tasks.flow:FlowTask",  # codes -> mel, conditional flow matching
    "vocoder": "stepaudio_jax.tasks.vocoder:VocoderTask",  # mel -> waveform, HiFi-GAN
    "phone_ctc": "stepaudio_jax.tasks.phone_ctc:PhoneCTCTask",  # speech encoder, CTC on phones
}


def register_task(name: str, cls: type[Task]) -> None:
  """Make `task: name` run `cls`; registering a name again replaces its class."""
  if not (isinstance(cls, type) and issubclass(cls, Task)):
    raise TypeError(f"register_task({name!r}, ...) needs a Task subclass, got {cls!r}")
  _TASKS[name] = cls


def task_names() -> list[str]:
  return sorted(_TASKS)


def task_class(name: str) -> type[Task]:
  if name not in _TASKS:
    raise ConfigError(f"task={name!r} is not a registered task; known tasks: {task_names()}")
  entry = _TASKS[name]
  if isinstance(entry, str):
    module, cls = entry.split(":")
    entry = _TASKS[name] = getattr(importlib.import_module(module), cls)
  return entry


def deliverable(task: str, name: str = "", where: str = "the run") -> tuple[str, Deliverable]:
  """(name, deliverable) of a `task` run: `name`, or the one the task delivers by default; a
  ConfigError (one line, naming the models there are) for a name it does not hold."""
  models = task_class(task).deliverables
  if not models:
    raise ConfigError(f"{where} (task {task}) has no model that leaves it")
  if not name:
    return next(iter(models.items()))
  if name not in models:
    raise ConfigError(f"{where} (task {task}) holds no model {name!r}; its models: "
                      f"{', '.join(models)}")
  return name, models[name]


class _Catalog:
  """The registry as the config loader sees it (config.run.TaskCatalog)."""

  def names(self) -> list[str]:
    return task_names()

  def get(self, name: str) -> type[Task]:
    return task_class(name)


def load_config(path: str, overrides: Sequence[str] = (), num_devices: int | None = None,
                num_processes: int = 1) -> RunConfig:
  """A run's config from YAML and `key=value` overrides, checked against the run's sections and
  its task's (config/loading.py); with num_devices, the mesh must fit them."""
  return load(path, overrides, _Catalog(), num_devices, num_processes)


def make_task(cfg: RunConfig, shard: LogicalSharding | None) -> Task:
  return task_class(cfg.task)(cfg, shard)
