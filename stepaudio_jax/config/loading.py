"""Loading configs: YAML files with inheritance and dotted overrides, checked by one schema.

A YAML file may name its base (`base: ../base.yaml`, or a list of them, relative to the file);
bases merge first, the file on top, then `key=value` overrides from the command line. OmegaConf
checks every key and type against RunConfig (safe YAML only); each section's dataclass checks
its own values, and `RunConfig` checks values across sections. Errors name the key and the file
(or "command line") that set it.
"""

import dataclasses
import enum
import logging
import os
import re
from collections.abc import Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stepaudio_jax.config.run import RunConfig

log = logging.getLogger(__name__)

BASE_KEY = "base"
# Keys that configs written by earlier versions (e.g. a run's config.yaml) may hold; they are
# dropped with a warning so old runs still load, and the reason says what replaced them.
RETIRED_KEYS = {
    ("data", "eval_seed_offset"): "eval reads the held-out data.eval_shards instead of "
                                  "reshuffling the training shards",
}


# Input paths in a config file, resolved against that file's directory.
PATH_KEYS = {
    ("data", "shards"): "globs",
    ("data", "eval_shards"): "globs",
    ("data", "tokenizer_model"): "path",
    ("checkpoint", "init_from"): "path",
    ("reward", "stages"): "stages",
    ("ppo", "prompts"): "list",
    ("ppo", "policy_from"): "path",
    ("ppo", "reward_from"): "path",
    ("speech_data", "path"): "path",
}


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


def _layers(path: str, seen: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
  """(source, mapping) pairs, bases first."""
  path = os.path.normpath(path)
  if path in seen:
    raise ConfigError(f"{path}: circular base chain {' -> '.join(seen + (path,))}")
  data = read_yaml(path)
  _drop_retired(data, path)
  _resolve_paths(data, os.path.dirname(path))
  bases = data.pop(BASE_KEY, [])
  bases = [bases] if isinstance(bases, str) else bases
  out = []
  for base in bases:
    base_path = os.path.join(os.path.dirname(path), base)
    if not os.path.isfile(base_path):
      raise ConfigError(f"{path}: base {base!r} does not exist (looked for {base_path}; bases "
                        "are relative to the file that names them)")
    out += _layers(base_path, seen + (path,))
  return out + [(path, data)]


def _resolve(value: str, directory: str) -> str:
  if not value or "://" in value or os.path.isabs(value):
    return value
  return os.path.abspath(os.path.join(directory, value))


def _resolve_paths(data: dict, directory: str) -> None:
  """Input paths a file sets are relative to that file, as `base:` is (command-line ones stay
  relative to the working directory); train.run_dir, an output, is always the latter."""
  for (section, key), kind in PATH_KEYS.items():
    node = data.get(section)
    if not isinstance(node, dict) or node.get(key) is None:
      continue
    if kind == "globs" and isinstance(node[key], dict):
      node[key] = {t: [_resolve(g, directory) for g in globs] if isinstance(globs, list) else
                   globs for t, globs in node[key].items()}
    elif kind == "path" and isinstance(node[key], str):
      node[key] = _resolve(node[key], directory)
    elif kind == "list" and isinstance(node[key], list):
      node[key] = [_resolve(g, directory) for g in node[key]]
    elif kind == "stages" and isinstance(node[key], list):
      for stage in node[key]:
        for k in ("shards", "eval_shards"):
          if isinstance(stage, dict) and isinstance(stage.get(k), list):
            stage[k] = [_resolve(g, directory) for g in stage[k]]


def _drop_retired(data: dict, path: str) -> None:
  for (section, key), why in RETIRED_KEYS.items():
    if isinstance(data.get(section), dict) and key in data[section]:
      del data[section][key]
      log.warning("%s: ignoring %s.%s, no longer a setting: %s", path, section, key, why)


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
      choices = _enum_choices(e.full_key)
      if choices:
        raise ConfigError(f"{source}: {e.full_key}={e.value!r} is not one of {choices}") from e
      raise ConfigError(f"{source}: {_first_line(e)} (key {e.full_key})") from e
    for key in _flat_keys(data):
      provenance[key] = source
  sections = {}
  for f in dataclasses.fields(RunConfig):
    try:
      node = merged[f.name]
      sections[f.name] = OmegaConf.to_object(node) if OmegaConf.is_config(node) else node
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


def _enum_choices(key: str) -> list[str] | None:
  """The allowed values of an enum field such as `model.remat` (OmegaConf names the members)."""
  typ = RunConfig
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
  """Write the resolved config; it loads back with load_config."""
  with open(path, "w") as f:
    yaml.safe_dump(_structured(cfg), f, sort_keys=False)
