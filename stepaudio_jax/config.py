"""Run configuration: YAML files with inheritance and dotted overrides, one typed schema.

A YAML file may name its base (`base: ../base.yaml`, or a list of them, relative to the file);
bases merge first, the file on top, then `key=value` overrides from the command line. OmegaConf
checks every key and type against the dataclasses below (safe YAML only); each section's
dataclass checks its own values, and `RunConfig` checks values across sections. Errors name the
key and the file (or "command line") that set it.
"""

import dataclasses
import enum
import os
import re
from collections.abc import Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stepaudio_jax.data.config import DataConfig
from stepaudio_jax.data.synthetic import SyntheticConfig
from stepaudio_jax.models.step1 import Step1Config
from stepaudio_jax.models.tokens import TokenLayout
from stepaudio_jax.models.vision import VisionConfig
from stepaudio_jax.parallel.mesh import MeshConfig
from stepaudio_jax.training.checkpoint import CheckpointConfig
from stepaudio_jax.training.optimizer import OptimizerConfig
from stepaudio_jax.training.trainer import TrainConfig

BASE_KEY = "base"


class ConfigError(ValueError):
  """A config that cannot run; the message names the key, where it was set and the fix."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
  model: Step1Config = dataclasses.field(default_factory=Step1Config)
  tokens: TokenLayout = dataclasses.field(default_factory=TokenLayout)
  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)

  def __post_init__(self):
    needed = self.tokens.min_vocab_size(self.vision.enabled)
    if self.model.vocab_size < needed:
      raise ValueError(
          f"model.vocab_size={self.model.vocab_size} is below the {needed} ids the token layout "
          "needs (tokens.text_vocab_size + audio codes, + 1 image placeholder with vision)"
      )
    if self.synthetic.audio_weight and not (self.tokens.linguistic_codes
                                            and self.tokens.semantic_codes):
      raise ValueError("synthetic.audio_weight must be 0 for a model without audio codes")
    if self.train.seq_len > self.model.max_seq_len:
      raise ValueError(
          f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
      )
    if self.vision.enabled and self.vision.tokens_per_image > self.train.seq_len:
      raise ValueError("vision.tokens_per_image does not fit in train.seq_len")


def _read_yaml(path: str) -> dict:
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  with open(path) as f:
    try:
      data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
      raise ConfigError(f"{path}: not valid YAML: {e}") from e
  if not isinstance(data, dict):
    raise ConfigError(f"{path}: the top level must be a mapping of sections")
  return data


def _layers(path: str, seen: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
  """(source, mapping) pairs, bases first."""
  path = os.path.normpath(path)
  if path in seen:
    raise ConfigError(f"{path}: circular base chain {' -> '.join(seen + (path,))}")
  data = _read_yaml(path)
  bases = data.pop(BASE_KEY, [])
  bases = [bases] if isinstance(bases, str) else bases
  out = []
  for base in bases:
    out += _layers(os.path.join(os.path.dirname(path), base), seen + (path,))
  return out + [(path, data)]


def _flat_keys(data, prefix="") -> list[str]:
  if not isinstance(data, dict):
    return [prefix]
  keys = []
  for k, v in data.items():
    keys += _flat_keys(v, f"{prefix}.{k}" if prefix else str(k))
  return keys


def _structured(obj) -> dict:
  def plain(v):
    if dataclasses.is_dataclass(v):  # e.g. data.stages, a list of StageConfig
      return _structured(v)
    if isinstance(v, enum.Enum):
      return v.value
    if isinstance(v, dict):
      return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
      return [plain(x) for x in v]
    return v

  return {f.name: plain(getattr(obj, f.name)) if not dataclasses.is_dataclass(getattr(obj, f.name))
          else _structured(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def load_config(
    path: str, overrides: Sequence[str] = (), num_devices: int | None = None,
    num_processes: int = 1,
) -> RunConfig:
  """Load, merge and validate; with num_devices, also check that the mesh fits them."""
  layers = _layers(path)
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"command line: override {item!r} must look like section.key=value")
  if overrides:
    layers.append(("command line", OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))))
  provenance: dict[str, str] = {}
  merged = OmegaConf.structured(RunConfig)
  for source, data in layers:
    try:
      merged = OmegaConf.merge(merged, data)
    except OmegaConfBaseException as e:
      raise ConfigError(f"{source}: {_first_line(e)} (key {e.full_key})") from e
    for key in _flat_keys(data):
      provenance[key] = source
  sections = {}
  for f in dataclasses.fields(RunConfig):
    try:
      sections[f.name] = OmegaConf.to_object(merged[f.name])
    except (ValueError, OmegaConfBaseException) as e:
      raise ConfigError(_explain(f.name, e, provenance)) from e
  try:
    cfg = RunConfig(**sections)
  except ValueError as e:
    raise ConfigError(_explain("", e, provenance)) from e
  if num_devices is not None:
    try:
      cfg.mesh.shape(num_devices)
    except ValueError as e:
      raise ConfigError(_explain("mesh", e, provenance)) from e
  if cfg.train.batch_size % num_processes:
    raise ConfigError(_explain("train", ValueError(
        f"batch_size={cfg.train.batch_size} does not divide over {num_processes} processes "
        "(each loads its own rows); make it a multiple of the process count"), provenance))
  return cfg


def _first_line(e: Exception) -> str:
  return str(e).splitlines()[0] if str(e) else type(e).__name__


def _explain(section: str, e: Exception, provenance: dict[str, str]) -> str:
  """Prefix the failing section and say which files set the keys the message mentions."""
  msg = _first_line(e)
  words = set(re.findall(r"[A-Za-z_][\w.]*", msg))
  where = []
  for key, source in sorted(provenance.items()):
    short = key.split(".", 1)[1] if section and key.startswith(section + ".") else key
    if key in words or (section and key.startswith(section + ".") and short in words):
      where.append(f"{key} set in {source}")
  loc = f"; {', '.join(where)}" if where else " (defaults)"
  head = f"invalid {section} config: " if section else "invalid config: "
  return head + msg + loc


def dump_config(cfg: RunConfig, path: str) -> None:
  """Write the resolved config; it loads back with load_config."""
  with open(path, "w") as f:
    yaml.safe_dump(_structured(cfg), f, sort_keys=False)
