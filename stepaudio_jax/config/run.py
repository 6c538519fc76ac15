"""RunConfig: what every run has, the LM sections the LM tasks share, and the task's own sections.

The schema is not fixed: a task declares the sections it reads (`Task.sections`, a name ->
frozen dataclass), and the loader checks a file against RunConfig's fields plus those. The
config package names no task; it sees them through a `TaskCatalog` (tasks/registry.py).
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

from stepaudio_jax.config.data import DataConfig, SyntheticConfig
from stepaudio_jax.config.mesh import MeshConfig
from stepaudio_jax.config.model import Step1Config, TokenLayout, VisionConfig
from stepaudio_jax.config.training import CheckpointConfig, OptimizerConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class RunConfig:
  task: str = "pretrain"  # a name in the task registry (tasks/registry.py)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  # The LM sections: read by the tasks that train a Step1 model (their checks are theirs).
  model: Step1Config = dataclasses.field(default_factory=Step1Config)
  tokens: TokenLayout = dataclasses.field(default_factory=TokenLayout)
  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
  # The task's own sections, by name (`ppo`, `flow`, ...), each its dataclass; read as
  # attributes (`cfg.ppo.kl_coef`).
  sections: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    clash = set(self.sections) & {f.name for f in dataclasses.fields(self)}
    if clash:
      raise ValueError(f"task sections {sorted(clash)} have the names of run sections")

  def __getattr__(self, name: str):
    sections = self.__dict__.get("sections", {})
    if name in sections:
      return sections[name]
    if name.startswith("__"):
      raise AttributeError(name)
    raise AttributeError(f"a run of task {self.__dict__.get('task')!r} has no section {name!r} "
                         f"(its task's sections: {sorted(sections)})")


class TaskSpec(Protocol):
  """What the loader needs of a task class."""

  sections: Mapping[str, type]

  @classmethod
  def check_config(cls, cfg: RunConfig) -> None:
    """Raise ValueError naming the keys when values that span sections cannot work."""

  @classmethod
  def length_keys(cls, cfg: RunConfig) -> tuple[str, ...]:
    """The dotted keys that decide the run's length in place of train.steps (() = it does)."""


class TaskCatalog(Protocol):
  """The registered tasks, by name."""

  def names(self) -> list[str]:
    ...

  def get(self, name: str) -> TaskSpec:
    ...
