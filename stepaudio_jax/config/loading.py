"""Loading configs: YAML files with inheritance and dotted overrides, checked by one schema.

A YAML file may name its base (`base: ../base.yaml`, or a list of them, relative to the file);
bases merge first, the file on top, then `key=value` overrides from the command line. The
run's task (`task:`) adds its own sections to RunConfig's; OmegaConf checks every key and type
against the two (safe YAML only), each section's dataclass checks its own values, and the task's
`check_config` checks values across sections. Errors name the key and the file (or "command
line") that set it.
"""

import dataclasses
import enum
import os
import re
import typing
from collections.abc import Mapping, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stepaudio_jax.config.fields import INPUT_PATH
from stepaudio_jax.config.run import RunConfig, TaskCatalog, TaskSpec
from stepaudio_jax.config.training import TrainConfig

BASE_KEY = "base"
TASK_KEY = "task"
# Marks a file dump_config wrote: it holds every key, so a train.steps beside train.epochs
# there is the run's record, not a setting someone made.
RESOLVED_KEY = "resolved"
SECTIONS = "sections"  # RunConfig's field of task sections: they sit at the top level in YAML


class ConfigError(ValueError):
  """A config that cannot run; the message names the key, where it was set and the fix."""


def read_yaml(path: str) -> dict:
  """A YAML file's top-level mapping, loaded safely; a missing file, bad YAML or another top
  level is a ConfigError naming the file."""
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


def _layers(path: str, seen: tuple[str, ...] = ()) -> list[tuple[str, str, dict]]:
  """(source, directory, mapping) triples, bases first."""
  path = os.path.normpath(path)
  if path in seen:
    raise ConfigError(f"{path}: circular base chain {' -> '.join(seen + (path,))}")
  data = read_yaml(path)
  bases = data.pop(BASE_KEY, [])
  bases = [bases] if isinstance(bases, str) else bases
  out = []
  for base in bases:
    base_path = os.path.join(os.path.dirname(path), base)
    if not os.path.isfile(base_path):
      raise ConfigError(f"{path}: base {base!r} does not exist (looked for {base_path}; bases "
                        "are relative to the file that names them)")
    out += _layers(base_path, seen + (path,))
  return out + [(path, os.path.dirname(path), data)]


def _resolve(value, directory: str):
  """Paths in a string, a list or a mapping of them, made absolute against `directory`."""
  if isinstance(value, str):
    if not value or "://" in value or os.path.isabs(value):
      return value
    return os.path.abspath(os.path.join(directory, value))
  if isinstance(value, list):
    return [_resolve(v, directory) for v in value]
  if isinstance(value, dict):
    return {k: _resolve(v, directory) for k, v in value.items()}
  return value


def _resolve_paths(schema: type, data, directory: str) -> None:
  """Input paths a file sets (fields marked `input_path`) are relative to that file, as `base:`
  is; command-line ones stay relative to the working directory; train.run_dir, an output, is
  always the latter."""
  if not isinstance(data, dict):
    return
  hints = typing.get_type_hints(schema)
  for f in dataclasses.fields(schema):
    if data.get(f.name) is None:
      continue
    typ = hints[f.name]
    if f.metadata.get(INPUT_PATH):
      data[f.name] = _resolve(data[f.name], directory)
    elif dataclasses.is_dataclass(typ):
      _resolve_paths(typ, data[f.name], directory)
    elif typing.get_origin(typ) is list and isinstance(data[f.name], list):
      (item,) = typing.get_args(typ)
      if dataclasses.is_dataclass(item):
        for entry in data[f.name]:
          _resolve_paths(item, entry, directory)


def _flat_keys(data, prefix="") -> list[str]:
  if not isinstance(data, dict):
    return [prefix]
  keys = []
  for k, v in data.items():
    keys += _flat_keys(v, f"{prefix}.{k}" if prefix else str(k))
  return keys


def _plain(v):
  if dataclasses.is_dataclass(v):
    return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
  if isinstance(v, enum.Enum):
    return v.value
  if isinstance(v, Mapping):
    return {k: _plain(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_plain(x) for x in v]
  return v


def _structured(cfg: RunConfig) -> dict:
  """The config as YAML writes it: the task's sections beside the run's."""
  out = {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
         if f.name != SECTIONS}
  return out | {name: _plain(section) for name, section in cfg.sections.items()}


def _schema(sections: Mapping[str, type]) -> type:
  """RunConfig's sections plus the task's, as one dataclass for OmegaConf to check against."""
  fields = []
  for f in dataclasses.fields(RunConfig):
    if f.name == SECTIONS:
      continue
    default = (dataclasses.field(default=f.default) if f.default is not dataclasses.MISSING
               else dataclasses.field(default_factory=f.default_factory))
    fields.append((f.name, f.type, default))
  fields += [(name, cls, dataclasses.field(default_factory=cls)) for name, cls in sections.items()]
  return dataclasses.make_dataclass("RunSchema", fields, frozen=True)


def _task_of(layers: list[tuple[str, str | None, dict]], catalog: TaskCatalog):
  """(task name, its spec): the last layer that sets `task:` decides."""
  name, where = RunConfig.task, "defaults"
  for source, _, data in layers:
    if TASK_KEY in data:
      name, where = data[TASK_KEY], source
  if not isinstance(name, str) or name not in catalog.names():
    raise ConfigError(f"task={name!r} is not a registered task; known tasks: "
                      f"{sorted(catalog.names())} (stepaudio_jax/tasks/registry.py); task set "
                      f"in {where}")
  spec = catalog.get(name)
  clash = set(spec.sections) & {f.name for f in dataclasses.fields(RunConfig)}
  if clash:
    raise ConfigError(f"task {name!r} declares sections {sorted(clash)}, which are run "
                      "sections; give them other names")
  return name, spec


def _check_sections(layers, task: str, schema: type, catalog: TaskCatalog) -> None:
  """A top-level key must be a section of this run: another task's section is an error, not
  something silently ignored."""
  known = [f.name for f in dataclasses.fields(schema)]
  for source, _, data in layers:
    for key in data:
      if key in known:
        continue
      owners = sorted(n for n in catalog.names() if key in catalog.get(n).sections)
      if owners:
        raise ConfigError(
            f"{source}: section {key!r} belongs to task {' / '.join(owners)}, not to this run's "
            f"task {task!r}; remove it or set task={owners[0]} (a {task} run reads "
            f"{sorted(known)})")
      raise ConfigError(f"{source}: unknown section {key!r}; a {task} run reads {sorted(known)}")


def load(
    path: str, overrides: Sequence[str], catalog: TaskCatalog, num_devices: int | None = None,
    num_processes: int = 1,
) -> RunConfig:
  """Load, merge and validate against the run's schema and its task's; with num_devices, also
  check that the mesh fits them. Callers use tasks.registry.load_config, which passes the
  registry as `catalog`."""
  layers = _layers(path)
  resolved = {source for source, _, data in layers if data.pop(RESOLVED_KEY, False)}
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"command line: override {item!r} must look like section.key=value")
  if overrides:
    layers.append(("command line", None,
                   OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))))
  task, spec = _task_of(layers, catalog)
  schema = _schema(spec.sections)
  _check_sections(layers, task, schema, catalog)
  for _, directory, data in layers:
    if directory is not None:
      _resolve_paths(schema, data, directory)
  provenance: dict[str, str] = {}
  merged = OmegaConf.structured(schema)
  for source, _, data in layers:
    try:
      merged = OmegaConf.merge(merged, data)
    except OmegaConfBaseException as e:
      choices = _enum_choices(schema, e.full_key)
      if choices:
        raise ConfigError(f"{source}: {e.full_key}={e.value!r} is not one of {choices}") from e
      raise ConfigError(f"{source}: {_first_line(e)} (key {e.full_key})") from e
    for key in _flat_keys(data):
      provenance[key] = source
  built = {}
  for f in dataclasses.fields(schema):
    try:
      node = merged[f.name]
      built[f.name] = OmegaConf.to_object(node) if OmegaConf.is_config(node) else node
    except (ValueError, OmegaConfBaseException) as e:
      raise ConfigError(_explain(f.name, e, provenance)) from e
  run_fields = {f.name for f in dataclasses.fields(RunConfig)}
  try:
    cfg = RunConfig(**{k: v for k, v in built.items() if k in run_fields},
                    sections={k: v for k, v in built.items() if k not in run_fields})
    spec.check_config(cfg)
  except ValueError as e:
    raise ConfigError(_explain("", e, provenance)) from e
  _check_length(cfg, spec, provenance, [source for source, _, _ in layers], resolved)
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


def _check_length(cfg: RunConfig, spec: TaskSpec, provenance: dict[str, str],
                  order: list[str], resolved: set[str]) -> None:
  """Exactly one setting decides the run's length (Task.length_keys): train.epochs where the
  task reads no epochs, or a train.steps set (to a non-default value) in the layer of those
  keys or after it, would be ignored, so it is refused, naming the keys and where they came.
  A resolved config (dump_config's) records both and is not checked for train.steps."""
  keys = spec.length_keys(cfg)
  where = lambda key: provenance.get(key, "defaults")  # noqa: E731
  label = lambda key: f"{key}={cfg.train.epochs:g}" if key == "train.epochs" else key  # noqa: E731
  decide = " and ".join(f"{label(k)} (set in {where(k)})" for k in keys)
  if cfg.train.epochs and "train.epochs" not in keys:
    by = f"{decide} {'decides' if len(keys) == 1 else 'decide'}" if keys else \
        "train.steps decides"
    raise ConfigError(f"invalid config: train.epochs={cfg.train.epochs:g} (set in "
                      f"{where('train.epochs')}) does not apply to a {cfg.task} run: {by} its "
                      "length; remove train.epochs")
  rank = {source: i for i, source in enumerate(order)}
  steps_at = rank.get(provenance.get("train.steps"), -1)
  keys_at = max((rank.get(provenance.get(k), -1) for k in keys), default=len(order))
  if (cfg.train.steps != TrainConfig.steps and steps_at >= keys_at
      and provenance.get("train.steps") not in resolved):
    fix = ", or set train.epochs=0 to train train.steps steps" if "train.epochs" in keys else ""
    raise ConfigError(f"invalid config: train.steps={cfg.train.steps} (set in "
                      f"{where('train.steps')}) would be ignored: {decide} "
                      f"{'decides' if len(keys) == 1 else 'decide'} the length of a {cfg.task} "
                      f"run; remove train.steps{fix}")


def _enum_choices(schema: type, key: str) -> list[str] | None:
  """The allowed values of an enum field such as `model.remat` (OmegaConf names the members)."""
  typ = schema
  for part in (key or "").split("."):
    fields = {f.name: f.type for f in dataclasses.fields(typ)} if dataclasses.is_dataclass(typ) \
        else {}
    if part not in fields:
      return None
    typ = fields[part]
  return [m.value for m in typ] if isinstance(typ, type) and issubclass(typ, enum.Enum) else None


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
  """Write the resolved config; it loads back as it was."""
  with open(path, "w") as f:
    yaml.safe_dump({RESOLVED_KEY: True, **_structured(cfg)}, f, sort_keys=False)
